"""The dataset formats `SaliencyDataModule(source=...)` can read: one table, READERS, from source name to reader.

To add a format: write its reader (returning a FixationDataset) in a new file of `data/` and add one line to
READERS naming it, the settings it must be given and how it is called with them. The DataModule validates and
reads every source through this table and nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Callable, Optional

from .csv_dataset import read_csv_dataset
from .dataset import FixationDataset
from .errors import DataError
from .mit1003 import read_mit1003
from .pysaliency_io import read_pysaliency
from .synthetic import make_synthetic


@dataclass(frozen=True)
class SourceSettings:
    """The `SaliencyDataModule` arguments a reader may use (same names and meanings)."""

    path: Optional[str]
    csv_path: Optional[str]
    initial_fixation: Optional[bool]
    synthetic_images: int
    synthetic_seed: int
    synthetic_sizes: Sequence[tuple[int, int]]
    synthetic_subjects: int

    @classmethod
    def pick(cls, arguments: Mapping[str, Any]) -> "SourceSettings":
        """The settings among `arguments` (e.g. the DataModule's hyperparameters)."""
        return cls(**{field.name: arguments[field.name] for field in fields(cls)})


REQUIRED_SETTING_MEANINGS = {"path": "the dataset or image folder", "csv_path": "the CSV of fixations"}
"""Settings a reader can require (`Reader.needs`), with what the user must give, for the error message."""


@dataclass(frozen=True)
class Reader:
    """How to read one source: `read(settings)`; `needs` the settings (keys of REQUIRED_SETTING_MEANINGS) that
    must not be None, checked in this order when the DataModule is built."""

    read: Callable[[SourceSettings], FixationDataset]
    needs: tuple[str, ...] = ()


def _synthetic(settings: SourceSettings) -> FixationDataset:
    """Built-in images with a known fixation density; a forced initial fixation unless initial_fixation is False."""
    return make_synthetic(n_images=settings.synthetic_images, seed=settings.synthetic_seed,
                          sizes=[tuple(size) for size in settings.synthetic_sizes],
                          subjects=settings.synthetic_subjects, initial_fixation=settings.initial_fixation is not False)


READERS: dict[str, Reader] = {
    "synthetic": Reader(_synthetic),
    "pysaliency": Reader(lambda s: read_pysaliency(s.path, initial_fixation=s.initial_fixation), needs=("path",)),
    "mit1003": Reader(lambda s: read_mit1003(s.path), needs=("path",)),
    "csv": Reader(lambda s: read_csv_dataset(s.path, s.csv_path, initial_fixation=s.initial_fixation),
                  needs=("path", "csv_path")),
}
"""Source name -> reader: the one place that knows the dataset formats."""


def reader_for(source: str, settings: SourceSettings) -> Reader:
    """The reader of `source`; DataError (a ValueError the CLI prints as one line) when the source is unknown or a
    setting it needs is missing."""
    if source not in READERS:
        raise DataError(f"unknown data.source {source!r}; expected one of {', '.join(map(repr, READERS))} "
                         "(the formats registered in deepgaze_lit/data/readers.py)")
    reader = READERS[source]
    for setting in reader.needs:
        if getattr(settings, setting) is None:
            raise DataError(f"source '{source}' needs data.{setting} ({REQUIRED_SETTING_MEANINGS[setting]})")
    return reader


def read_source(source: str, settings: SourceSettings) -> FixationDataset:
    """The FixationDataset of `source` read with `settings` (native image sizes, before any resize policy)."""
    return reader_for(source, settings).read(settings)
