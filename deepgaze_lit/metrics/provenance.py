"""Provenance of a report: which weights, data, split, input size and centre bias produced it.

`build_provenance` gives the dict stored under `"provenance"` in `metrics.json`; the data part comes from
`SaliencyDataModule.provenance(stage)` (or any dict of the same kind), the checkpoint part is its path and the
SHA-256 of its content.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Mapping, Optional

from deepgaze_lit import __version__

HASH_CHUNK_BYTES = 1 << 20
"""Bytes read at a time when hashing a file."""


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_provenance(checkpoint: Optional[str | Path] = None, data: Optional[Mapping] = None,
                     weights: Optional[str | Path] = None) -> dict:
    """Provenance of an evaluation: `package_version`; `checkpoint` (path, sha256) of the training checkpoint
    evaluated, or None; `weights` (path, sha256) of starting weights loaded without a checkpoint (e.g. the
    released deepgaze3.pth), or None; `data` as given (source, path, split, fold, resize, sizes, centre bias)."""
    def file_entry(path):
        return None if path is None else {"path": str(Path(path).resolve()), "sha256": file_sha256(path)}

    return {"package_version": __version__, "checkpoint": file_entry(checkpoint), "weights": file_entry(weights),
            "data": dict(data) if data is not None else None}
