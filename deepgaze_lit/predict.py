"""Prediction output: per image a `.npy` log density and a PNG heatmap overlay (`deepgaze_lit.rendering`).

`PredictionWriter` is the Lightning callback `deepgaze predict` adds.
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
from deepgaze_lit.rendering import density_overlay


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
