"""Torch datasets producing the batches of `deepgaze_lit.batch` (`Batch` per image or per fixation) and their
collate functions."""

from __future__ import annotations

from typing import Literal, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from ..batch import HISTORY_LENGTH, Batch, central_history, missing_history
from .centerbias import CenterbiasModel
from .dataset import FixationDataset
from .errors import DataError
from .image_cache import SharedImageCache

HistoryMode = Literal["none", "dummy", "real"]


class CenterbiasTensors:
    """Centre-bias log densities as (H,W) float32 tensors: per shape, or per image for a model with one centre bias
    per image (`log_density_for_image`, the leave-one-image-out KDE), each computed once."""

    def __init__(self, model: CenterbiasModel):
        self.model = model
        self.per_image = hasattr(model, "log_density_for_image")
        self._tensors: dict[tuple[int, int], torch.Tensor] = {}
        self._images: dict[int, torch.Tensor] = {}

    def __call__(self, shape: Sequence[int]) -> torch.Tensor:
        """(H,W) float32 log density (nats) for `shape` (H, W)."""
        key = (int(shape[0]), int(shape[1]))
        if key not in self._tensors:
            self._tensors[key] = torch.from_numpy(self.model.log_density(key).astype(np.float32))
        return self._tensors[key]

    def for_image(self, image_id: int, shape: Sequence[int]) -> torch.Tensor:
        """(H,W) float32 log density (nats) of the image `image_id` (its index in the source) of `shape` (H, W):
        its own when the model has one per image, else the one of its shape."""
        if not self.per_image:
            return self(shape)
        image_id = int(image_id)
        if image_id not in self._images:
            self._images[image_id] = torch.from_numpy(self.model.log_density_for_image(image_id).astype(np.float32))
        return self._images[image_id]


