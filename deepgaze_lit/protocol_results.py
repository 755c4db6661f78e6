"""Results of the cross-validated protocol: per-image metrics of one fold's test chunk, their pooling over folds,
and the provenance every result file records.

A fold's evaluation (`deepgaze test` of the fold's final model on the fold's test chunk) writes, through the
`PerImageMetrics` callback, `metrics_per_image.csv` (the model) and `centerbias_per_image.csv` (the centre bias
of the same fixations) with the columns of `COLUMNS`, and `provenance.json`. `pooled_report` reads every fold's
files and writes the cross-validated report: every image scored once, by the one model that never saw it.

Units: LL in nats per fixation, IG over the centre bias in bit per fixation; NSS, AUC, sAUC per fixation; CC,
KLDiv, SIM per image against the gold-standard fixation map (empty where the evaluation did not compute them: with
per-fixation targets only images with one target fixation have them, see `metrics.accumulator`).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Optional

import lightning as L
import numpy as np

import deepgaze_lit
from deepgaze_lit.metrics.evaluation import CENTERBIAS, MODEL
from deepgaze_lit.metrics.per_image import PER_IMAGE_FILE_NAME, per_image_rows, write_per_image_csv
from deepgaze_lit.metrics.provenance import file_sha256

PER_IMAGE_FILE = PER_IMAGE_FILE_NAME
CENTERBIAS_PER_IMAGE_FILE = "centerbias_per_image.csv"
PROVENANCE_FILE = "provenance.json"
REPORT_FILE = "crossval_report.json"
REPORT_TABLE_FILE = "crossval_report.txt"

METRICS = ("LL", "IG", "NSS", "AUC", "sAUC", "CC", "KLDiv", "SIM")
"""Per-image metric columns, in order (units in the module docstring)."""
PER_FIXATION_METRICS = ("LL", "IG", "NSS", "AUC", "sAUC")
"""Metrics with one value per fixation: their per-fixation pooling weights each image by its fixations."""
COLUMNS = ("image", "image_id", "fold", "fixations") + METRICS
DATA_SETTINGS = ("source", "path", "val_path", "split", "fold", "folds", "resize", "max_side", "centerbias",
                 "centerbias_template", "centerbias_bandwidth", "centerbias_eps", "history", "targets",
                 "initial_fixation")
"""The DataModule settings a result's provenance records (those it has)."""


def checkpoint_provenance(path: str | Path) -> dict[str, str]:
    """The checkpoint's path and content hash."""
    return {"checkpoint": str(path), "checkpoint_sha256": file_sha256(path)}


CATALOGUE_NAMES = {"LL": "ll_nats", "IG": "ig_centerbias_bits", "NSS": "nss", "AUC": "auc", "sAUC": "sauc",
                   "CC": "cc", "KLDiv": "kldiv", "SIM": "sim"}
"""The metric catalogue's name (`metrics.per_image` columns) of each of `METRICS`."""


def fold_rows(per_image: list[dict], fold: int) -> list[dict]:
    """Rows with the protocol's `COLUMNS` from `metrics.per_image.per_image_rows` of one fold's test chunk; a metric
    the evaluation did not compute is NaN."""
    return [{"image": row["image"], "image_id": row["image_id"], "fold": fold, "fixations": row["fixations"],
             **{metric: row.get(name, math.nan) for metric, name in CATALOGUE_NAMES.items()}} for row in per_image]


def write_rows(path: Path, rows: list[dict]) -> None:
    """Write per-image rows (dicts with the keys of `COLUMNS`) as CSV in that column order; NaN as an empty cell."""
    write_per_image_csv(path, [{column: row[column] for column in COLUMNS} for row in rows])


def read_rows(path: Path) -> list[dict]:
    """Per-image rows of a CSV written by `write_rows` (numbers as float, NaN for empty cells)."""
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
    parsed = []
    for row in rows:
        entry = {"image": row["image"], "image_id": int(row["image_id"]), "fold": int(row["fold"]),
                 "fixations": float(row["fixations"])}
        entry.update({metric: float(row[metric]) if row[metric] else math.nan for metric in METRICS})
        parsed.append(entry)
    return parsed


