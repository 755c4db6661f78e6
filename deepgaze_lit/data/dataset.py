"""FixationDataset: the one in-memory form of every eye-tracking source (stimuli + fixations), and the detection
of forced initial central fixations."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np

from .errors import DataError
from .images import load_rgb
from .lazy import LazySequence, take_items
from .resize import resize_image, resize_log_density

log = logging.getLogger(__name__)

INITIAL_FIXATION_RADIUS = 0.15
"""Auto-detection: a scanpath start counts as central within this fraction of the image's shorter side."""
INITIAL_FIXATION_SHARE = 0.8
"""Auto-detection: scanpaths start with a forced central fixation when at least this share of starts is central."""
PER_FIXATION_FIELDS = ("x", "y", "n", "subject", "t", "x_hist", "y_hist", "scanpath_index", "is_initial")
"""The FixationDataset attributes with one row per fixation: selecting fixations selects rows of all of them."""


def _float_array(values, length: int, fill: float) -> np.ndarray:
    if values is None:
        return np.full(length, fill, dtype=np.float64)
    return np.asarray(values, dtype=np.float64)


def _int_array(values, length: int, fill: int) -> np.ndarray:
    if values is None:
        return np.full(length, fill, dtype=np.int64)
    return np.asarray(values, dtype=np.int64)


def _history_array(values, length: int) -> np.ndarray:
    """(F,L) float64 history; None gives L = 0, a 1-D array one column."""
    if values is None:
        return np.zeros((length, 0))
    values = np.asarray(values, dtype=np.float64)
    return values.reshape(length, -1) if values.ndim < 2 else values