def history_slots(mode: HistoryMode, shape: Sequence[int], x_hist: Optional[np.ndarray] = None,
                  y_hist: Optional[np.ndarray] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(HISTORY_LENGTH,) float32 x and y history slots (pixels) of one sample for an image of `shape` (H, W), most
    recent first, NaN = missing.

    `none`: all NaN. `dummy`: the central history (`batch.central_history`). `real`: the last HISTORY_LENGTH
    entries of the chronological, NaN-padded pysaliency history rows `x_hist`, `y_hist` of one fixation, reversed.
    """
    if mode == "dummy":
        xs, ys = central_history(1, int(shape[0]), int(shape[1]))
        return xs[0], ys[0]
    xs, ys = missing_history(1)
    xs, ys = xs[0], ys[0]
    if mode == "real":
        recorded = ~np.isnan(x_hist)
        recent_x = x_hist[recorded][::-1][:HISTORY_LENGTH]
        recent_y = y_hist[recorded][::-1][:HISTORY_LENGTH]
        xs[:len(recent_x)] = torch.from_numpy(recent_x.astype(np.float32))
        ys[:len(recent_y)] = torch.from_numpy(recent_y.astype(np.float32))
    return xs, ys


class _Samples(Dataset):
    """Common part: images through the shared cache, centre bias per shape, history encoding."""

    def __init__(self, dataset: FixationDataset, centerbias: CenterbiasTensors, history: HistoryMode,
                 image_cache: Optional[SharedImageCache] = None):
        if history == "real" and not dataset.has_history:
            raise DataError(f"{dataset.source}: history 'real' needs scanpaths (fixation order), which this data "
                            "does not record; use history 'dummy' or 'none'")
        self.dataset = dataset
        self.centerbias = centerbias
        self.history = history
        self.image_cache = image_cache

    def _load_channels_first(self, index: int) -> np.ndarray:
        return np.ascontiguousarray(self.dataset.load_image(index).transpose(2, 0, 1))

    def _image(self, index: int) -> torch.Tensor:
        """(3,H,W) uint8 image `index` of the dataset."""
        if self.image_cache is None:
            return torch.from_numpy(self._load_channels_first(index))
        image_id = int(self.dataset.image_ids[index])
        return torch.from_numpy(self.image_cache.get(image_id, lambda: self._load_channels_first(index)))

    def _sample(self, index: int, fixations: np.ndarray, weight: float) -> dict:
        """Sample dict of image `index` with target `fixations` (one fixation when history is 'real')."""
        shape = tuple(int(side) for side in self.dataset.shapes[index])
        if self.history == "real":
            x_hist, y_hist = history_slots("real", shape, self.dataset.x_hist[fixations[0]],
                                           self.dataset.y_hist[fixations[0]])
        else:
            x_hist, y_hist = history_slots(self.history, shape)
        return {
            "image": self._image(index),
            "centerbias": self.centerbias.for_image(self.dataset.image_ids[index], shape),
            "x_hist": x_hist,
            "y_hist": y_hist,
            "fix_x": torch.from_numpy(self.dataset.x[fixations].astype(np.float64)),
            "fix_y": torch.from_numpy(self.dataset.y[fixations].astype(np.float64)),
            "weight": weight,
            "image_index": index,
        }


class ImageSamples(_Samples):
    """One sample per image holding all its target fixations (weight 1: images weighted equally).

    Images without target fixations are skipped. History is `none` or `dummy` (one history per sample);
    `real` needs per-fixation samples.
    """

    def __init__(self, dataset: FixationDataset, centerbias: CenterbiasTensors, history: HistoryMode,
                 image_cache: Optional[SharedImageCache] = None):
        if history == "real":
            raise ValueError("history 'real' needs targets 'fixation' (every fixation has its own history)")
        super().__init__(dataset, centerbias, history, image_cache)
        targets = np.flatnonzero(dataset.is_target)
        targets = targets[np.argsort(dataset.n[targets], kind="stable")]
        counts = np.bincount(dataset.n[targets], minlength=dataset.n_images)
        self.image_indices = np.flatnonzero(counts)
        self.fixations = np.split(targets, np.cumsum(counts)[:-1])
        self.sample_shapes = dataset.shapes[self.image_indices]

    def __len__(self) -> int:
        return len(self.image_indices)

    def __getitem__(self, item: int) -> dict:
        index = int(self.image_indices[item])
        return self._sample(index, self.fixations[index], 1.0)


class FixationSamples(_Samples):
    """One sample per target fixation with its own history; weight 1/(target fixations of its image)."""

    def __init__(self, dataset: FixationDataset, centerbias: CenterbiasTensors, history: HistoryMode,
                 image_cache: Optional[SharedImageCache] = None):
        super().__init__(dataset, centerbias, history, image_cache)
        self.targets = np.flatnonzero(dataset.is_target)
        self.weights = 1.0 / dataset.targets_per_image()[dataset.n[self.targets]]
        self.sample_shapes = dataset.shapes[dataset.n[self.targets]]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, item: int) -> dict:
        fixation = int(self.targets[item])
        index = int(self.dataset.n[fixation])
        return self._sample(index, np.array([fixation]), float(self.weights[item]))


def _stack(samples: list[dict], key: str) -> torch.Tensor:
    """Stack one key of all samples with numpy (several times faster than torch.stack for large uint8 images).

    In a loader worker the result is written straight into shared memory, so handing the batch to the main
    process does not copy it again (as torch's default collate does).
    """
    arrays = [sample[key].numpy() for sample in samples]
    out = torch.empty((len(arrays),) + arrays[0].shape, dtype=samples[0][key].dtype)
    if get_worker_info() is not None:
        out.share_memory_()
    np.stack(arrays, out=out.numpy())
    return out


def collate_samples(samples: list[dict]) -> Batch:
    """Stack samples of one image size into the batch dict (target fixations concatenated with `fix_batch`)."""
    shapes = {tuple(sample["image"].shape) for sample in samples}
    if len(shapes) != 1:
        raise ValueError(f"a batch mixes image sizes {sorted(shapes)}; use the shape-bucketing batch sampler")
    counts = [len(sample["fix_x"]) for sample in samples]
    return {
        "image": _stack(samples, "image"),
        "centerbias": _stack(samples, "centerbias"),
        "x_hist": _stack(samples, "x_hist"),
        "y_hist": _stack(samples, "y_hist"),
        "fix_batch": torch.from_numpy(np.repeat(np.arange(len(samples), dtype=np.int64), counts)),
        "fix_x": torch.cat([sample["fix_x"] for sample in samples]),
        "fix_y": torch.cat([sample["fix_y"] for sample in samples]),
        "weight": torch.tensor([sample["weight"] for sample in samples], dtype=torch.float32),
        "image_index": torch.tensor([sample["image_index"] for sample in samples], dtype=torch.int64),
    }
