"""Drawing log densities over images: a heat-colour overlay, fixation markers, and the validation panel (a row of
overlays) that `deepgaze_lit.callbacks.ValidationPanel` logs; `deepgaze_lit.predict` writes the overlays as PNGs."""

import numpy as np
import torch
from PIL import Image

# Anchor colours (RGB 0..255) of a dark-to-bright heat colour map, evenly spaced over [0, 1].
_HEAT_ANCHORS = np.array(
    [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]],
    dtype=np.float64,
)


def heat_colours(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (any shape S) to RGB colours (S + (3,)) as float64 0..255."""
    positions = np.clip(values, 0.0, 1.0) * (len(_HEAT_ANCHORS) - 1)
    lower = np.minimum(positions.astype(np.int64), len(_HEAT_ANCHORS) - 2)
    fraction = (positions - lower)[..., None]
    return _HEAT_ANCHORS[lower] * (1.0 - fraction) + _HEAT_ANCHORS[lower + 1] * fraction


def density_overlay(image: np.ndarray, log_density: np.ndarray, opacity: float = 0.6) -> np.ndarray:
    """Blend a log density (H,W) in nats, shown relative to its maximum, over an image (H,W,3), (H,W,1) or (H,W)
    uint8. Returns (H,W,3) uint8.
    """
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    if image.shape[:2] != log_density.shape:
        raise ValueError(f"image size {image.shape[:2]} differs from the log density's {log_density.shape}")
    relative = np.exp(log_density.astype(np.float64) - log_density.max())
    blended = (1.0 - opacity) * image.astype(np.float64) + opacity * heat_colours(relative)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def draw_fixations(image: np.ndarray, xs: np.ndarray, ys: np.ndarray, radius: int = 2) -> np.ndarray:
    """Return a copy of `image` (H,W,3) uint8 with a cyan square of half-size `radius` pixels at each fixation."""
    marked = image.copy()
    height, width = marked.shape[:2]
    for x, y in zip(np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)):
        column, row = int(x), int(y)
        marked[max(row - radius, 0) : min(row + radius + 1, height),
               max(column - radius, 0) : min(column + radius + 1, width)] = (0, 255, 255)
    return marked



def render_panel(batch: dict, log_density: torch.Tensor, num_images: int, height: int) -> np.ndarray:
    """Side by side, the first `num_images` samples of a batch: predicted density over the image, fixations as
    cyan squares; each scaled to `height` pixels. Returns (height, W_total, 3) uint8."""
    images = batch["image"][:num_images].detach().cpu().numpy().transpose(0, 2, 3, 1)
    log_densities = log_density[:num_images, 0].detach().float().cpu().numpy()
    fix_batch = batch["fix_batch"].detach().cpu().numpy()
    fix_x = batch["fix_x"].detach().cpu().numpy()
    fix_y = batch["fix_y"].detach().cpu().numpy()
    tiles = []
    for index, (image, sample_log_density) in enumerate(zip(images, log_densities)):
        own = fix_batch == index
        tile = draw_fixations(density_overlay(image, sample_log_density), fix_x[own], fix_y[own])
        width = max(1, round(tile.shape[1] * height / tile.shape[0]))
        tiles.append(np.asarray(Image.fromarray(tile).resize((width, height), Image.BILINEAR)))
        tiles.append(np.full((height, 4, 3), 255, dtype=np.uint8))
    return np.concatenate(tiles[:-1], axis=1)
