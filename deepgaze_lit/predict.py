"""Prediction output: per image a `.npy` log density and a PNG heatmap overlay.

`PredictionWriter` is the Lightning callback `deepgaze predict` adds; `density_overlay` and `draw_fixations`
render a log density over its image (also used for the validation image panel in TensorBoard).
"""

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image

from deepgaze_lit.batch import PredictBatch
from deepgaze_lit.data.images import load_rgb
from deepgaze_lit.data.resize import resize_log_density

# Anchor colours (RGB 0..255) of a dark-to-bright heat colour map, evenly spaced over [0, 1].
_HEAT_ANCHORS = np.array(
    [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]],
    dtype=np.float64,
)


def heat_colours(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (any shape S) to RGB colours (S + (3,)) as float64 0..255."""
    positions = np.clip(values, 0.0, 1.0) * (len(_HEAT_ANCHORS) - 1)
    lower = np.minimum(positions.astype(np.int64), len(_HEAT_ANCHORS) - 2)
    fraction = (positions - lower)[..., None]
    return _HEAT_ANCHORS[lower] * (1.0 - fraction) + _HEAT_ANCHORS[lower + 1] * fraction


def density_overlay(image: np.ndarray, log_density: np.ndarray, opacity: float = 0.6) -> np.ndarray:
    """Blend a log density (H,W) in nats, shown relative to its maximum, over an image (H,W,3), (H,W,1) or (H,W)
    uint8. Returns (H,W,3) uint8.
    """
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    if image.shape[:2] != log_density.shape:
        raise ValueError(f"image size {image.shape[:2]} differs from the log density's {log_density.shape}")
    relative = np.exp(log_density.astype(np.float64) - log_density.max())
    blended = (1.0 - opacity) * image.astype(np.float64) + opacity * heat_colours(relative)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def draw_fixations(image: np.ndarray, xs: np.ndarray, ys: np.ndarray, radius: int = 2) -> np.ndarray:
    """Return a copy of `image` (H,W,3) uint8 with a cyan square of half-size `radius` pixels at each fixation."""
    marked = image.copy()
    height, width = marked.shape[:2]
    for x, y in zip(np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)):
        column, row = int(x), int(y)
        marked[max(row - radius, 0) : min(row + radius + 1, height),
               max(column - radius, 0) : min(column + radius + 1, width)] = (0, 255, 255)
    return marked


class PredictionWriter(BasePredictionWriter):
    """Write `<stem>.npy` (float32 (H,W) log density in nats at the input file's size) and `<stem>.png` (heatmap
    overlay on the input image) for every image of a predict batch into `output_dir`.

    Expects `PredictBatch`es (`image`, `path`, `original_shape` are used) and the module's `predict_step`
    returning the log density (B,1,H,W) at the network input size. A density predicted on a resized image is
    resized back (bilinear, renormalised).
    """

    def __init__(self, output_dir: str) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self._written_stems: dict[str, str] = {}

    def write_on_batch_end(
        self,
        trainer: Any,
        pl_module: Any,
        prediction: torch.Tensor,
        batch_indices: Optional[Sequence[int]],
        batch: PredictBatch,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        log_densities = prediction.detach().double().cpu().numpy()[:, 0]
        images = batch["image"].detach().cpu().numpy().transpose(0, 2, 3, 1)
        for path, image, log_density, shape in zip(batch["path"], images, log_densities, batch["original_shape"]):
            stem = self._unique_stem(path)
            shape = tuple(int(side) for side in shape)
            if log_density.shape != shape:
                log_density = resize_log_density(log_density, shape)
                image = load_rgb(path)
            np.save(self.output_dir / f"{stem}.npy", log_density.astype(np.float32))
            Image.fromarray(density_overlay(image, log_density)).save(self.output_dir / f"{stem}.png")

    def _unique_stem(self, path: str) -> str:
        stem = Path(path).stem
        previous = self._written_stems.setdefault(stem, path)
        if previous != path:
            raise ValueError(
                f"{path} and {previous} would both be written as {stem}.npy in {self.output_dir}: "
                "rename one of them or predict the folders separately"
            )
        return stem
