"""The metric catalogue: one table of every evaluation metric, read by the accumulator, the logging and the report.

To add a metric, add its `MetricEntry` to `CATALOGUE` (and its function to `functional.py`): `SaliencyMetrics`
keeps its sums, `evaluation.evaluation_scalars` logs it when it has a `tag`, and `report.build_report` gives it a
row. A density's results are the dict of `SaliencyMetrics.compute()`: `<name>_fixation` (mean over fixations)
and `<name>_image` (mean over images of each image's mean) for every entry; map metrics have `<name>_image` only.

Kinds of entries:
- `FIXATION`: one value per fixation; `function(FixationBatch) -> (K,)` float64.
- `MAP`: one value per image against the gold-standard fixation map (needs a gold kernel);
  `function(saliency map (H,W), gold map (H,W)) -> 0-dim` float64.
- `OVER_CENTERBIAS`: derived from a density's results and the centre bias's results of the same fixations;
  `function(result, centerbias_result) -> {"fixation": float, "image": float}`.
"""

from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch

from deepgaze_lit.metrics.functional import (
    LN2,
    batch_auc,
    batch_log_likelihoods,
    batch_nss,
    batch_sauc,
    cc,
    ig_uniform_bits,
    kldiv,
    mit_kldiv,
    sim,
)
from deepgaze_lit.metrics.shuffle_pool import ShufflePool

FIXATION = "fixation"
MAP = "map"
OVER_CENTERBIAS = "over_centerbias"
AVERAGES = ("fixation", "image")
"""The two averages of every metric: over all fixations, and over images of each image's mean."""


@dataclass(frozen=True)
class FixationBatch:
    """One evaluated batch as the per-fixation metric functions read it."""

    log_density: torch.Tensor
    """(B,H,W) float64 log density in nats."""
    density: torch.Tensor
    """(B,H,W) float64, exp(log_density)."""
    fix_batch: torch.Tensor
    """(K,) int64 sample of each fixation."""
    flat: torch.Tensor
    """(K,) int64 flat pixel index int(y) * W + int(x) of each fixation."""
    image_index: torch.Tensor
    """(B,) int64 index of each sample's image in the split."""
    shuffle_pool: Optional[ShufflePool]
    """The split's fixations (sAUC negatives), or None."""


@dataclass(frozen=True)
class MetricEntry:
    """One metric of the catalogue.

    Attributes:
        name: key stem of its results (`<name>_fixation`, `<name>_image`).
        label: its row in the report's table, with units.
        kind: `FIXATION`, `MAP` or `OVER_CENTERBIAS` (module docstring), with the function's signature.
        function: computes it (signature by kind).
        tag: logged as `<split>/<tag>` (the per-image average, as the loss); None: in the report only.
        also_logged_for: other densities whose value is logged too, as `<density>_<tag>` ("centerbias", "gold").
        needs_shuffle_pool: computed only when the accumulator has a shuffle pool.
        may_be_undefined: NaN marks fixations it is undefined for; it counts its own defined fixations
            (`<name>_count`) instead of sharing the count of all fixations.
    """

    name: str
    label: str
    kind: Literal["fixation", "map", "over_centerbias"]
    function: Callable
    tag: Optional[str] = None
    also_logged_for: tuple[str, ...] = ()
    needs_shuffle_pool: bool = False
    may_be_undefined: bool = False

    @property
    def needs_gold_map(self) -> bool:
        """Whether it compares with the gold-standard fixation map (computed only with a gold kernel)."""
        return self.kind == MAP


