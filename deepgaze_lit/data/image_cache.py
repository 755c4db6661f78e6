"""SharedImageCache: decoded, resized uint8 images kept in shared memory for all loader processes.

The cache is one shared-memory byte buffer with a slot per image (images in index order until the byte budget is
used up) and a shared "filled" flag per slot. Whichever process (main or loader worker) first needs an image
decodes it into its slot; every later epoch and every other worker reads the slot. Images beyond the budget are
decoded each time they are used.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

log = logging.getLogger(__name__)

SHARED_MEMORY_DIR = Path("/dev/shm")
SHARED_MEMORY_SHARE = 0.5
"""At most this share of the free space in /dev/shm is used, so worker batches still fit."""


def _available_shared_bytes() -> int | None:
    if not SHARED_MEMORY_DIR.is_dir():
        return None
    return int(shutil.disk_usage(SHARED_MEMORY_DIR).free * SHARED_MEMORY_SHARE)


class SharedImageCache:
    """Cache of (3,H,W) uint8 images (channels first, as batched) of known shapes within a byte budget.

    Args:
        shapes: (N,2) int64 (H, W) of the images as they are stored (after resizing).
        budget_bytes: most bytes to hold; 0 disables caching.
    """

    def __init__(self, shapes: np.ndarray, budget_bytes: int):
        shapes = np.asarray(shapes, dtype=np.int64).reshape(-1, 2)
        sizes = shapes[:, 0] * shapes[:, 1] * 3
        available = _available_shared_bytes()
        if available is not None and available < budget_bytes:
            log.info("image cache limited to %d MB by the free space in %s", available >> 20, SHARED_MEMORY_DIR)
            budget_bytes = available
        ends = np.cumsum(sizes)
        self.shapes = shapes
        self.offsets = ends - sizes
        self.cached = ends <= budget_bytes
        self.cached_bytes = int(sizes[self.cached].sum())
        self.storage = torch.empty(self.cached_bytes, dtype=torch.uint8).share_memory_()
        self.filled = torch.zeros(len(shapes), dtype=torch.bool).share_memory_()

    @property
    def n_cached(self) -> int:
        """Number of images that have a slot."""
        return int(self.cached.sum())

    def get(self, index: int, load: Callable[[], np.ndarray]) -> np.ndarray:
        """Image `index` as (3,H,W) uint8; `load()` produces it on a miss (or always when it has no slot)."""
        if not self.cached[index]:
            return load()
        height, width = (int(side) for side in self.shapes[index])
        start = int(self.offsets[index])
        slot = self.storage[start:start + height * width * 3].numpy().reshape(3, height, width)
        if not bool(self.filled[index]):
            image = load()
            if image.shape != slot.shape:
                raise ValueError(f"image {index} is {image.shape}, the cache expected {slot.shape}")
            slot[...] = image
            self.filled[index] = True
        return slot