class PerImageMetrics(L.Callback):
    """After `deepgaze test`: the per-image metrics of the model and of the centre bias on the test split, and the
    provenance, written into `output_dir` by rank 0 (the accumulators' states are summed over ranks first).

    Args:
        output_dir: folder of `metrics_per_image.csv`, `centerbias_per_image.csv` and `provenance.json`.
        fold: the cross-validation fold whose test chunk is scored (the CSV's `fold` column).
        checkpoint: the weights scored (recorded with their sha256).
        component: the mixture component scored (released weights), or None.
    """

    def __init__(self, output_dir: str, fold: int, checkpoint: str, component: Optional[int] = None):
        self.output_dir = Path(output_dir)
        self.fold = fold
        self.checkpoint = checkpoint
        self.component = component

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        accumulators = pl_module.evaluation.accumulators
        model = accumulators[MODEL].per_image()  # collective: every rank
        centerbias = accumulators[CENTERBIAS].per_image()
        if not trainer.is_global_zero:
            return
        split = trainer.datamodule.split_dataset("test")
        names = ([Path(path).name for path in split.image_paths] if split.image_paths
                 else [f"image{int(image_id)}" for image_id in split.image_ids])
        for density, file_name in ((model, PER_IMAGE_FILE), (centerbias, CENTERBIAS_PER_IMAGE_FILE)):
            rows = per_image_rows(density, centerbias, names, split.image_ids)
            write_rows(self.output_dir / file_name, fold_rows(rows, self.fold))
        hparams = trainer.datamodule.hparams
        provenance = {
            "package_version": deepgaze_lit.__version__,
            **checkpoint_provenance(self.checkpoint),
            "component": self.component,
            "data": {key: hparams[key] for key in DATA_SETTINGS if key in hparams},
            "test_images": split.n_images,
            "image_sizes": sorted({tuple(int(side) for side in shape) for shape in split.shapes}),
        }
        (self.output_dir / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, default=str) + "\n")


def _pool(rows: list[dict], folds: list[int]) -> dict[str, dict[str, Optional[float]]]:
    """Per metric: mean over fixations (per-fixation metrics), mean over images, and the mean and standard error
    over folds of each fold's per-image mean."""
    fixations = np.array([row["fixations"] for row in rows])
    pooled = {}
    for metric in METRICS:
        values = np.array([row[metric] for row in rows])
        defined = ~np.isnan(values)
        entry: dict[str, Optional[float]] = {"per_image": float(values[defined].mean()) if defined.any() else None,
                                             "per_fixation": None}
        if metric in PER_FIXATION_METRICS and defined.any():
            entry["per_fixation"] = float((values * fixations)[defined].sum() / fixations[defined].sum())
        fold_means = []
        for fold in folds:
            in_fold = defined & np.array([row["fold"] == fold for row in rows])
            if in_fold.any():
                fold_means.append(float(values[in_fold].mean()))
        entry["fold_mean"] = float(np.mean(fold_means)) if fold_means else None
        entry["fold_standard_error"] = (float(np.std(fold_means, ddof=1) / math.sqrt(len(fold_means)))
                                        if len(fold_means) > 1 else None)
        pooled[metric] = entry
    return pooled


def _table(report: dict) -> str:
    lines = [["metric", "model per fix", "model per image", "model folds mean", "+- s.e.",
              "centre bias per fix", "centre bias per image"]]

    def number(value):
        return "-" if value is None else f"{value:.4f}"

    for metric in METRICS:
        model, centerbias = report["model"][metric], report["centerbias"][metric]
        lines.append([metric, number(model["per_fixation"]), number(model["per_image"]), number(model["fold_mean"]),
                      number(model["fold_standard_error"]), number(centerbias["per_fixation"]),
                      number(centerbias["per_image"])])
    widths = [max(len(line[column]) for line in lines) for column in range(len(lines[0]))]
    text = "\n".join("  ".join([line[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in
                                                              zip(line[1:], widths[1:])]) for line in lines)
    return (text + f"\n{report['images']} images ({report['fixations']:.0f} fixations) in {len(report['folds'])} "
            "folds, each scored by the one fold model that never saw it\n")


def pooled_report(fold_dirs: dict[int, Path], output_dir: Path) -> dict:
    """Pool the fold evaluations in `fold_dirs` (fold -> folder written by `PerImageMetrics`) into `output_dir`:
    `crossval_report.json` / `.txt` and `metrics_per_image.csv` of all images. Raises ValueError when an image
    was scored by two folds."""
    model_rows, centerbias_rows, provenance = [], [], {}
    for fold, folder in sorted(fold_dirs.items()):
        model_rows += read_rows(folder / PER_IMAGE_FILE)
        centerbias_rows += read_rows(folder / CENTERBIAS_PER_IMAGE_FILE)
        provenance[str(fold)] = json.loads((folder / PROVENANCE_FILE).read_text())
    image_ids = [row["image_id"] for row in model_rows]
    if len(set(image_ids)) != len(image_ids):
        twice = sorted({image for image in image_ids if image_ids.count(image) > 1})
        raise ValueError(f"images {twice[:8]} were scored by more than one fold: the folds' test chunks overlap")
    folds = sorted(fold_dirs)
    report = {"model": _pool(model_rows, folds), "centerbias": _pool(centerbias_rows, folds), "folds": folds,
              "images": len(model_rows), "fixations": float(sum(row["fixations"] for row in model_rows)),
              "package_version": deepgaze_lit.__version__, "provenance": provenance}
    output_dir.mkdir(parents=True, exist_ok=True)
    write_rows(output_dir / PER_IMAGE_FILE, sorted(model_rows, key=lambda row: row["image_id"]))
    (output_dir / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str) + "\n")
    (output_dir / REPORT_TABLE_FILE).write_text(_table(report))
    return report
