"""SaliencyMetrics: dataset metrics of one log density source (model, centre bias or true density), DDP-exact.

Use one instance per density, updated with the same batches: the model's, the centre bias's and, on synthetic
data, the true density's (the gold standard). `catalogue.with_centerbias_metrics` and `metrics.report` combine
their results. Which metrics it keeps is read from `catalogue.CATALOGUE`.

Every state is a float64 vector over the split's images holding SUMS of per-fixation values (or of per-image
map metrics) and counts, reduced across ranks by summation. Per-fixation means are totals / total counts and
per-image means average each image's sum / count, both formed only in `compute()`, so a 2-process evaluation
gives the 1-process numbers (bit for bit when each image is evaluated in one sample).

Map metrics (CC, KLDiv, MIT KLDiv, SIM against the gold-standard fixation map) need all fixations of an image at
once. They are computed for samples whose `weight` is 1 (or when `weight` is None): per the batch contract
that is every per-image sample, and a per-fixation sample only when its image has a single fixation. A
per-fixation evaluation therefore reports them only over such images (`n_map_images` says how many).
"""

import torch
from torchmetrics import Metric

from deepgaze_lit.metrics.catalogue import CATALOGUE, FIXATION, FixationBatch
from deepgaze_lit.metrics.functional import blurred_fixation_map, fixation_flat_indices, gaussian_blur_operator
from deepgaze_lit.metrics.shuffle_pool import ShufflePool


