"""Evaluation report: the model's metrics beside the centre bias's (and the true density's, when known).

Inputs are `SaliencyMetrics.compute()` dicts of accumulators updated with the same batches: the model's, the
centre bias's and optionally the gold standard's (the true log density of synthetic data), from which the
gold-standard information gain over the centre bias and the fraction of it the model explains follow. One row per
entry of `catalogue.CATALOGUE`, in its order.
"""

import json
import math
from pathlib import Path

from deepgaze_lit.metrics.catalogue import AVERAGES, CATALOGUE, IG_CENTERBIAS, with_centerbias_metrics


def _json_safe(value):
    """Floats that JSON can hold: NaN and infinities become null."""
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan


def _format(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _align(lines: list[list[str]]) -> str:
    """Rows of cells as text columns: the first left-aligned, the numbers right-aligned."""
    widths = [max(len(line[column]) for line in lines) for column in range(len(lines[0]))]
    return "\n".join(
        "  ".join([line[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(line[1:], widths[1:])])
        for line in lines
    )


def _table(columns: dict[str, dict[str, float]], explained: dict[str, float] | None) -> str:
    header = ["metric"] + [f"{name} {average}" for name in columns for average in AVERAGES]
    lines = [header]
    for entry in CATALOGUE:
        values = [result.get(f"{entry.name}_{average}") for result in columns.values() for average in AVERAGES]
        if any(value is not None for value in values):
            lines.append([entry.label] + [_format(value) for value in values])
    for count in ("n_fixations", "n_images"):
        lines.append([count] + [f"{result[count]:.0f}" for result in columns.values() for _ in AVERAGES])
    text = _align(lines)
    if explained is not None:
        text += (
            f"\nexplained information gain (model / gold, over the centre bias): "
            f"{100 * explained['fixation']:.1f} % per fixation, {100 * explained['image']:.1f} % per image"
        )
    return text + "\n"


def build_report(
    model: dict[str, float], centerbias: dict[str, float], gold: dict[str, float] | None = None
) -> tuple[dict, str]:
    """JSON-able report and a readable table (metric; per-fixation and per-image values per density).

    With `gold` (the true density's results) the report adds the gold-standard IG over the centre bias and the
    explained fraction IG_model / IG_gold (both over the centre bias, bit/fix), per fixation and per image.
    """
    columns = {
        "model": with_centerbias_metrics(model, centerbias),
        "centre bias": with_centerbias_metrics(centerbias, centerbias),
    }
    report = {"model": columns["model"], "centerbias": columns["centre bias"]}
    explained = None
    if gold is not None:
        columns["gold"] = with_centerbias_metrics(gold, centerbias)
        report["gold"] = columns["gold"]
        explained = {
            average: _ratio(
                columns["model"][f"{IG_CENTERBIAS}_{average}"], columns["gold"][f"{IG_CENTERBIAS}_{average}"]
            )
            for average in AVERAGES
        }
        report["explained_information_gain"] = explained
    return _json_safe(report), _table(columns, explained)


def write_report(
    directory, model: dict[str, float], centerbias: dict[str, float], gold: dict[str, float] | None = None,
    provenance: dict | None = None,
) -> dict:
    """Write `metrics.json` and `metrics.txt` (the table) into `directory` (created if needed); return the report.
    `provenance` (`metrics.provenance.build_provenance`) is stored under `"provenance"` in the JSON."""
    report, table = build_report(model, centerbias, gold)
    if provenance is not None:
        report["provenance"] = _json_safe(provenance)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "metrics.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    (directory / "metrics.txt").write_text(table)
    return report
