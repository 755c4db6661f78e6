"""Saliency metrics with pysaliency's conventions: per-image functions, a DDP-exact accumulator, a report.

Per image: `log_likelihood`, `information_gain`, `nss`, `auc`, `sauc` take a log density (H,W) in nats and
fixations `xs`, `ys` (K,) in pixels and return one value per fixation; `cc`, `kldiv`, `mit_kldiv`, `sim` compare
two maps; `fixation_map` builds the gold-standard map. Datasets: `SaliencyMetrics`, `information_gain_bits`,
`build_report` / `write_report`, the per-image table `per_image_rows` / `write_per_image_csv` and the report's
`build_provenance`; a split's whole evaluation: `Evaluation`. Every metric is listed once, in
`catalogue.CATALOGUE`.
"""

from deepgaze_lit.metrics.accumulator import SaliencyMetrics
from deepgaze_lit.metrics.catalogue import CATALOGUE, MetricEntry, information_gain_bits
from deepgaze_lit.metrics.evaluation import Evaluation, evaluation_scalars
from deepgaze_lit.metrics.functional import (
    auc,
    cc,
    fixation_map,
    information_gain,
    kldiv,
    log_likelihood,
    mit_kldiv,
    nss,
    sauc,
    sim,
)
from deepgaze_lit.metrics.per_image import per_image_rows, write_per_image_csv
from deepgaze_lit.metrics.provenance import build_provenance
from deepgaze_lit.metrics.report import build_report, write_report
from deepgaze_lit.metrics.shuffle_pool import ShufflePool

__all__ = [
    "CATALOGUE",
    "Evaluation",
    "MetricEntry",
    "SaliencyMetrics",
    "ShufflePool",
    "auc",
    "build_provenance",
    "build_report",
    "cc",
    "evaluation_scalars",
    "fixation_map",
    "information_gain",
    "information_gain_bits",
    "kldiv",
    "log_likelihood",
    "mit_kldiv",
    "nss",
    "per_image_rows",
    "sauc",
    "sim",
    "write_per_image_csv",
    "write_report",
]
