"""DeepGaze's loss and the entropy regulariser (pure PyTorch, used by `DeepGazeModule`).

Loss: for every sample the mean log density at its target fixations, as information gain over a uniform density
in bit/fix, `(mean log p + log(H*W)) / ln 2`; samples averaged with their `weight` normalised to mean 1 (equal
image weights); loss = minus that. It reads the log density only at the fixations (`BlockLogDensity.at`), never at
full resolution.

Entropy regularisation (off unless the module's `entropy_weight` > 0): loss = NLL - entropy_weight * H, with H in
nats (divided by log(H*W) with `normalise`), so a positive weight pushes the entropy up:
- `bias_map`: H is the entropy of the model's mean density over 16 content-free probe images (uniform colours with
  channel intensities in {0, 0.5, 1} x 255, uniform centre bias, one central dummy history fixation), i.e. of the
  bias the network adds on its own. It is recomputed, with gradient, on every training step whose global step is
  a multiple of `every`, and enters the loss on those steps only (on the others loss = NLL).
- `prediction`: H is the mean entropy of the predicted densities of the training batch (a confidence penalty),
  computed on every training step.
"""

import math
from typing import Literal, Optional

import torch

from deepgaze_lit.batch import central_history
from deepgaze_lit.metrics.functional import ig_uniform_bits
from deepgaze_lit.model.deepgaze3 import BlockLogDensity, DeepGazeIII

PROBE_LEVELS = (0.0, 127.5, 255.0)
NUM_PROBES = 16


def fixation_log_likelihood_bits(
    block: BlockLogDensity, fix_batch: torch.Tensor, fix_x: torch.Tensor, fix_y: torch.Tensor, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, the mean log density at its target fixations as IG over uniform in bit/fix (B,) float32, and
    its number of target fixations (B,) float32."""
    log_density = block.at(fix_batch, fix_x, fix_y).float()
    sums = torch.zeros(batch_size, dtype=torch.float32, device=log_density.device).index_add(0, fix_batch, log_density)
    counts = torch.zeros_like(sums).index_add(0, fix_batch, torch.ones_like(log_density))
    height, width = block.image_shape
    mean_log_density = sums / counts.clamp_min(1.0)
    return ig_uniform_bits(mean_log_density, height * width), counts


def weighted_nll_bits(ll_bits: torch.Tensor, counts: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Loss in bit/fix: minus the per-sample IG over uniform `ll_bits` (B,) averaged with `weight` (B,)
    normalised to mean 1 over the samples that have target fixations (`counts` > 0)."""
    weight = weight.float() * (counts > 0)
    return -(weight * ll_bits).sum() / weight.sum()


def probe_inputs(height: int, width: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The `bias_map` probes: 16 uniform-colour images (16,3,H,W) uint8 with channel intensities in
    {0, 127.5, 255} (16 of the 27 colours, evenly spaced in their lexicographic order, black and white included),
    a uniform centre bias (16,H,W) in nats and one central history fixation (16,4) in pixels (NaN = missing)."""
    levels = torch.tensor(PROBE_LEVELS, dtype=torch.float64)
    colours = torch.cartesian_prod(levels, levels, levels)
    chosen = torch.linspace(0, len(colours) - 1, NUM_PROBES).round().long()
    image = colours[chosen].round().to(torch.uint8)[:, :, None, None].expand(NUM_PROBES, 3, height, width)
    centerbias = torch.full((NUM_PROBES, height, width), -math.log(height * width))
    x_hist, y_hist = central_history(NUM_PROBES, height, width)
    inputs = {"image": image.contiguous(), "centerbias": centerbias, "x_hist": x_hist, "y_hist": y_hist}
    return {name: value.to(device) for name, value in inputs.items()}


def bias_map_entropy(network: DeepGazeIII, height: int, width: int) -> torch.Tensor:
    """Entropy in nats (0-dim, with gradient) of the network's mean density over the probe images of size
    `height` x `width`, on the network's device. Probes run in eval mode; the previous train/eval mode is
    restored afterwards."""
    was_training = network.training
    network.eval()
    try:
        probes = probe_inputs(height, width, next(network.parameters()).device)
        features = network.backbone_features(probes["image"])
        block = network.head(features, probes["centerbias"], probes["x_hist"], probes["y_hist"])
        mean_log_density = torch.logsumexp(block.values, dim=0, keepdim=True) - math.log(NUM_PROBES)
        return BlockLogDensity(mean_log_density, block.grid_to_image).entropy()[0].float()
    finally:
        network.train(was_training)


def regulariser_entropy(
    block: BlockLogDensity,
    network: DeepGazeIII,
    mode: Literal["bias_map", "prediction"],
    global_step: int,
    every: int,
    normalise: bool,
) -> Optional[torch.Tensor]:
    """The regulariser's entropy in nats (0-dim; divided by log(H*W) with `normalise`) for a training step whose
    prediction is `block`, or None on `bias_map` steps that are not a multiple of `every`."""
    if mode == "prediction":
        entropy = block.entropy().float().mean()
    elif global_step % every == 0:
        entropy = bias_map_entropy(network, *block.image_shape)
    else:
        return None
    if normalise:
        entropy = entropy / math.log(block.image_shape[0] * block.image_shape[1])
    return entropy