class SaliencyMetrics(Metric):
    """Accumulates the catalogue's per-fixation metrics (sAUC only with a pool) and its map metrics (only with a
    gold kernel).

    Args:
        shuffle_pool: all fixations of the split for sAUC negatives: a `ShufflePool`, or the tuple
            (x_rel, y_rel, n) of positions relative to their own image (x / W, y / H) and image indices.
            None skips sAUC.
        gold_kernel_size: standard deviation in pixels (of the evaluated images) of the gold-standard fixation
            map's Gaussian (pysaliency `FixationMap`). None skips CC, KLDiv, MIT KLDiv and SIM.
        num_images: number of images of the split; `image_index` values must lie in [0, num_images).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, shuffle_pool=None, gold_kernel_size: float | None = None, *, num_images: int, **kwargs):
        super().__init__(**kwargs)
        if int(num_images) < 1:
            raise ValueError(f"SaliencyMetrics needs num_images >= 1 (the split's image count), got {num_images}")
        if gold_kernel_size is not None and not gold_kernel_size > 0:
            raise ValueError(f"gold_kernel_size must be a positive number of pixels or None, got {gold_kernel_size}")
        self.num_images = int(num_images)
        self.shuffle_pool = None if shuffle_pool is None else ShufflePool.coerce(shuffle_pool)
        self.gold_kernel_size = gold_kernel_size
        self._blur_operators: dict[tuple[int, str], torch.Tensor] = {}
        self.fixation_metrics = tuple(
            entry for entry in CATALOGUE
            if entry.kind == FIXATION and (self.shuffle_pool is not None or not entry.needs_shuffle_pool)
        )
        self.map_metrics = tuple(
            entry for entry in CATALOGUE if entry.needs_gold_map and self.gold_kernel_size is not None
        )
        for name in self._state_names():
            self.add_state(name, torch.zeros(self.num_images, dtype=torch.float64), dist_reduce_fx="sum")

    def _state_names(self) -> list[str]:
        """`fixation_count`, `<name>_sum` per metric, `<name>_count` per metric that may be undefined and
        `map_count` with map metrics."""
        names = ["fixation_count"]
        for entry in self.fixation_metrics:
            names += [f"{entry.name}_count", f"{entry.name}_sum"] if entry.may_be_undefined else [f"{entry.name}_sum"]
        if self.map_metrics:
            names += ["map_count"] + [f"{entry.name}_sum" for entry in self.map_metrics]
        return names

    def _add(self, name: str, image: torch.Tensor, values: torch.Tensor) -> None:
        """state[image] += values, out of place (safe under torch.inference_mode)."""
        setattr(self, name, getattr(self, name).index_add(0, image, values.to(torch.float64)))

    def _blur_operator(self, size: int, device: torch.device) -> torch.Tensor:
        key = (size, str(device))
        if key not in self._blur_operators:
            self._blur_operators[key] = gaussian_blur_operator(size, self.gold_kernel_size, device)
        return self._blur_operators[key]

    def update(
        self,
        log_density: torch.Tensor,
        fix_batch: torch.Tensor,
        fix_x: torch.Tensor,
        fix_y: torch.Tensor,
        image_index: torch.Tensor,
        weight: torch.Tensor | None = None,
    ) -> None:
        """Add one batch: `log_density` (B,H,W) or (B,1,H,W) in nats; fixations as in the batch dict
        (`fix_batch` (K,) sample of each fixation, `fix_x`, `fix_y` (K,) pixels); `image_index` (B,)
        the images' indices in the split; `weight` (B,) sample weights (only `weight == 1` is read, see module)."""
        log_density = _as_batch_log_density(log_density)
        batch_size, height, width = log_density.shape
        device = log_density.device
        fix_batch = fix_batch.to(device=device, dtype=torch.int64)
        image_index = image_index.to(device=device, dtype=torch.int64)
        if image_index.shape != (batch_size,):
            raise ValueError(f"image_index must have shape ({batch_size},), got {tuple(image_index.shape)}")
        if bool((image_index < 0).any()) or bool((image_index >= self.num_images).any()):
            raise ValueError(
                f"image_index {image_index.tolist()} outside [0, {self.num_images}): construct SaliencyMetrics "
                "with num_images = the number of images of the evaluated split"
            )
        if fix_batch.numel() == 0:
            return
        flat = fixation_flat_indices(fix_x, fix_y, (height, width)).to(device)
        fix_image = image_index[fix_batch]
        batch = FixationBatch(log_density, log_density.exp(), fix_batch, flat, image_index, self.shuffle_pool)
        self._add("fixation_count", fix_image, torch.ones(flat.shape, dtype=torch.float64, device=device))
        for entry in self.fixation_metrics:
            values = entry.function(batch)
            if entry.may_be_undefined:
                defined = ~torch.isnan(values)
                self._add(f"{entry.name}_count", fix_image[defined], defined[defined])
                self._add(f"{entry.name}_sum", fix_image[defined], values[defined])
            else:
                self._add(f"{entry.name}_sum", fix_image, values)
        if self.map_metrics:
            self._update_map_metrics(batch.density, fix_batch, flat, image_index, weight)

    def _update_map_metrics(self, density, fix_batch, flat, image_index, weight) -> None:
        """The map metrics against the gold map of every sample carrying all its image's fixations."""
        batch_size, height, width = density.shape
        complete = torch.ones(batch_size, dtype=torch.bool, device=density.device)
        if weight is not None:
            complete = weight.to(density.device).flatten() == 1
        has_fixations = torch.bincount(fix_batch, minlength=batch_size) > 0
        row_operator = self._blur_operator(height, density.device)
        column_operator = self._blur_operator(width, density.device)
        for sample in (complete & has_fixations).nonzero().flatten().tolist():
            gold_map = blurred_fixation_map(flat[fix_batch == sample], (height, width), row_operator, column_operator)
            image = image_index[sample : sample + 1]
            self._add("map_count", image, torch.ones(1, device=density.device))
            for entry in self.map_metrics:
                self._add(f"{entry.name}_sum", image, entry.function(density[sample], gold_map).reshape(1))

    def compute(self) -> dict[str, float]:
        """Means per fixation (`*_fixation`) and per image (`*_image`, images with fixations count once), plus
        `n_fixations`, `n_images` (and `n_map_images` with a gold kernel). LL in nats, IG vs uniform in bit/fix."""
        counts = self.fixation_count
        result = {"n_fixations": float(counts.sum()), "n_images": float((counts > 0).sum())}
        for entry in self.fixation_metrics:
            own_counts = getattr(self, f"{entry.name}_count") if entry.may_be_undefined else counts
            result.update(_fixation_and_image_means(entry.name, getattr(self, f"{entry.name}_sum"), own_counts))
        if self.map_metrics:
            evaluated = self.map_count > 0
            result["n_map_images"] = float(evaluated.sum())
            for entry in self.map_metrics:
                per_image = getattr(self, f"{entry.name}_sum")[evaluated] / self.map_count[evaluated]
                result[f"{entry.name}_image"] = float(per_image.mean())
        return result


    def per_image(self) -> dict[str, torch.Tensor]:
        """Per image of the split (index = `image_index`), float64 (num_images,) tensors on the CPU: `n_fixations`
        and each kept metric's mean over the image's fixations (or its map value), keyed by the metric's name;
        NaN where undefined (no fixations, sAUC without negatives, map metrics of an image without a complete
        sample). Summed across ranks first, so it is collective under DDP: call it on every rank."""
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync,
                               should_unsync=self._should_unsync):
            counts = self.fixation_count.cpu()
            result = {"n_fixations": counts.clone()}
            for entry in self.fixation_metrics:
                own_counts = getattr(self, f"{entry.name}_count").cpu() if entry.may_be_undefined else counts
                result[entry.name] = _per_image_mean(getattr(self, f"{entry.name}_sum").cpu(), own_counts)
            if self.map_metrics:
                for entry in self.map_metrics:
                    result[entry.name] = _per_image_mean(getattr(self, f"{entry.name}_sum").cpu(),
                                                         self.map_count.cpu())
        return result


def _per_image_mean(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """sums / counts per image, NaN where the count is 0."""
    return torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, float("nan")))


def _fixation_and_image_means(metric: str, sums: torch.Tensor, counts: torch.Tensor) -> dict[str, float]:
    """pysaliency's averages: over all fixations, and over images (with fixations) of each image's mean."""
    seen = counts > 0
    return {
        f"{metric}_fixation": float(sums.sum() / counts.sum()),
        f"{metric}_image": float((sums[seen] / counts[seen]).mean()),
    }


def _as_batch_log_density(log_density: torch.Tensor) -> torch.Tensor:
    """(B,H,W) or (B,1,H,W) log density -> (B,H,W) float64, detached."""
    if log_density.dim() == 4 and log_density.shape[1] == 1:
        log_density = log_density[:, 0]
    if log_density.dim() != 3:
        raise ValueError(
            f"SaliencyMetrics.update expects a log density of shape (B,H,W) or (B,1,H,W), got "
            f"{tuple(log_density.shape)}; pass BlockLogDensity.full() for the network's output"
        )
    return log_density.detach().to(torch.float64)

