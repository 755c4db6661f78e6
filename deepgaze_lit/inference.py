"""Prediction for one image at the size the model was trained at, returned at the image's own size.

The image is resized by a training resize policy (`data/resize.py`), the centre bias is taken at that input size,
the network predicts there, and the density is resized back to the image's size: bilinear interpolation of the
density (not of the log density; Pillow's filter, which averages over the source pixels when shrinking), floored at
the smallest positive float64, renormalised to sum 1 and logged (`resize_log_density`). The result is finite with
logsumexp 0 in float64.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from scipy.special import logsumexp

from deepgaze_lit.data.centerbias import CenterbiasModel
from deepgaze_lit.data.errors import DataError
from deepgaze_lit.data.resize import ResizePolicy, resize_image, resize_log_density, target_shape
from deepgaze_lit.data.torch_dataset import history_slots
from deepgaze_lit.model import MIN_IMAGE_SIDE, DeepGazeIII

LOG_DENSITY_FLOOR = float(np.log(np.finfo(np.float64).tiny))
"""Smallest log density (nats) a prediction keeps: zero or -inf densities are raised to it before renormalising."""


def as_rgb(image: np.ndarray) -> np.ndarray:
    """(H,W,3) uint8 RGB from an (H,W), (H,W,1) or (H,W,3) uint8 array (greyscale repeated to three channels)."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3) or image.dtype != np.uint8:
        raise ValueError(f"image must be (H,W), (H,W,1) or (H,W,3) uint8, got {image.shape} {image.dtype}")
    return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image


def predict_log_density(
    network: DeepGazeIII,
    image: np.ndarray,
    centerbias: CenterbiasModel,
    resize: ResizePolicy = "two_sizes",
    max_side: Optional[int] = None,
    x_hist: Optional[Sequence[float]] = None,
    y_hist: Optional[Sequence[float]] = None,
    source: str = "image",
) -> np.ndarray:
    """(H,W) float64 log density (nats, logsumexp 0, finite) of the next fixation on `image` (H,W,3) uint8 RGB.

    The network sees the image at `target_shape(image size, resize, max_side)` with `centerbias.log_density` of
    that shape. History (scanpath networks only): `x_hist`, `y_hist` are the previous fixations in pixels of the
    ORIGINAL image, chronological (pysaliency's order), NaN or an empty sequence = none; their last four are scaled
    to the input size and fed most recent first. Without a history (None) a scanpath network gets the dummy central
    fixation of `deepgaze predict`. The network runs in its current mode on its own device, without gradient.
    `source` names the image in errors (e.g. its file).
    """
    image = as_rgb(image)
    native = image.shape[:2]
    shape = target_shape(native, resize, max_side)
    if min(shape) < MIN_IMAGE_SIDE:
        raise DataError(f"{source}: image is {shape[0]}x{shape[1]} pixels (H x W) at the network input; "
                        f"expected both sides >= {MIN_IMAGE_SIDE} (upscale it or choose another resize policy)")
    if x_hist is None and y_hist is None:
        xs, ys = history_slots("dummy", shape)
    else:
        x_scaled = np.asarray(x_hist, dtype=np.float64).reshape(-1) * shape[1] / native[1]
        y_scaled = np.asarray(y_hist, dtype=np.float64).reshape(-1) * shape[0] / native[0]
        if x_scaled.shape != y_scaled.shape:
            raise ValueError(f"x_hist and y_hist lengths differ: {x_scaled.shape[0]} and {y_scaled.shape[0]}")
        xs, ys = history_slots("real", shape, x_scaled, y_scaled)
    device = next(network.parameters()).device
    pixels = torch.from_numpy(np.ascontiguousarray(resize_image(image, shape).transpose(2, 0, 1)))[None]
    log_centerbias = torch.from_numpy(centerbias.log_density(shape).astype(np.float32))[None]
    with torch.no_grad():
        output = network(pixels.to(device), log_centerbias.to(device),
                         xs[None].to(device), ys[None].to(device))
    log_density = output[0, 0].double().cpu().numpy()
    log_density = np.maximum(np.nan_to_num(log_density, nan=LOG_DENSITY_FLOOR, neginf=LOG_DENSITY_FLOOR),
                             LOG_DENSITY_FLOOR)
    log_density = np.maximum(resize_log_density(log_density, native), LOG_DENSITY_FLOOR)
    return log_density - logsumexp(log_density)


class DensityPredictor:
    """A network with its centre bias and input-size policy: image -> log density at the image's own size.

    Args:
        network: the DeepGaze III network (put in eval mode here).
        centerbias: centre-bias model, asked for the log density at each input size (`UniformCenterbias`,
            `TemplateCenterbias`, `BaselineCenterbias`).
        resize, max_side: the input-size policy ("two_sizes": MIT1003's 768x1024 / 1024x768, "max_side": long side
            at most `max_side` pixels, "native"); an invalid policy raises ValueError here.
    """

    def __init__(self, network: DeepGazeIII, centerbias: CenterbiasModel, resize: ResizePolicy = "two_sizes",
                 max_side: Optional[int] = None):
        target_shape((1, 1), resize, max_side)
        self.network = network.eval()
        self.centerbias = centerbias
        self.resize = resize
        self.max_side = max_side

    def input_shape(self, shape: Sequence[int]) -> tuple[int, int]:
        """(H, W) in pixels at which the network sees an image of `shape` (H, W)."""
        return target_shape((int(shape[0]), int(shape[1])), self.resize, self.max_side)

    def log_density(self, image: np.ndarray, x_hist: Optional[Sequence[float]] = None,
                    y_hist: Optional[Sequence[float]] = None, source: str = "image") -> np.ndarray:
        """(H,W) float64 log density (nats) at the image's size; see `predict_log_density`."""
        return predict_log_density(self.network, image, self.centerbias, self.resize, self.max_side,
                                   x_hist, y_hist, source)
