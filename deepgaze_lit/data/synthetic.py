"""make_synthetic: images with a known fixation density, generated deterministically from a seed.

Each image is a blocky grey-noise background with one or more saturated discs. Fixations are drawn from a mixture
of object-centred Gaussians, a centre Gaussian and a uniform floor; that mixture is returned as the true log
density of every image, so the gold-standard information gain of a dataset is known exactly.
"""

from __future__ import annotations

import colorsys
import threading
from collections import OrderedDict
from typing import Callable, Sequence

import numpy as np

from .dataset import FixationDataset
from .lazy import LazySequence

BLOCK_FRACTION = 1 / 16
"""Background noise blocks are this fraction of the shorter image side."""
DISC_COLUMNS = ("cx", "cy", "radius", "red", "green", "blue")
"""Columns of an image's (K,6) float64 disc array: centre and radius in pixels, RGB colour 0..255."""
CACHE_ITEMS = 4
"""SyntheticStimuli keeps this many of its most recently made images, and as many densities."""


def _gaussian(shape: tuple[int, int], centre_xy: tuple[float, float], sigma_xy: tuple[float, float]) -> np.ndarray:
    """(H,W) Gaussian evaluated at pixel centres and normalised to sum 1 over the image."""
    height, width = shape
    gx = np.exp(-0.5 * ((np.arange(width) + 0.5 - centre_xy[0]) / sigma_xy[0]) ** 2)
    gy = np.exp(-0.5 * ((np.arange(height) + 0.5 - centre_xy[1]) / sigma_xy[1]) ** 2)
    density = np.outer(gy, gx)
    return density / density.sum()


def _block_side(shape: tuple[int, int]) -> int:
    """Side in pixels of the background's uniform grey blocks."""
    return max(2, round(min(shape) * BLOCK_FRACTION))


