"""Per-image results of an evaluation (`metrics_per_image.csv`), for paired comparisons between models.

One row per image with fixations: its name, its index in the data source, its number of target fixations and one
column per catalogue metric, named as the metric's keys in `metrics.json` (`<name>_image` there): `ll_nats`,
`ig_uniform_bits`, `ig_centerbias_bits`, `nss`, `auc`, `sauc`, and with a gold kernel `cc`, `kldiv`, `mit_kldiv`,
`sim`. Each value is the image's mean over its fixations (or its map metric), so the mean of a column over the
rows is `metrics.json`'s image average of that metric (NaN cells, left empty, are not averaged there either).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from deepgaze_lit.metrics.catalogue import CATALOGUE, with_centerbias_metrics

PER_IMAGE_FILE_NAME = "metrics_per_image.csv"
"""Name of the per-image table beside `metrics.json`."""
IDENTITY_COLUMNS = ("image", "image_id", "fixations")
"""The leading columns: image name (file or description), index in the data source, target fixations."""


def _image_result(per_image: Mapping[str, torch.Tensor], index: int) -> dict[str, float]:
    """One image's values as a one-image `SaliencyMetrics.compute()` dict (both averages are the image's mean)."""
    result = {"n_fixations": float(per_image["n_fixations"][index]), "n_images": 1.0}
    for name, values in per_image.items():
        if name != "n_fixations":
            result[f"{name}_fixation"] = result[f"{name}_image"] = float(values[index])
    return result


def per_image_rows(model: Mapping[str, torch.Tensor], centerbias: Mapping[str, torch.Tensor],
                   image_names: Sequence[str], image_ids: Sequence[int]) -> list[dict]:
    """Rows of the per-image table from the model's and the centre bias's `SaliencyMetrics.per_image()` of the
    same split (image i of the split is `image_names[i]`, index `image_ids[i]` in its source). Images without
    fixations get no row; metrics derived over the centre bias (IG over the centre bias) come from the catalogue."""
    counts = model["n_fixations"]
    if len(image_names) != len(counts) or len(image_ids) != len(counts):
        raise ValueError(f"{len(counts)} images evaluated, but {len(image_names)} names and {len(image_ids)} ids")
    rows = []
    for index in (counts > 0).nonzero().flatten().tolist():
        derived = with_centerbias_metrics(_image_result(model, index), _image_result(centerbias, index))
        row = {"image": image_names[index], "image_id": int(image_ids[index]), "fixations": int(counts[index])}
        row.update({entry.name: derived[f"{entry.name}_image"] for entry in CATALOGUE
                    if f"{entry.name}_image" in derived})
        rows.append(row)
    return rows


def _cell(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return str(value)


def write_per_image_csv(path: str | Path, rows: Iterable[Mapping]) -> Path:
    """Write `rows` (dicts with the same keys, e.g. `per_image_rows`) as CSV at `path` (a folder: its
    `metrics_per_image.csv`), columns in the rows' key order; floats at full precision, NaN as an empty cell.
    Returns the file written."""
    path = Path(path)
    if path.is_dir():
        path = path / PER_IMAGE_FILE_NAME
    rows = list(rows)
    columns = list(rows[0]) if rows else list(IDENTITY_COLUMNS)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell(row[column]) for column in columns])
    return path
