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

    def forward(self, encoding: Tensor, valid: Tensor) -> Tensor:
        """encoding (B, 3 * slots, P) [dx0.., dy0.., d0..] pixels, 0 for missing slots; valid (B, slots) bool.

        Returns (B, out_channels, P); a missing slot contributes exactly 0, its bias included. Computed in float32
        or better (autocast off): the inputs are raw pixel offsets.
        """
        slots = len(self.convolutions)
        weight = torch.stack([conv.weight.flatten(1) for conv in self.convolutions], dim=-1)  # (out, 3, slots)
        bias = torch.stack([conv.bias for conv in self.convolutions])  # (slots, out)
        with torch.autocast(encoding.device.type, enabled=False):
            weight = weight.reshape(-1, 3 * slots).to(encoding.dtype)
            return conv1x1(weight, encoding, valid.to(encoding.dtype) @ bias.to(encoding.dtype))


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


class _SoftplusLayerNormConv(torch.autograd.Function):
    """y = W (gamma * (s - mean) / std + beta) + b with s = softplus(e), LayerNorm statistics per sample over (C, P).

    Equal to softplus -> LayerNorm -> 1x1 conv, but neither softplus(e) nor the normalised map is kept: the affine
    and 1/std are folded into the convolution weight, and the backward pass recomputes s from e, so one (B, C, P)
    tensor is stored instead of three. Samples flagged `constant` (B,) take x_hat = 0 (the exact LayerNorm of a
    constant map).
    """

    @staticmethod
    def forward(ctx, e, gamma, beta, weight, bias, constant):
        batch, channels, positions = e.shape
        device = e.device.type
        out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else e.dtype
        with torch.autocast(device, enabled=False):
            s = F.softplus(e)
            _, mean, inv_std = torch.native_group_norm(
                s.to(torch.promote_types(s.dtype, weight.dtype)), None, None, batch, channels, positions, 1,
                LAYER_NORM_EPS,
            )  # the statistics of F.group_norm, (B, 1) each
            mean, inv_std = mean[:, 0], torch.where(constant, 0, inv_std[:, 0])
            scaled = weight * gamma  # (O, C)
            slope = scaled[None] * inv_std[:, None, None]  # (B, O, C)
            offset = (weight @ beta + bias)[None] - (inv_std * mean)[:, None] * scaled.sum(1)[None]  # (B, O)
            ctx.save_for_backward(e, mean, inv_std, gamma, beta, weight, slope)
            return torch.baddbmm(offset[:, :, None].to(out_dtype), slope.to(out_dtype), s.to(out_dtype))

    @staticmethod
    def backward(ctx, grad):
        e, mean, inv_std, gamma, beta, weight, slope = ctx.saved_tensors
        s = F.softplus(e)
        grad = grad.to(s.dtype)
        small = slope.dtype
        count = s.shape[1] * s.shape[2]
        row_sums = grad.sum(2, dtype=small)  # (B, O)
        grad_times_x_hat = inv_std[:, None, None] * (
            torch.bmm(grad, s.transpose(1, 2)).to(small) - row_sums[:, :, None] * mean[:, None, None]
        )  # (B, O, C): sum over positions of grad * x_hat
        weight_grad = (grad_times_x_hat * gamma).sum(0) + row_sums.sum(0)[:, None] * beta
        gamma_grad = (grad_times_x_hat * weight).sum((0, 1))
        beta_grad = row_sums.sum(0) @ weight
        bias_grad = row_sums.sum(0)
        mean_term = (row_sums @ weight) @ gamma / count  # (B,): mean of d loss / d x_hat
        x_hat_term = (grad_times_x_hat * (weight * gamma)).sum((1, 2)) / count  # (B,): mean of x_hat d loss / d x_hat
        offset = inv_std * (inv_std * mean * x_hat_term - mean_term)
        grad_s = torch.baddbmm(
            offset[:, None, None].expand(-1, s.shape[1], 1).to(s.dtype), slope.transpose(1, 2).to(s.dtype), grad
        )
        grad_s.addcmul_(s, (inv_std.square() * x_hat_term)[:, None, None].to(s.dtype), value=-1)
        del s
        grad_e = torch.ops.aten.softplus_backward(grad_s, e, 1.0, 20.0)
        return grad_e, gamma_grad, beta_grad, weight_grad, bias_grad, None


def softplus_layer_norm_conv(
    e: Tensor, norm: LayerNorm, weight: Tensor, bias: Tensor, constant: Tensor | None = None
) -> Tensor:
    """conv1x1(weight, norm(softplus(e)), bias) for e (B, C, P) -> (B, O, P), storing only e for the backward pass.

    `constant` (B,) bool: samples whose softplus(e) is known to be spatially constant; their normalised map is
    set to exactly 0 (a float LayerNorm of a constant map returns eps-amplified rounding noise instead).
    """
    if constant is None:
        constant = torch.zeros(e.shape[0], dtype=torch.bool, device=e.device)
    return _SoftplusLayerNormConv.apply(e, norm.weight, norm.bias, weight.flatten(1), bias, constant)


def _blur_matrices(kernel: Tensor, radius: int, size: int) -> Tensor:
    """(K, size, size): row i holds the taps of a replicate-padded 1-D convolution with `kernel` (K, 2 radius + 1)."""
    components, taps = kernel.shape
    offsets = torch.arange(-radius, radius + 1, device=kernel.device)
    source = (torch.arange(size, device=kernel.device)[:, None] + offsets[None, :]).clamp(0, size - 1)
    matrices = torch.zeros(components, size, size, dtype=kernel.dtype, device=kernel.device)
    return matrices.scatter_add(2, source.expand(components, size, taps), kernel[:, None, :].expand(-1, size, -1))


def gaussian_blur(x: Tensor, sigma: Tensor, truncate: float) -> Tensor:
    """Blur each component's map separately: x (B, K, h, w), `sigma` (K,) in grid pixels.

    Kernel of component k: exp(-t^2 / (2 sigma_k^2)) for |t| <= ceil(truncate * sigma_k), normalised to sum 1; rows
    first, then columns; replicate padding. Each pass is a product with a banded matrix that has the padding folded
    in; all components share one zero-extended kernel length, which changes nothing.
    """
    radii = [math.ceil(truncate * value) for value in sigma.detach().tolist()]
    max_radius = max(radii)
    offsets = torch.arange(-max_radius, max_radius + 1, dtype=x.dtype, device=x.device)
    within = offsets.abs()[None, :] <= torch.tensor(radii, dtype=x.dtype, device=x.device)[:, None]
    kernel = torch.exp(-0.5 * (offsets[None, :] / sigma.to(x.dtype)[:, None]).square()) * within
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    rows = _blur_matrices(kernel, max_radius, x.shape[-2])
    cols = _blur_matrices(kernel, max_radius, x.shape[-1])
    return rows @ x @ cols.transpose(-1, -2)
