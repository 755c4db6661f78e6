"""Centre-bias log densities (nats, per pixel, logsumexp = 0): pysaliency's BaselineModel, a template, uniform.

Every model here has `log_density(shape) -> (H,W) float64` and keeps its results for the last few image shapes
(`ShapeCache`), so prediction over a folder of many image sizes stays bounded in memory.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
from scipy.ndimage import gaussian_filter, zoom
from scipy.special import logsumexp

from .dataset import FixationDataset
from .errors import DataError

MIT1003_BANDWIDTH = 10 ** -1.6667673342543432
"""KDE bandwidth fitted on MIT1003, as a fraction of the image height (rows) and width (columns)."""
MIT1003_EPS = 10 ** -14.884189168516073
"""Weight of the uniform component mixed into the KDE, fitted on MIT1003."""


SHAPE_CACHE_SIZE = 8
"""Image shapes whose centre bias a model keeps (the least recently used is dropped first)."""


class ShapeCache:
    """`compute(shape)` for (H, W) shapes, keeping the results of the last `SHAPE_CACHE_SIZE` shapes asked for."""

    def __init__(self, compute: Callable[[tuple[int, int]], np.ndarray]):
        self.compute = compute
        self._results: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def __call__(self, shape: tuple[int, int]) -> np.ndarray:
        key = (int(shape[0]), int(shape[1]))
        if key in self._results:
            self._results.move_to_end(key)
        else:
            self._results[key] = self.compute(key)
            if len(self._results) > SHAPE_CACHE_SIZE:
                self._results.popitem(last=False)
        return self._results[key]

    def __len__(self) -> int:
        return len(self._results)


class CenterbiasModel(Protocol):
    """Anything giving a centre-bias log density for an image shape."""

    def log_density(self, shape: tuple[int, int]) -> np.ndarray:
        """(H,W) float64 log density in nats; logsumexp over pixels = 0."""


def _relative_targets(dataset: FixationDataset) -> tuple[np.ndarray, np.ndarray]:
    """Target fixations as fractions (x/W, y/H) of their own image."""
    keep = dataset.is_target
    if not keep.any():
        raise DataError(f"{dataset.source}: no fixations to build the centre bias from")
    return dataset.x[keep] / dataset.shapes[dataset.n[keep], 1], dataset.y[keep] / dataset.shapes[dataset.n[keep], 0]


def _kde_log_density(x_rel: np.ndarray, y_rel: np.ndarray, shape: tuple[int, int],
                     bandwidth: float, eps: float) -> np.ndarray:
    height, width = int(shape[0]), int(shape[1])
    counts = np.zeros((height, width))
    np.add.at(counts, ((y_rel * height).astype(int), (x_rel * width).astype(int)), 1)
    smoothed = gaussian_filter(counts, [bandwidth * height, bandwidth * width])
    mixed = (1 - eps) * smoothed + eps / (height * width)
    log_density = np.log(mixed)
    return log_density - logsumexp(log_density)


def centerbias_log_density(dataset: FixationDataset, shape: tuple[int, int], bandwidth: float = MIT1003_BANDWIDTH,
                           eps: float = MIT1003_EPS) -> np.ndarray:
    """pysaliency's BaselineModel log density (nats) for an image of `shape` (H, W) from `dataset`'s fixations.

    Each target fixation is normalised by its own image's size (x/W, y/H) and counted at pixel
    (int(y_rel*H), int(x_rel*W)) of the target shape; the counts are smoothed with a Gaussian of sigma
    (bandwidth*H, bandwidth*W) pixels (scipy `gaussian_filter`, mode 'reflect', truncate 4), mixed with a uniform
    density as (1-eps)*counts + eps/(H*W), logged and normalised. Forced initial fixations are not counted.
    Pass the TRAINING split to avoid leakage (`CrossvalidatedBaselineCenterbias` leaves each image out instead).
    """
    x_rel, y_rel = _relative_targets(dataset)
    return _kde_log_density(x_rel, y_rel, shape, bandwidth, eps)


class BaselineCenterbias:
    """pysaliency `BaselineModel` from a (training) dataset; see `centerbias_log_density`."""

    def __init__(self, dataset: FixationDataset, bandwidth: float = MIT1003_BANDWIDTH, eps: float = MIT1003_EPS):
        self.x_rel, self.y_rel = _relative_targets(dataset)
        self.bandwidth = bandwidth
        self.eps = eps
        self.cache = ShapeCache(self._kde)

    def log_density(self, shape: tuple[int, int]) -> np.ndarray:
        """(H,W) float64 log density in nats."""
        return self.cache(shape)

    def _kde(self, shape: tuple[int, int]) -> np.ndarray:
        return _kde_log_density(self.x_rel, self.y_rel, shape, self.bandwidth, self.eps)


class CrossvalidatedBaselineCenterbias(BaselineCenterbias):
    """pysaliency `CrossvalidatedBaselineModel`: for image i, the KDE of all other images' fixations.

    Used as the training and evaluation centre bias of the DeepGaze III protocol (`data.centerbias` "kde_crossval":
    the KDE of ALL the dataset's fixations, each image's own left out) and to evaluate the centre bias itself
    without fitting to the test image. `log_density(shape)` (no image left out) serves images outside the dataset
    (prediction).
    """

    def __init__(self, dataset: FixationDataset, bandwidth: float = MIT1003_BANDWIDTH, eps: float = MIT1003_EPS):
        super().__init__(dataset, bandwidth, eps)
        self.dataset = dataset
        self.image = dataset.n[dataset.is_target]

    def log_density_for_image(self, index: int) -> np.ndarray:
        """(H,W) float64 log density (nats) at image `index`'s shape, leaving that image's fixations out."""
        keep = self.image != index
        if not keep.any():
            raise DataError(f"{self.dataset.source}: no fixations of other images to build image {index}'s "
                            "cross-validated centre bias from")
        shape = tuple(self.dataset.shapes[index])
        return _kde_log_density(self.x_rel[keep], self.y_rel[keep], shape, self.bandwidth, self.eps)


class UniformCenterbias:
    """The uniform density: -log(H*W) at every pixel."""

    def log_density(self, shape: tuple[int, int]) -> np.ndarray:
        """(H,W) float64 log density in nats."""
        height, width = int(shape[0]), int(shape[1])
        return np.full((height, width), -np.log(height * width))


class TemplateCenterbias:
    """A 2-D log-density template (e.g. the released `centerbias_mit1003.npy`) zoomed to each image shape.

    Zoom is nearest-neighbour (scipy `zoom`, order 0, mode 'nearest') followed by renormalisation, as in the
    DeepGaze examples.
    """

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: centre-bias template not found; expected a .npy file with a 2-D log density")
        try:
            template = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise DataError(f"{path}: cannot read the centre-bias template (not a .npy array of numbers, or "
                            "truncated; pickled objects are never loaded); expected a .npy file with a 2-D log "
                            "density") from err
        if not isinstance(template, np.ndarray):
            raise DataError(f"{path}: centre-bias template is an .npz archive; expected a .npy file with a 2-D log "
                            "density")
        if template.ndim != 2 or not np.issubdtype(template.dtype, np.floating):
            raise DataError(f"{path}: centre-bias template has shape {template.shape} and dtype {template.dtype}; "
                            "expected a 2-D float array of log densities")
        if not np.isfinite(template).all():
            raise DataError(f"{path}: centre-bias template contains NaN or infinite values; expected log densities")
        self.path = path
        self.template = template.astype(np.float64)
        self.cache = ShapeCache(self._zoomed)

    def log_density(self, shape: tuple[int, int]) -> np.ndarray:
        """(H,W) float64 log density in nats."""
        return self.cache(shape)

    def _zoomed(self, shape: tuple[int, int]) -> np.ndarray:
        factors = (shape[0] / self.template.shape[0], shape[1] / self.template.shape[1])
        zoomed = zoom(self.template, factors, order=0, mode="nearest")
        if zoomed.shape != shape:
            raise ValueError(f"{self.path}: zoomed template to {zoomed.shape}, expected {shape}")
        return zoomed - logsumexp(zoomed)
