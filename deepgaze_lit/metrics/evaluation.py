"""Evaluation of one split: the model's loss and metrics beside the model-independent references, DDP-exact.

The references are the centre bias and, where the split knows it (synthetic data), the true density (the gold
standard). They do not depend on the model, so once one complete evaluation of the split has computed them they are
kept and not accumulated again. The caller (the LightningModule) decides what counts as complete (not Lightning's
sanity check), resets at the START of every evaluation under that evaluation's grad mode (states zeroed under
`deepgaze validate`'s inference mode could not be updated later by fit's validation), logs `evaluation_scalars`
and writes the report with `write_evaluation_report` where it should.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torchmetrics import MeanMetric

from deepgaze_lit.metrics.accumulator import SaliencyMetrics
from deepgaze_lit.metrics.catalogue import CATALOGUE, IG_CENTERBIAS, with_centerbias_metrics
from deepgaze_lit.metrics.per_image import per_image_rows, write_per_image_csv
from deepgaze_lit.metrics.report import write_report
from deepgaze_lit.metrics.shuffle_pool import ShufflePool

MODEL = "model"
CENTERBIAS = "centerbias"
GOLD = "gold"


class Evaluation(torch.nn.Module):
    """The accumulators of one split's evaluation (torchmetrics states: summed across ranks when computed).

    Args:
        shuffle_pool: the split's target fixations (sAUC negatives).
        num_images: number of images of the split (batches' `image_index` lies in [0, num_images)).
        true_log_densities: per image of the split its true (H,W) log density in nats, or None when unknown.
        gold_kernel_size: standard deviation (pixels) of the gold-standard fixation map for the map metrics; None
            leaves them out.
    """

    def __init__(
        self,
        shuffle_pool: ShufflePool,
        num_images: int,
        true_log_densities: Optional[Sequence[np.ndarray]] = None,
        gold_kernel_size: Optional[float] = None,
    ) -> None:
        super().__init__()
        self.loss = MeanMetric().set_dtype(torch.float64)  # float64 sums: DDP gives the 1-process value
        sources = [MODEL, CENTERBIAS] + ([GOLD] if true_log_densities is not None else [])
        self.accumulators = torch.nn.ModuleDict(
            {source: SaliencyMetrics(shuffle_pool, gold_kernel_size, num_images=num_images) for source in sources}
        )
        self.true_log_densities = true_log_densities
        self.reference_results: Optional[dict[str, dict[str, float]]] = None

    def reset(self) -> None:
        """Zero the loss and the model's accumulator, and the references' while their results are not kept."""
        self.loss.reset()
        for source, metrics in self.accumulators.items():
            if source == MODEL or self.reference_results is None:
                metrics.reset()

    def update(self, batch: dict, log_density: torch.Tensor, ll_bits: torch.Tensor, counts: torch.Tensor) -> None:
        """Add one evaluation batch (the batch dict of ARCHITECTURE.md): the model's `log_density` (B,1,H,W) in
        nats, its per-sample IG over uniform `ll_bits` (B,) in bit/fix and target fixation `counts` (B,)
        (`loss.fixation_log_likelihood_bits`); the loss averages -ll_bits with the samples' `weight`."""
        has_fixations = counts > 0
        self.loss.update(-ll_bits[has_fixations], batch["weight"].float()[has_fixations])
        fixations = (batch["fix_batch"], batch["fix_x"], batch["fix_y"], batch["image_index"], batch["weight"])
        self.accumulators[MODEL].update(log_density, *fixations)
        if self.reference_results is not None:
            return
        self.accumulators[CENTERBIAS].update(batch["centerbias"], *fixations)
        if GOLD in self.accumulators:
            true_log_density = torch.stack(
                [torch.as_tensor(self.true_log_densities[index]) for index in batch["image_index"].tolist()]
            ).to(log_density.device)
            self.accumulators[GOLD].update(true_log_density, *fixations)

    def compute(self, complete: bool) -> tuple[dict[str, dict[str, float]], float]:
        """Results per source ("model", "centerbias", "gold" with a true density; `SaliencyMetrics.compute()`
        dicts) and the loss in bit/fix. `complete`: this was a complete pass over the split, so the references'
        results are kept for later evaluations."""
        results = {MODEL: self.accumulators[MODEL].compute()}
        references = self.reference_results
        if references is None:
            references = {
                source: metrics.compute() for source, metrics in self.accumulators.items() if source != MODEL
            }
            if complete:
                self.reference_results = references
        results.update(references)
        return results, float(self.loss.compute())

    def per_image_rows(self, image_names: Sequence[str], image_ids: Sequence[int]) -> list[dict]:
        """The model's per-image table (`metrics.per_image`) of the last evaluation, image i of the split named
        `image_names[i]` with source index `image_ids[i]`. Collective under DDP: call it on every rank."""
        return per_image_rows(self.accumulators[MODEL].per_image(), self.accumulators[CENTERBIAS].per_image(),
                              image_names, image_ids)


def evaluation_scalars(results: dict[str, dict[str, float]], loss: float) -> dict[str, float]:
    """Scalars logged after an evaluation, all averaged over images as the loss is (bit/fix): `loss`, then per
    catalogue entry with a `tag` the model's value as `<tag>` and the other densities' of `also_logged_for` as
    `<density>_<tag>`; with a true density the share of its IG over the centre bias that the model reaches
    (`ig_explained`)."""
    centerbias = results[CENTERBIAS]
    densities = {source: with_centerbias_metrics(result, centerbias) for source, result in results.items()}
    scalars = {"loss": loss}
    for entry in CATALOGUE:
        if entry.tag is None or f"{entry.name}_image" not in densities[MODEL]:
            continue
        scalars[entry.tag] = densities[MODEL][f"{entry.name}_image"]
        for source in entry.also_logged_for:
            if source in densities:
                scalars[f"{source}_{entry.tag}"] = densities[source][f"{entry.name}_image"]
    if GOLD in densities:
        scalars["ig_explained"] = (
            densities[MODEL][f"{IG_CENTERBIAS}_image"] / densities[GOLD][f"{IG_CENTERBIAS}_image"]
        )
    return scalars


def write_evaluation_report(directory, results: dict[str, dict[str, float]], provenance: Optional[dict] = None,
                            rows: Optional[list[dict]] = None) -> str:
    """Write `metrics.json` (with `provenance`, see `metrics.provenance`) and `metrics.txt` of `results` (as
    returned by `Evaluation.compute`) into `directory`, and `metrics_per_image.csv` of `rows`
    (`Evaluation.per_image_rows`) when given; return the table."""
    write_report(directory, results[MODEL], results[CENTERBIAS], results.get(GOLD), provenance)
    if rows is not None:
        write_per_image_csv(directory, rows)
    return (Path(directory) / "metrics.txt").read_text()
