"""Layers of the DeepGaze III readout, on maps laid out as (B, C, P): batch, channel, flattened grid position.

Module and parameter names are those of the released model's state dict. A 1x1 convolution on such a map is a
batched matrix product (`conv1x1`).

Some maps are computed on a coarser grid than the one the network is defined on (nearest upsampling commutes with
every pointwise layer). `cell_weight` (P,) then says how many cells of the defining grid copy each position, and
LayerNorm statistics are weighted by it, so that they equal those of the upsampled map.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

LAYER_NORM_EPS = 1e-12


def normalise(x: Tensor, cell_weight: Tensor) -> Tensor:
    """(x - mean) / sqrt(var + eps) per sample over (C, P), positions weighted by `cell_weight` (P,); x (B, C, P).

    Computed in at least float32 (autocast off): the maps normalised this way are small.
    """
    with torch.autocast(x.device.type, enabled=False):
        x = x.to(torch.promote_types(x.dtype, cell_weight.dtype))
        position_weight = cell_weight.to(x.dtype) / (x.shape[1] * cell_weight.sum())
        mean = (x @ position_weight).sum(-1)[:, None, None]
        centred = x - mean
        variance = (centred.square() @ position_weight).sum(-1)[:, None, None]
        return centred * torch.rsqrt(variance + LAYER_NORM_EPS)


class LayerNorm(nn.Module):
    """Per-sample normalisation over (C, P) with a per-channel affine `weight`, `bias` (C,); eps 1e-12.

    Numerically `GroupNorm(1, C, eps=1e-12)`.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor, cell_weight: Tensor | None = None) -> Tensor:
        """x (B, C, P) -> (B, C, P); `cell_weight` (P,) weights the statistics (None: each position once)."""
        if cell_weight is None:
            return F.group_norm(x, 1, self.weight, self.bias, LAYER_NORM_EPS)
        normalised = normalise(x, cell_weight)
        return normalised * self.weight[:, None].to(normalised.dtype) + self.bias[:, None].to(normalised.dtype)


class Bias(nn.Module):
    """Learnable per-channel additive bias `bias` (C,), initialised to 0 (added inside `conv1x1`)."""

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
    """One 1x1 convolution with bias per history slot (`convolutions.{i}`) on (dx_i, dy_i, d_i), summed over the
    slots present."""

    def __init__(self, in_fixations: int = 4, channels_per_fixation: int = 3, out_channels: int = 128):
        super().__init__()
        self.convolutions = nn.ModuleList(
            nn.Conv2d(channels_per_fixation, out_channels, 1) for _ in range(in_fixations)
        )

    def affine(self, valid: Tensor) -> tuple[Tensor, Tensor]:
        """The slots' convolutions as one 1x1 convolution on the encoding (B, 3 * slots, P) [dx0.., dy0.., d0..]
        (pixels, 0 for missing slots): weight (out_channels, 3 * slots) and per-sample bias (B, out_channels), the
        sum of the present slots' biases (valid (B, slots) bool), so a missing slot contributes exactly 0. In the
        parameters' precision (autocast off): the encoding holds raw pixel offsets."""
        weight = torch.stack([conv.weight.flatten(1) for conv in self.convolutions], dim=-1)  # (out, 3, slots)
        bias = torch.stack([conv.bias for conv in self.convolutions])  # (slots, out)
        with torch.autocast(valid.device.type, enabled=False):
            return weight.flatten(1), valid.to(bias.dtype) @ bias


class GaussianBlur(nn.Module):
    """Separable Gaussian blur with a 0-dim learnable `sigma` (grid pixels), truncated at `truncate` sigmas.

    Applied, for several components at once, by `gaussian_blur`.
    """

    def __init__(self, sigma: float = 8.0, truncate: float = 3.0, learn_sigma: bool = True):
        super().__init__()
        self.sigma = nn.Parameter(torch.tensor(float(sigma)), requires_grad=learn_sigma)
        self.truncate = truncate


def conv1x1(weight: Tensor, x: Tensor, bias: Tensor | None = None) -> Tensor:
    """1x1 convolution of x (B, C, P) with weight (O, C) (or an (O, C, 1, 1) conv weight), bias (O,) or (B, O).

    Returns (B, O, P), computed as one batched matrix product with the bias added inside it.
    """
    weight = weight.flatten(1)
    batch, out_channels = x.shape[0], weight.shape[0]
    weight = weight.expand(batch, *weight.shape)
    if bias is None:
        return torch.bmm(weight, x)
    return torch.baddbmm(bias.expand(batch, out_channels)[:, :, None], weight, x)