def _background(rng: np.random.Generator, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Coarse block greys (60..190) and (H,W) fine pixel noise, the first draws from an image's generator."""
    block = _block_side(shape)
    coarse = rng.uniform(60, 190, size=(-(-shape[0] // block), -(-shape[1] // block)))
    return coarse, rng.normal(0, 8, size=shape)


def _grey(coarse: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """(H,W) float grey values: blocks of uniform grey plus the fine pixel noise."""
    height, width = noise.shape
    block = _block_side(noise.shape)
    return np.repeat(np.repeat(coarse, block, axis=0), block, axis=1)[:height, :width] + noise


def _draw_discs(rng: np.random.Generator, shape: tuple[int, int], objects: tuple[int, int],
                object_radius: tuple[float, float]) -> np.ndarray:
    """(K,6) float64 discs (DISC_COLUMNS) inside the image, drawn after the background."""
    height, width = shape
    count = int(rng.integers(objects[0], objects[1] + 1))
    discs = np.zeros((count, len(DISC_COLUMNS)))
    for disc in discs:
        radius = rng.uniform(*object_radius) * min(shape)
        cx = rng.uniform(radius, width - radius)
        cy = rng.uniform(radius, height - radius)
        disc[:] = (cx, cy, radius, *(np.array(colorsys.hsv_to_rgb(rng.uniform(), 1.0, 1.0)) * 255))
    return discs


def _paint(grey: np.ndarray, discs: np.ndarray) -> np.ndarray:
    """(H,W,3) uint8 image: the grey background with the saturated discs on top."""
    height, width = grey.shape
    image = np.repeat(grey[:, :, None], 3, axis=2)
    rows = np.arange(height)[:, None] + 0.5
    cols = np.arange(width)[None, :] + 0.5
    for cx, cy, radius, *colour in discs:
        image[(cols - cx) ** 2 + (rows - cy) ** 2 <= radius ** 2] = colour
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _log_density(shape: tuple[int, int], discs: np.ndarray, weights: tuple[float, float, float],
                 center_sigma: float) -> np.ndarray:
    """(H,W) float64 true log density (nats): object Gaussians (sigma radius/2), centre Gaussian, uniform floor."""
    height, width = shape
    object_density = np.zeros(shape)
    for cx, cy, radius, *_ in discs:
        object_density += _gaussian(shape, (cx, cy), (radius / 2, radius / 2)) / len(discs)
    centre_density = _gaussian(shape, (width / 2, height / 2), (center_sigma * width, center_sigma * height))
    object_weight, center_weight, uniform_weight = weights
    density = object_weight * object_density + center_weight * centre_density + uniform_weight / (height * width)
    return np.log(density)


class _Recent:
    """The last `size` arrays made, by index (least recently used dropped first); safe to share between threads."""

    def __init__(self, size: int):
        self.size = size
        self.items: OrderedDict[int, np.ndarray] = OrderedDict()
        self.lock = threading.Lock()

    def __reduce__(self):
        """Pickled empty (loader workers start with their own empty cache)."""
        return _Recent, (self.size,)

    def get(self, index: int, make: Callable[[int], np.ndarray]) -> np.ndarray:
        """A copy of array `index`, made by `make(index)` unless recent (a copy: callers may write to it)."""
        with self.lock:
            item = self.items.get(index)
            if item is not None:
                self.items.move_to_end(index)
                return item.copy()
        item = make(index)
        with self.lock:
            self.items[index] = item
            self.items.move_to_end(index)
            if len(self.items) > self.size:
                self.items.popitem(last=False)
        return item.copy()


class SyntheticStimuli:
    """The images and true log densities of a synthetic dataset, made again on every request.

    Image i is regenerated from its generator (seed, i) and its discs; its log density from its discs alone.
    Only the discs ((K,6) floats per image) are stored, plus the CACHE_ITEMS most recent images and densities
    (not pickled: loader workers start with empty caches).
    """

    def __init__(self, seed: int, shapes: np.ndarray, discs: list[np.ndarray], weights: tuple[float, float, float],
                 center_sigma: float):
        self.seed = seed
        self.shapes = shapes
        self.discs = discs
        self.weights = weights
        self.center_sigma = center_sigma
        self._images = _Recent(CACHE_ITEMS)
        self._densities = _Recent(CACHE_ITEMS)

    def __repr__(self) -> str:
        return f"SyntheticStimuli(seed={self.seed}, {len(self.shapes)} images)"

    def _shape(self, index: int) -> tuple[int, int]:
        return int(self.shapes[index, 0]), int(self.shapes[index, 1])

    def _make_image(self, index: int) -> np.ndarray:
        return _paint(_grey(*_background(np.random.default_rng([self.seed, index]), self._shape(index))),
                      self.discs[index])

    def _make_log_density(self, index: int) -> np.ndarray:
        return _log_density(self._shape(index), self.discs[index], self.weights, self.center_sigma)

    def image(self, index: int) -> np.ndarray:
        """(H,W,3) uint8 image `index`."""
        return self._images.get(index, self._make_image)

    def log_density(self, index: int) -> np.ndarray:
        """(H,W) float64 true log density (nats) of image `index`."""
        return self._densities.get(index, self._make_log_density)


def make_synthetic(n_images: int = 100, seed: int = 0,
                   sizes: Sequence[tuple[int, int]] = ((256, 320), (320, 256)),
                   subjects: int = 8, scanpath_length: tuple[int, int] = (3, 8),
                   objects: tuple[int, int] = (1, 3), object_radius: tuple[float, float] = (0.12, 0.2),
                   object_weight: float = 0.6, center_weight: float = 0.3, center_sigma: float = 0.2,
                   initial_fixation: bool = True) -> FixationDataset:
    """Synthetic eye-tracking data with the true fixation density of every image (`true_log_densities`).

    `images` and `true_log_densities` are LazySequences over a SyntheticStimuli: each image and density is made
    again when it is read, so the dataset holds its fixations and only a few images (see SyntheticStimuli).

    Args:
        n_images: number of images N.
        seed: image i depends only on (seed, i), so a larger N only appends images.
        sizes: (H, W) image sizes in pixels, used in turn (image i has sizes[i % len(sizes)]). Multiples of 64
            suit the network (its backbone has stride 64).
        subjects: scanpaths per image (one per simulated subject, subject ids 0..subjects-1).
        scanpath_length: inclusive range of target fixations per scanpath.
        objects: inclusive range of discs per image.
        object_radius: disc radius range as a fraction of the shorter image side (large enough for stride 64).
        object_weight, center_weight: mixture weights of the object Gaussians (sigma = radius/2, the discs share
            the weight equally) and of the centre Gaussian (sigma = center_sigma x the image side); the remaining
            1 - object_weight - center_weight is uniform over the image.
        initial_fixation: start every scanpath with a forced fixation at the image centre (W/2, H/2); it is
            history only, never a target.

    Fixations are independent draws from the density (pixel drawn from the discrete density, position uniform
    within the pixel), so `true_log_densities[i][int(y), int(x)]` is the exact log likelihood of a fixation.
    Times: the initial fixation at 0 s, then fixation durations uniform in [0.15, 0.45] s.
    """
    if n_images < 1:
        raise ValueError(f"n_images must be at least 1, got {n_images}")
    uniform_weight = 1.0 - object_weight - center_weight
    if min(object_weight, center_weight) < 0 or uniform_weight < 0:
        raise ValueError(f"object_weight {object_weight} and center_weight {center_weight} must be >= 0 with sum <= 1")
    if not sizes or any(len(size) != 2 or min(size) < 8 for size in sizes):
        raise ValueError(f"sizes must be a non-empty list of (H, W) of at least 8 pixels, got {sizes!r}")
    if subjects < 1 or not 1 <= scanpath_length[0] <= scanpath_length[1]:
        raise ValueError(f"need subjects >= 1 and 1 <= scanpath_length[0] <= [1], got {subjects}, {scanpath_length}")
    offset = 1 if initial_fixation else 0
    max_length = scanpath_length[1] + offset
    weights = (object_weight, center_weight, uniform_weight)
    shapes = np.array([sizes[index % len(sizes)] for index in range(n_images)], dtype=np.int64).reshape(-1, 2)
    discs = []
    xs, ys, ts = (np.full((n_images * subjects, max_length), np.nan) for _ in range(3))
    for index in range(n_images):
        rng = np.random.default_rng([seed, index])
        shape = (int(shapes[index, 0]), int(shapes[index, 1]))
        _background(rng, shape)
        discs.append(_draw_discs(rng, shape, objects, object_radius))
        density = np.exp(_log_density(shape, discs[-1], weights, center_sigma))
        lengths = rng.integers(scanpath_length[0], scanpath_length[1] + 1, size=subjects)
        pixels = rng.choice(shape[0] * shape[1], size=int(lengths.sum()), p=density.ravel())
        x_all = pixels % shape[1] + rng.random(len(pixels))
        y_all = pixels // shape[1] + rng.random(len(pixels))
        durations = rng.uniform(0.15, 0.45, size=(subjects, max_length))
        start = 0
        for subject, length in enumerate(lengths):
            row = index * subjects + subject
            if initial_fixation:
                xs[row, 0], ys[row, 0] = shape[1] / 2, shape[0] / 2
            xs[row, offset:offset + length] = x_all[start:start + length]
            ys[row, offset:offset + length] = y_all[start:start + length]
            ts[row, :offset + length] = np.concatenate([[0.0], np.cumsum(durations[subject])])[:offset + length]
            start += length
    stimuli = SyntheticStimuli(seed, shapes.copy(), discs, weights, center_sigma)
    return FixationDataset.from_scanpaths(
        shapes=shapes, xs=xs, ys=ys, ts=ts,
        ns=np.repeat(np.arange(n_images), subjects), subjects=np.tile(np.arange(subjects), n_images),
        initial_fixation=initial_fixation, images=LazySequence(stimuli.image, n_images),
        true_log_densities=LazySequence(stimuli.log_density, n_images),
        source=f"synthetic(seed={seed}, n_images={n_images})")