def information_gain_bits(model_result: dict[str, float], baseline_result: dict[str, float]) -> dict[str, float]:
    """Information gain of a model over a baseline (e.g. the centre bias) in bit/fix, as pysaliency:
    `ig_bits_fixation` = mean over fixations of the LL difference, `ig_bits_image` = mean over images of each
    image's mean difference. Both results must come from the same fixations."""
    for count in ("n_fixations", "n_images"):
        if model_result[count] != baseline_result[count]:
            raise ValueError(
                f"model and baseline were evaluated on different fixations ({count}: {model_result[count]} vs "
                f"{baseline_result[count]}); update both accumulators with the same batches"
            )
    return {
        "ig_bits_fixation": (model_result["ll_nats_fixation"] - baseline_result["ll_nats_fixation"]) / LN2,
        "ig_bits_image": (model_result["ll_nats_image"] - baseline_result["ll_nats_image"]) / LN2,
    }


def _log_likelihood(batch: FixationBatch) -> torch.Tensor:
    return batch_log_likelihoods(batch.log_density, batch.fix_batch, batch.flat)


def _ig_uniform(batch: FixationBatch) -> torch.Tensor:
    height, width = batch.log_density.shape[1:]
    return ig_uniform_bits(_log_likelihood(batch), height * width)


def _nss(batch: FixationBatch) -> torch.Tensor:
    return batch_nss(batch.density, batch.fix_batch, batch.flat)


def _auc(batch: FixationBatch) -> torch.Tensor:
    return batch_auc(batch.density, batch.fix_batch, batch.flat)


def _shuffled_auc(batch: FixationBatch) -> torch.Tensor:
    """sAUC per fixation; NaN where its image has no negatives (no other image's fixation in the pool)."""
    device = batch.density.device
    excluded = batch.shuffle_pool.image_indices(device)[None, :] == batch.image_index[:, None]
    negatives = batch.shuffle_pool.flat_indices(tuple(batch.density.shape[1:]), device)
    return batch_sauc(batch.density, batch.fix_batch, batch.flat, negatives, excluded)


def _ig_over_centerbias(result: dict[str, float], centerbias: dict[str, float]) -> dict[str, float]:
    gain = information_gain_bits(result, centerbias)
    return {average: gain[f"ig_bits_{average}"] for average in AVERAGES}


IG_CENTERBIAS = "ig_centerbias_bits"
"""The entry whose model / gold ratio is the explained information gain."""

CATALOGUE = (
    MetricEntry("ll_nats", "log-likelihood (nats/fix)", FIXATION, _log_likelihood),
    MetricEntry("ig_uniform_bits", "IG vs uniform (bit/fix)", FIXATION, _ig_uniform, tag="ig_uniform",
                also_logged_for=("centerbias",)),
    MetricEntry(IG_CENTERBIAS, "IG vs centre bias (bit/fix)", OVER_CENTERBIAS, _ig_over_centerbias,
                tag="ig", also_logged_for=("gold",)),
    MetricEntry("nss", "NSS", FIXATION, _nss, tag="nss", also_logged_for=("centerbias",)),
    MetricEntry("auc", "AUC", FIXATION, _auc, tag="auc", also_logged_for=("centerbias",)),
    MetricEntry("sauc", "sAUC", FIXATION, _shuffled_auc, tag="sauc", needs_shuffle_pool=True, may_be_undefined=True),
    MetricEntry("cc", "CC", MAP, cc, tag="cc"),
    MetricEntry("kldiv", "KLDiv", MAP, kldiv, tag="kldiv"),
    MetricEntry("mit_kldiv", "MIT KLDiv", MAP, mit_kldiv, tag="mit_kldiv"),
    MetricEntry("sim", "SIM", MAP, sim, tag="sim"),
)
"""Every metric, in the report's row order."""

def with_centerbias_metrics(result: dict[str, float], centerbias: dict[str, float]) -> dict[str, float]:
    """`result` plus every `OVER_CENTERBIAS` metric against the centre bias's `centerbias` result."""
    derived = dict(result)
    for entry in CATALOGUE:
        if entry.kind == OVER_CENTERBIAS:
            values = entry.function(result, centerbias)
            derived.update({f"{entry.name}_{average}": values[average] for average in AVERAGES})
    return derived
