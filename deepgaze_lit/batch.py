"""The batch contract between `data/` and `model/`: history length, minimum image side, the dummy central history
and the fields of a batch (pure PyTorch, imported by both sides).

Coordinates are continuous, 0-based pixels of the network input image (x right, y down); a fixation lies in pixel
[int(y), int(x)]. Histories are (B, HISTORY_LENGTH) float, most recent fixation first, NaN = missing.
"""

from __future__ import annotations

import math
from typing import Optional, TypedDict

import torch
from torch import Tensor

HISTORY_LENGTH = 4
"""Number of preceding fixations the scanpath network sees (history slots per sample)."""

MIN_IMAGE_SIDE = 58
"""Smallest image side (pixels) DeepGaze III accepts, for both height and width.

The image is subsampled by 2 (floor), then DenseNet-201 reduces each side by conv0 (7x7, stride 2, padding 3),
pool0 (3x3, stride 2, padding 1) and three 2x2 average pools of stride 2, each of which needs a side >= 2:
58 -> 29 -> 15 -> 8 -> 4 -> 2 -> 1, while 57 -> 28 -> 14 -> 7 -> 3 -> 1 leaves the last pool nothing to average.
The readout after the backbone works from 4 pixels on, so the backbone sets the limit
(`model.backbone.backbone_output_side` holds the arithmetic; tests check both 57 and 58 on the network).
"""


def missing_history(batch_size: int, dtype: torch.dtype = torch.float32,
                    device: Optional[torch.device] = None) -> tuple[Tensor, Tensor]:
    """x and y history (B, HISTORY_LENGTH) with every slot missing (NaN): no known preceding fixation."""
    missing = torch.full((batch_size, HISTORY_LENGTH), math.nan, dtype=dtype, device=device)
    return missing, missing.clone()


def central_history(batch_size: int, height: int, width: int, dtype: torch.dtype = torch.float32,
                    device: Optional[torch.device] = None) -> tuple[Tensor, Tensor]:
    """The dummy central history of images of height x width pixels: x and y (B, HISTORY_LENGTH) with slot 0 at
    the image centre (W/2, H/2) in pixels and the other slots missing (NaN), as DeepGaze III's initial fixation."""
    x_hist, y_hist = missing_history(batch_size, dtype, device)
    x_hist[:, 0] = width / 2
    y_hist[:, 0] = height / 2
    return x_hist, y_hist


class NetworkInputs(TypedDict):
    """What `DeepGazeIII.forward(image, centerbias, x_hist, y_hist)` takes, as dict fields.

    image: (B,3,H,W) uint8 RGB 0..255, one size per batch.
    centerbias: (B,H,W) float32 centre-bias log density (nats) for that size.
    x_hist, y_hist: (B,HISTORY_LENGTH) float32 preceding fixations in pixels, most recent first, NaN = missing.
    """

    image: Tensor
    centerbias: Tensor
    x_hist: Tensor
    y_hist: Tensor


class Batch(NetworkInputs):
    """A training, validation or test batch: the network inputs and the target fixations.

    centerbias: fitted on the training fixations only.
    x_hist, y_hist: all NaN for history "none", the central history for "dummy", the scanpath for "real".
    fix_batch: (K,) int64 sample of the batch each target fixation belongs to.
    fix_x, fix_y: (K,) float64 target fixation coordinates in pixels of the (resized) image (float64: float32
        rounding can move int(x) to the next pixel).
    weight: (B,) float32 sample weight for image averaging: 1 per image in per-image mode, 1/(target fixations of
        its image) per fixation sample.
    image_index: (B,) int64 index of the sample's image in the split's FixationDataset (sAUC pool, gold standard).
    """

    fix_batch: Tensor
    fix_x: Tensor
    fix_y: Tensor
    weight: Tensor
    image_index: Tensor