@dataclass(eq=False)
class FixationDataset:
    """Images (stimuli) with their shapes and every fixation as one row of per-fixation numpy arrays.

    Coordinates are continuous, 0-based pixels of the image at `shapes`: pixel (i, j) covers [j, j+1) x [i, i+1),
    so a fixation is looked up at `map[int(y), int(x)]`.

    Attributes:
        shapes: (N,2) int64 height and width (pixels) of each image as fed to the network.
        x, y: (F,) float64 fixation position in pixels.
        n: (F,) int64 index of the fixation's image.
        subject: (F,) int64 subject id, -1 when unknown.
        t: (F,) float64 fixation onset in seconds, NaN when unknown.
        x_hist, y_hist: (F,L) float64 positions of the preceding fixations of the same scanpath, chronological
            (oldest first), right-padded with NaN, as pysaliency stores them; L may be 0.
        scanpath_index: (F,) int64 scanpath each fixation belongs to, -1 when unknown.
        is_initial: (F,) bool; the forced initial central fixation of a scanpath: history only, never a target.
        image_paths: one file per image, or None when `images` holds the pixels.
        images: sequence of (H,W,3) uint8 arrays of the native images (a list, or a read-only LazySequence that
            makes each on access), or None when `image_paths` is given.
        native_shapes: (N,2) int64 (H, W) of the stored images; differs from `shapes` after resizing.
        image_ids: (N,) int64 index of each image in the source it was read from (kept by `subset`).
        true_log_densities: sequence (list or LazySequence) of per image the (H,W) float64 log density (nats)
            the fixations were drawn from (synthetic data only), or None.
        has_history: whether fixation order within scanpaths is known (needed for history "real").
        source: short description of where the data came from, for messages.
        dropped_fixations: fixations outside their image removed when reading.
    """

    shapes: np.ndarray
    x: np.ndarray
    y: np.ndarray
    n: np.ndarray
    subject: Optional[np.ndarray] = None
    t: Optional[np.ndarray] = None
    x_hist: Optional[np.ndarray] = None
    y_hist: Optional[np.ndarray] = None
    scanpath_index: Optional[np.ndarray] = None
    is_initial: Optional[np.ndarray] = None
    image_paths: Optional[list[str]] = None
    images: Optional[Sequence[np.ndarray]] = None
    native_shapes: Optional[np.ndarray] = None
    image_ids: Optional[np.ndarray] = None
    true_log_densities: Optional[Sequence[np.ndarray]] = None
    has_history: bool = False
    source: str = "in-memory data"
    dropped_fixations: int = 0

    def __post_init__(self) -> None:
        self.shapes = np.asarray(self.shapes, dtype=np.int64).reshape(-1, 2)
        self.x = np.asarray(self.x, dtype=np.float64)
        self.y = np.asarray(self.y, dtype=np.float64)
        self.n = np.asarray(self.n, dtype=np.int64)
        count = len(self.x)
        self.subject = _int_array(self.subject, count, -1)
        self.t = _float_array(self.t, count, np.nan)
        self.x_hist = _history_array(self.x_hist, count)
        self.y_hist = _history_array(self.y_hist, count)
        self.scanpath_index = _int_array(self.scanpath_index, count, -1)
        if self.is_initial is None:
            self.is_initial = np.zeros(count, dtype=bool)
        self.is_initial = np.asarray(self.is_initial, dtype=bool)
        if self.native_shapes is None:
            self.native_shapes = self.shapes.copy()
        self.native_shapes = np.asarray(self.native_shapes, dtype=np.int64).reshape(-1, 2)
        if self.image_ids is None:
            self.image_ids = np.arange(len(self.shapes), dtype=np.int64)
        self.image_ids = np.asarray(self.image_ids, dtype=np.int64)
        self._check_consistent()

    def _check_consistent(self) -> None:
        count, n_images = len(self.x), len(self.shapes)
        for name in PER_FIXATION_FIELDS:
            rows = len(getattr(self, name))
            if rows != count:
                raise ValueError(f"{self.source}: {name} has {rows} rows, expected {count} (one per fixation)")
        if self.x_hist.shape != self.y_hist.shape:
            raise ValueError(f"{self.source}: x_hist {self.x_hist.shape} and y_hist {self.y_hist.shape} differ")
        if count and (self.n.min() < 0 or self.n.max() >= n_images):
            raise DataError(f"{self.source}: fixations refer to image {self.n.max()} but there are {n_images} images")
        if (self.image_paths is None) == (self.images is None):
            raise ValueError(f"{self.source}: give exactly one of image_paths and images")
        stored = self.image_paths if self.image_paths is not None else self.images
        for name, values in {"stored images": stored, "native_shapes": self.native_shapes,
                             "image_ids": self.image_ids}.items():
            if len(values) != n_images:
                raise ValueError(f"{self.source}: {len(values)} {name} for {n_images} images")
        if self.true_log_densities is not None and len(self.true_log_densities) != n_images:
            raise ValueError(f"{self.source}: {len(self.true_log_densities)} true densities for {n_images} images")

    def _fixation_rows(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Every per-fixation field (PER_FIXATION_FIELDS) at `rows` (a boolean mask or indices of fixations)."""
        return {name: getattr(self, name)[rows] for name in PER_FIXATION_FIELDS}

    @property
    def n_images(self) -> int:
        """Number of images N."""
        return len(self.shapes)

    @property
    def n_fixations(self) -> int:
        """Number of fixations F, initial fixations included."""
        return len(self.x)

    @property
    def is_target(self) -> np.ndarray:
        """(F,) bool: fixations that are prediction targets (all but the forced initial ones)."""
        return ~self.is_initial

    @property
    def history_lengths(self) -> np.ndarray:
        """(F,) int64 number of recorded preceding fixations."""
        return (~np.isnan(self.x_hist)).sum(axis=1).astype(np.int64)

    def targets_per_image(self) -> np.ndarray:
        """(N,) int64 number of target fixations of each image."""
        return np.bincount(self.n[self.is_target], minlength=self.n_images).astype(np.int64)

    def describe_image(self, index: int) -> str:
        """Where image `index` comes from, for messages."""
        if self.image_paths is not None:
            return self.image_paths[index]
        return f"{self.source} image {int(self.image_ids[index])}"

    def load_image(self, index: int) -> np.ndarray:
        """Image `index` as (H,W,3) uint8 RGB at `shapes[index]` (decoded and resized on every call)."""
        if self.images is not None:
            native = self.images[index]
        else:
            native = load_rgb(self.image_paths[index])
        expected = tuple(int(side) for side in self.native_shapes[index])
        if native.shape[:2] != expected:
            raise DataError(f"{self.describe_image(index)}: image is {native.shape[0]}x{native.shape[1]} pixels "
                            f"but the dataset records {expected[0]}x{expected[1]} (H x W)")
        return resize_image(native, tuple(self.shapes[index]))

    def image_digest(self, index: int) -> str:
        """SHA-1 of the stored image (file bytes, or array bytes for in-memory images): its identity for caches."""
        digest = hashlib.sha1()
        if self.images is not None:
            image = np.ascontiguousarray(self.images[index])
            digest.update(str(image.shape).encode())
            digest.update(image.tobytes())
        else:
            with open(self.image_paths[index], "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        return digest.hexdigest()

    def subset(self, indices: Sequence[int]) -> "FixationDataset":
        """The images `indices` (in that order) with their fixations; `n` is renumbered to the new order."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(np.unique(indices)) != len(indices):
            raise ValueError("subset indices must not repeat an image")
        new_position = np.full(self.n_images, -1, dtype=np.int64)
        new_position[indices] = np.arange(len(indices))
        fixations = self._fixation_rows(new_position[self.n] >= 0)
        fixations["n"] = new_position[fixations["n"]]
        return replace(
            self,
            **fixations,
            shapes=self.shapes[indices],
            image_paths=None if self.image_paths is None else [self.image_paths[i] for i in indices],
            images=None if self.images is None else take_items(self.images, indices),
            native_shapes=self.native_shapes[indices],
            image_ids=self.image_ids[indices],
            true_log_densities=(None if self.true_log_densities is None
                                else take_items(self.true_log_densities, indices)),
        )

    def resized(self, shapes: np.ndarray) -> "FixationDataset":
        """The same data with images at `shapes` (N,2): fixations, histories and true densities scaled along."""
        shapes = np.asarray(shapes, dtype=np.int64).reshape(-1, 2)
        if shapes.shape != self.shapes.shape:
            raise ValueError(f"{self.source}: {len(shapes)} target shapes for {self.n_images} images")
        if np.array_equal(shapes, self.shapes):
            return self
        scale_y = (shapes[:, 0] / self.shapes[:, 0])[self.n]
        scale_x = (shapes[:, 1] / self.shapes[:, 1])[self.n]
        width_limit = np.nextafter(shapes[self.n, 1].astype(np.float64), 0)
        height_limit = np.nextafter(shapes[self.n, 0].astype(np.float64), 0)
        densities = self.true_log_densities
        if isinstance(densities, LazySequence):
            densities = densities.map(resize_log_density, shapes)
        elif densities is not None:
            densities = [resize_log_density(density, tuple(shape)) for density, shape in zip(densities, shapes)]
        return replace(
            self,
            shapes=shapes,
            x=np.minimum(self.x * scale_x, width_limit),
            y=np.minimum(self.y * scale_y, height_limit),
            x_hist=self.x_hist * scale_x[:, None],
            y_hist=self.y_hist * scale_y[:, None],
            true_log_densities=densities,
        )

    def without_fixations_outside(self) -> "FixationDataset":
        """Drop fixations outside their image (or not finite); the count is added to `dropped_fixations`."""
        height = self.shapes[self.n, 0]
        width = self.shapes[self.n, 1]
        inside = (np.isfinite(self.x) & np.isfinite(self.y)
                  & (self.x >= 0) & (self.y >= 0) & (self.x < width) & (self.y < height))
        dropped = int((~inside).sum())
        if dropped == 0:
            return self
        log.info("%s: dropped %d of %d fixations outside their image", self.source, dropped, self.n_fixations)
        return replace(self, **self._fixation_rows(inside), dropped_fixations=self.dropped_fixations + dropped)

    @classmethod
    def from_scanpaths(cls, shapes: np.ndarray, xs: np.ndarray, ys: np.ndarray, ts: np.ndarray, ns: np.ndarray,
                       subjects: np.ndarray, initial_fixation: Optional[bool] = None, **kwargs) -> "FixationDataset":
        """Build per-fixation rows from scanpaths stored as rows of (S,Lmax) arrays padded with trailing NaN.

        Fixation k of scanpath s gets the history xs[s, :k] (pysaliency's `FixationTrains` convention).
        `initial_fixation`: whether every scanpath starts with a forced central fixation (history only);
        None detects it (see `detect_initial_fixations`). Other keyword arguments go to the constructor.
        """
        xs = np.asarray(xs, dtype=np.float64)
        ys = np.asarray(ys, dtype=np.float64)
        ts = np.asarray(ts, dtype=np.float64)
        n_scanpaths, max_length = xs.shape
        valid = ~np.isnan(xs)
        lengths = np.where(valid.any(axis=1), max_length - np.argmax(valid[:, ::-1], axis=1), 0)
        scanpath = np.repeat(np.arange(n_scanpaths), lengths)
        starts = np.cumsum(lengths) - lengths
        position = np.arange(len(scanpath)) - np.repeat(starts, lengths)
        history_width = max(max_length - 1, 0)
        before = np.arange(history_width)[None, :] < position[:, None]
        dataset = cls(
            shapes=shapes,
            x=xs[scanpath, position], y=ys[scanpath, position], t=ts[scanpath, position],
            n=np.asarray(ns, dtype=np.int64)[scanpath],
            subject=np.asarray(subjects, dtype=np.int64)[scanpath],
            x_hist=np.where(before, xs[scanpath, :history_width], np.nan),
            y_hist=np.where(before, ys[scanpath, :history_width], np.nan),
            scanpath_index=scanpath,
            has_history=True,
            **kwargs,
        )
        dataset.is_initial = detect_initial_fixations(dataset, initial_fixation)
        return dataset


def detect_initial_fixations(dataset: FixationDataset, initial_fixation: Optional[bool] = None) -> np.ndarray:
    """(F,) bool mask of forced initial central fixations: the scanpath starts, when scanpaths begin with one.

    `initial_fixation` True/False decides; None decides from the data: scanpaths are taken to start with a
    forced central fixation when at least INITIAL_FIXATION_SHARE of the scanpath starts lie within
    INITIAL_FIXATION_RADIUS x (shorter image side) of the image centre (W/2, H/2).
    """
    starts = dataset.history_lengths == 0
    if not dataset.has_history or initial_fixation is False or not starts.any():
        return np.zeros(dataset.n_fixations, dtype=bool)
    if initial_fixation is None:
        shapes = dataset.shapes[dataset.n[starts]]
        distance = np.hypot(dataset.x[starts] - shapes[:, 1] / 2, dataset.y[starts] - shapes[:, 0] / 2)
        central = distance <= INITIAL_FIXATION_RADIUS * shapes.min(axis=1)
        if central.mean() < INITIAL_FIXATION_SHARE:
            return np.zeros(dataset.n_fixations, dtype=bool)
        log.info("%s: %d of %d scanpaths start centrally; their first fixation is taken as the forced initial "
                 "fixation (history only)", dataset.source, int(central.sum()), int(starts.sum()))
    return starts