SOFTPLUS_THRESHOLD = 20.0
"""Above this input softplus returns its input (`F.softplus`'s default threshold)."""


def softplus_values(x: Tensor) -> Tensor:
    """F.softplus(x) (beta 1, threshold 20) without autograd.

    float32 on the CPU is computed as relu(x) + log1p(exp(-|x|)) from vectorised exp and log, log1p(u) taken as
    log(1 + u) + (u - ((1 + u) - 1)) / (1 + u) (within 2e-7 relative of float64; vectorised, unlike torch's float32
    CPU softplus and log1p). Inputs below -80 give exp(-80) = 1.8e-35 instead of an underflowing exp(x)
    (denormals are slow). Other devices and dtypes use F.softplus.
    """
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return F.softplus(x)
    u = x.abs().neg_().clamp_(min=-80.0).exp_()
    w = u + 1
    correction = (w - 1).neg_().add_(u).div_(w)
    return w.log_().add_(correction).add_(x.clamp(min=0))


class _Softplus(torch.autograd.Function):
    """`softplus_values` with F.softplus's gradient; stores the input only."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return softplus_values(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return torch.ops.aten.softplus_backward(grad, x, 1.0, SOFTPLUS_THRESHOLD)


def softplus(x: Tensor) -> Tensor:
    """F.softplus (beta 1, threshold 20), faster in float32 on the CPU eagerly (`softplus_values`); under
    torch.compile F.softplus itself, which the compiler fuses with its neighbours."""
    if torch.compiler.is_compiling() or x.device.type != "cpu" or x.dtype != torch.float32:
        return F.softplus(x)
    return _Softplus.apply(x)


def _blur_matrices(kernel: Tensor, radius: int, size: int) -> Tensor:
    """(K, size, size): row i holds the taps of a replicate-padded 1-D convolution with `kernel` (K, 2 radius + 1)."""
    components, taps = kernel.shape
    offsets = torch.arange(-radius, radius + 1, device=kernel.device)
    source = (torch.arange(size, device=kernel.device)[:, None] + offsets[None, :]).clamp(0, size - 1)
    matrices = torch.zeros(components, size, size, dtype=kernel.dtype, device=kernel.device)
    return matrices.scatter_add(2, source.expand(components, size, taps), kernel[:, None, :].expand(-1, size, -1))


@torch.compiler.disable(reason="the kernel length depends on sigma's value")
def blur_matrices(sigma: Tensor, truncate: float, shape: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """The separable Gaussian blur of each component as banded matrices: rows (K, h, h), cols (K, w, w) for maps
    of `shape` (h, w); `sigma` (K,) in grid pixels, differentiable.

    Kernel of component k: exp(-t^2 / (2 sigma_k^2)) for |t| <= ceil(truncate * sigma_k), normalised to sum 1;
    replicate padding folded into the matrices; all components share one zero-extended kernel length, which
    changes nothing. Run eagerly under torch.compile (the kernel length is read from sigma), so the compiled
    graph only sees matrices of the fixed shapes above.
    """
    radii = [math.ceil(truncate * value) for value in sigma.detach().tolist()]
    max_radius = max(radii)
    offsets = torch.arange(-max_radius, max_radius + 1, dtype=sigma.dtype, device=sigma.device)
    within = offsets.abs()[None, :] <= torch.tensor(radii, dtype=sigma.dtype, device=sigma.device)[:, None]
    kernel = torch.exp(-0.5 * (offsets[None, :] / sigma[:, None]).square()) * within
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    return _blur_matrices(kernel, max_radius, shape[0]), _blur_matrices(kernel, max_radius, shape[1])


def gaussian_blur(x: Tensor, sigma: Tensor, truncate: float) -> Tensor:
    """Blur each component's map separately: x (B, K, h, w), `sigma` (K,) in grid pixels (`blur_matrices`): rows
    first, then columns."""
    rows, cols = blur_matrices(sigma.to(x.dtype), truncate, tuple(x.shape[-2:]))
    return rows @ x @ cols.transpose(-1, -2)
