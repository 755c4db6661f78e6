"""Image-level splits: pysaliency's cross-validation folds and a seeded hold-out split. No image is in two splits."""

from __future__ import annotations

import math

import numpy as np

from .errors import DataError

CROSSVAL_SEED = 42
"""pysaliency shuffles the image indices with numpy.random.RandomState(42) for every fold."""


def crossval_split(n_images: int, folds: int = 10, fold: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) image indices of cross-validation fold `fold`, identical to pysaliency's crossval_split.

    The indices 0..n_images-1 are shuffled with RandomState(42) and cut into `folds` chunks of ceil(n/folds)
    images (the last chunk holds the rest); test = chunk `fold`, validation = chunk (fold-1) mod folds,
    train = the other chunks in chunk order. MIT1003 (N=1003, 10 folds) gives 808/94/101 for fold 0.
    """
    if folds < 3:
        raise DataError(f"crossval needs at least 3 folds (train, validation, test), got data.folds {folds}")
    if not 0 <= fold < folds:
        raise DataError(f"data.fold must be in 0..{folds - 1} (data.folds {folds}), got {fold}")
    chunk = math.ceil(n_images / folds)
    if n_images < folds or chunk * (folds - 1) >= n_images:
        raise DataError(f"{n_images} images are too few for {folds} crossval folds (some folds would be empty); "
                        "lower data.folds or use more images")
    order = np.arange(n_images)
    np.random.RandomState(CROSSVAL_SEED).shuffle(order)
    chunks = [order[i * chunk:(i + 1) * chunk] for i in range(folds)]
    val_fold = (fold - 1) % folds
    train = np.concatenate([chunks[i] for i in range(folds) if i not in (fold, val_fold)])
    return train, chunks[val_fold], chunks[fold]


def holdout_split(n_images: int, val_images: int = 101, test_images: int = 0,
                  seed: int = 42) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) image indices of a seeded hold-out split, each sorted ascending.

    A RandomState(seed) permutation gives `val_images` validation images, then `test_images` test images;
    the rest is training. With test_images == 0 the test split is the validation split (e.g. MIT1003 902/101).
    """
    if val_images < 1 or test_images < 0:
        raise DataError(f"holdout needs data.val_images >= 1 and data.test_images >= 0, got {val_images} and "
                        f"{test_images}")
    if val_images + test_images >= n_images:
        raise DataError(f"holdout of {val_images} validation + {test_images} test images leaves no training "
                        f"images out of {n_images}; lower data.val_images/data.test_images")
    order = np.random.RandomState(seed).permutation(n_images)
    val = np.sort(order[:val_images])
    test = np.sort(order[val_images:val_images + test_images]) if test_images else val
    train = np.sort(order[val_images + test_images:])
    return train, val, test
