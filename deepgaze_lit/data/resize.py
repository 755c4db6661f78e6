"""Resizing policies: which size each image is fed to the network at, and how pixels and densities follow.

Fixation coordinates always follow the image: a fixation at x (pixels of the native image of width W) lies at
x * W' / W in the resized image of width W' (same for y with the heights).
"""

from __future__ import annotations

from typing import Literal, Optional

import numpy as np
from PIL import Image

ResizePolicy = Literal["native", "two_sizes", "max_side"]

TWO_SIZES_LANDSCAPE = (768, 1024)
"""(H, W) for images wider than high under the "two sizes" policy of DeepGaze training."""
TWO_SIZES_PORTRAIT = (1024, 768)
"""(H, W) for all other images (portrait and square) under the "two sizes" policy."""


def target_shape(shape: tuple[int, int], policy: ResizePolicy, max_side: Optional[int] = None) -> tuple[int, int]:
    """Network input shape (H, W) in pixels for an image of native `shape` (H, W).

    - "native": unchanged.
    - "two_sizes": 768x1024 (H x W) when H < W, 1024x768 otherwise (aspect ratio not kept).
    - "max_side": scaled down, aspect ratio kept, so that the longer side is at most `max_side` pixels
      (sides rounded to whole pixels); smaller images are left unchanged.
    """
    height, width = int(shape[0]), int(shape[1])
    if policy == "native":
        return height, width
    if policy == "two_sizes":
        return TWO_SIZES_LANDSCAPE if height < width else TWO_SIZES_PORTRAIT
    if policy == "max_side":
        if max_side is None or max_side < 1:
            raise ValueError(f"resize 'max_side' needs a positive max_side in pixels, got {max_side!r}")
        longest = max(height, width)
        if longest <= max_side:
            return height, width
        scale = max_side / longest
        return max(1, round(height * scale)), max(1, round(width * scale))
    raise ValueError(f"unknown resize policy {policy!r}; expected 'native', 'two_sizes' or 'max_side'")


def target_shapes(shapes: np.ndarray, policy: ResizePolicy, max_side: Optional[int] = None) -> np.ndarray:
    """Apply `target_shape` to every row of an (N,2) array of (H, W); returns (N,2) int64."""
    if len(shapes) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    return np.array([target_shape(shape, policy, max_side) for shape in shapes], dtype=np.int64)


def resize_image(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize an (H,W,3) uint8 image to `shape` (H', W') with Pillow's bilinear filter (antialiased when shrinking)."""
    height, width = int(shape[0]), int(shape[1])
    if image.shape[:2] == (height, width):
        return image
    resized = Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR)
    return np.array(resized)


def resize_log_density(log_density: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize an (H,W) log density (nats, per pixel) to `shape`: bilinear on the density, renormalised to sum 1."""
    height, width = int(shape[0]), int(shape[1])
    if log_density.shape == (height, width):
        return log_density
    density = np.exp(log_density - log_density.max()).astype(np.float32)
    resized = np.asarray(Image.fromarray(density).resize((width, height), Image.Resampling.BILINEAR))
    resized = np.maximum(resized.astype(np.float64), np.finfo(np.float64).tiny)
    return np.log(resized) - np.log(resized.sum())
