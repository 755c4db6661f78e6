"""Parameter-holding layers of the DeepGaze III readout and the stacked operations that apply them.

The modules here only own parameters, under the state-dict names of the released model. The mixture evaluates all
components at once: per-component tensors are laid out as (B, K, C, P) (batch, component, channel, flattened
grid position) and 1x1 convolutions become batched matrix products.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

LAYER_NORM_EPS = 1e-12


class LayerNorm(nn.Module):
    """Per-sample normalisation over (C, H, W) with a per-channel affine `weight`, `bias` (C,); eps 1e-12.

    Numerically `GroupNorm(1, C, eps=1e-12)`. Applied by `group_layer_norm`.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))


class Bias(nn.Module):
    """Learnable per-channel additive bias `bias` (C,), initialised to 0."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))


class MultiInputLayerNorm(nn.Module):
    """One `layernorm_part{i}` per input with a non-zero channel count (inputs with 0 channels are absent)."""

    def __init__(self, channels: list[int]):
        super().__init__()
        for index, count in enumerate(channels):
            if count:
                self.add_module(f"layernorm_part{index}", LayerNorm(count))


class MultiInputConv(nn.Module):
    """One bias-free 1x1 `conv_part{i}` per input with a non-zero channel count; their outputs are summed."""

    def __init__(self, channels: list[int], out_channels: int):
        super().__init__()
        for index, count in enumerate(channels):
            if count:
                self.add_module(f"conv_part{index}", nn.Conv2d(count, out_channels, 1, bias=False))


class ScanpathHistoryEncoding(nn.Module):
    """One 1x1 convolution with bias per history slot (`convolutions.{i}`), input (dx_i, dy_i, d_i) in pixels."""

    def __init__(self, in_fixations: int = 4, channels_per_fixation: int = 3, out_channels: int = 128):
        super().__init__()
        self.convolutions = nn.ModuleList(
            nn.Conv2d(channels_per_fixation, out_channels, 1) for _ in range(in_fixations)
        )


class GaussianBlur(nn.Module):
    """Separable Gaussian blur with a 0-dim learnable `sigma` (grid pixels), truncated at `truncate` sigmas.

    Applied by `gaussian_blur`.
    """

    def __init__(self, sigma: float = 8.0, truncate: float = 3.0, learn_sigma: bool = True):
        super().__init__()
        self.sigma = nn.Parameter(torch.tensor(float(sigma)), requires_grad=learn_sigma)
        self.truncate = truncate


def stack_parameters(tensors: list[Tensor], shape: tuple[int, ...]) -> Tensor:
    """Stack one parameter per component, each viewed as `shape`: (K, *shape)."""
    return torch.stack([tensor.reshape(shape) for tensor in tensors])


def group_layer_norm(x: Tensor, weight: Tensor, bias: Tensor, cell_weight: Tensor | None = None) -> Tensor:
    """LayerNorm of every component: x (B, K, C, P) normalised per (b, k) over (C, P), affine `weight`, `bias` (K, C).

    `cell_weight` (P,): how many cells of the grid the network conceptually runs on copy each position (a nearest
    upsampling of x); the statistics are those of that upsampled map. None: every position counts once.
    """
    batch, components, channels, positions = x.shape
    if cell_weight is None:
        normalised = F.group_norm(
            x.reshape(batch, components * channels, positions),
            components,
            weight.reshape(-1),
            bias.reshape(-1),
            LAYER_NORM_EPS,
        )
        return normalised.view(batch, components, channels, positions)
    with torch.autocast(x.device.type, enabled=False):
        x = x.to(torch.promote_types(x.dtype, cell_weight.dtype))
        position_weight = cell_weight.to(x.dtype) / (channels * cell_weight.sum())
        mean = (x @ position_weight).sum(-1)[..., None, None]
        centred = x - mean
        variance = (centred.square() @ position_weight).sum(-1)[..., None, None]
        normalised = centred * torch.rsqrt(variance + LAYER_NORM_EPS)
        return normalised * weight[..., None].to(x.dtype) + bias[..., None].to(x.dtype)


def gaussian_blur(x: Tensor, sigma: Tensor, truncate: float) -> Tensor:
    """Blur each component's map separately: x (B, K, h, w), `sigma` (K,) in grid pixels.

    Kernel of component k: exp(-t^2 / (2 sigma_k^2)) for |t| <= ceil(truncate * sigma_k), normalised to sum 1; rows
    first, then columns; replicate padding. All components share one zero-extended kernel length, which changes
    nothing because the padding replicates the border.
    """
    components = x.shape[1]
    radii = [math.ceil(truncate * value) for value in sigma.detach().tolist()]
    max_radius = max(radii)
    offsets = torch.arange(-max_radius, max_radius + 1, dtype=x.dtype, device=x.device)
    within = offsets.abs()[None, :] <= torch.tensor(radii, dtype=x.dtype, device=x.device)[:, None]
    kernel = torch.exp(-0.5 * (offsets[None, :] / sigma.to(x.dtype)[:, None]).square()) * within
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    length = kernel.shape[1]
    x = F.pad(x, (0, 0, max_radius, max_radius), mode="replicate")
    x = F.conv2d(x, kernel.view(components, 1, length, 1), groups=components)
    x = F.pad(x, (max_radius, max_radius, 0, 0), mode="replicate")
    return F.conv2d(x, kernel.view(components, 1, 1, length), groups=components)
