"""Torch datasets producing the batch dict of ARCHITECTURE.md, per image or per fixation, and the predict images.

Batch keys: image (B,3,H,W) uint8 RGB; centerbias (B,H,W) float32 log density (nats); x_hist, y_hist (B,4)
float32 pixels, most recent fixation first, NaN = missing; fix_batch (K,) int64 sample of each target fixation;
fix_x, fix_y (K,) float64 pixels (float64 so that int(x) picks the same pixel as pysaliency); weight (B,) float32; image_index (B,) int64 index into the split's dataset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from .centerbias import CenterbiasModel
from .dataset import FixationDataset
from .errors import DataError
from .image_cache import SharedImageCache
from .images import load_rgb
from .resize import ResizePolicy, resize_image, target_shape

HistoryMode = Literal["none", "dummy", "real"]
HISTORY_SLOTS = 4
"""Number of history fixations the network sees."""
MIN_IMAGE_SIDE = 64
"""Smallest image side (pixels) the network accepts: its backbone has stride 64."""


class CenterbiasTensors:
    """Centre-bias log densities as (H,W) float32 tensors, computed once per shape from a centre-bias model."""

    def __init__(self, model: CenterbiasModel):
        self.model = model
        self._tensors: dict[tuple[int, int], torch.Tensor] = {}

    def __call__(self, shape: Sequence[int]) -> torch.Tensor:
        """(H,W) float32 log density (nats) for `shape` (H, W)."""
        key = (int(shape[0]), int(shape[1]))
        if key not in self._tensors:
            self._tensors[key] = torch.from_numpy(self.model.log_density(key).astype(np.float32))
        return self._tensors[key]


def history_slots(mode: HistoryMode, shape: Sequence[int], x_hist: Optional[np.ndarray] = None,
                  y_hist: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """(4,) float32 x and y history slots (pixels) for an image of `shape` (H, W), most recent first, NaN = missing.

    `none`: all NaN. `dummy`: slot 0 = image centre (W/2, H/2), others NaN. `real`: the last four entries of the
    chronological, NaN-padded pysaliency history rows `x_hist`, `y_hist` of one fixation, reversed.
    """
    xs = np.full(HISTORY_SLOTS, np.nan, dtype=np.float32)
    ys = np.full(HISTORY_SLOTS, np.nan, dtype=np.float32)
    if mode == "dummy":
        xs[0], ys[0] = shape[1] / 2, shape[0] / 2
    elif mode == "real":
        recorded = ~np.isnan(x_hist)
        recent_x = x_hist[recorded][::-1][:HISTORY_SLOTS]
        recent_y = y_hist[recorded][::-1][:HISTORY_SLOTS]
        xs[:len(recent_x)], ys[:len(recent_y)] = recent_x, recent_y
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
            "centerbias": self.centerbias(shape),
            "x_hist": torch.from_numpy(x_hist),
            "y_hist": torch.from_numpy(y_hist),
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


def collate_samples(samples: list[dict]) -> dict:
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


class PredictImages(Dataset):
    """Arbitrary image files for prediction, resized by the training policy, with a dummy central history.

    Items: image (3,H,W) uint8, centerbias (H,W) float32, x_hist/y_hist (4,) float32, path (str),
    original_shape (2,) int64 (H, W) of the file before resizing. Images with a side under MIN_IMAGE_SIDE
    pixels (after resizing) raise DataError: the network cannot process them and upscaling would invent detail.
    """

    def __init__(self, paths: Sequence[str | Path], centerbias: CenterbiasTensors, resize: ResizePolicy = "native",
                 max_side: Optional[int] = None):
        self.paths = [str(path) for path in paths]
        self.centerbias = centerbias
        self.resize = resize
        self.max_side = max_side

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: int) -> dict:
        path = self.paths[item]
        native = load_rgb(path)
        shape = target_shape(native.shape[:2], self.resize, self.max_side)
        if min(shape) < MIN_IMAGE_SIDE:
            raise DataError(f"{path}: image is {shape[0]}x{shape[1]} pixels (H x W) at the network input; "
                            f"expected both sides >= {MIN_IMAGE_SIDE} (upscale it yourself if you must)")
        x_hist, y_hist = history_slots("dummy", shape)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(resize_image(native, shape).transpose(2, 0, 1))),
            "centerbias": self.centerbias(shape),
            "x_hist": torch.from_numpy(x_hist),
            "y_hist": torch.from_numpy(y_hist),
            "path": path,
            "original_shape": torch.tensor(native.shape[:2], dtype=torch.int64),
        }


def collate_predict(samples: list[dict]) -> dict:
    """Stack predict items of one size; `path` stays a list of str."""
    batch = {key: _stack(samples, key) for key in ("image", "centerbias", "x_hist", "y_hist", "original_shape")}
    batch["path"] = [sample["path"] for sample in samples]
    return batch
