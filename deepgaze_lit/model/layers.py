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
    log(1 + u) + (u - ((1 + u) - 1)) / (1 + u) (within 2e-7 relative of float64; torch's float32 CPU softplus and
    log1p are scalar loops, 2.7x slower). Inputs below -80 give exp(-80) = 1.8e-35 instead of an underflowing exp(x)
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


@torch.compiler.disable
def softplus(x: Tensor) -> Tensor:
    """F.softplus (beta 1, threshold 20), faster in float32 on the CPU (`softplus_values`). Run eagerly under
    torch.compile (a graph break), like `conv_softplus_layer_norm_conv`."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return F.softplus(x)
    return _Softplus.apply(x)


CPU_CHUNK_ELEMENTS = 2**17
"""Elements per sample of the wide hidden map computed at a time on the CPU (0.5 MiB in float32: a batch of 2 stays
in cache, and no large temporary reaches the allocator)."""


class _ConvSoftplusLayerNormConv(torch.autograd.Function):
    """y = W (gamma * (s - mean) / std + beta) + b with s = softplus(e), e = V x + c, LayerNorm statistics per
    sample over (C, P).

    Equal to 1x1 conv -> softplus -> LayerNorm -> 1x1 conv, but the wide hidden map e / s is never held whole in the
    forward pass: it is computed in chunks of positions (one chunk off the CPU) and reduced to its statistics
    (merged per chunk in float64) and to W gamma (s - shift), shift = the first chunk's mean (no large-mean
    cancellation). The backward pass recomputes it from the narrow input x, so it exists whole only during this
    layer's backward (two passes over the chunks: the gradient's statistics, then the input gradients). Samples
    flagged `constant` (B,) take x_hat = 0 (the exact LayerNorm of a map constant over (C, P)). Computed in the
    parameters' precision with autocast off; under autocast the output is cast to the autocast dtype.
    """

    @staticmethod
    def forward(ctx, x, in_weight, in_bias, gamma, beta, weight, bias, constant):
        device = x.device.type
        autocast_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        with torch.autocast(device, enabled=False):
            hidden = _HiddenMap(x, in_weight, in_bias)
            scaled = (weight * gamma).expand(x.shape[0], -1, -1)  # (B, O, C)
            projected = x.new_empty((x.shape[0], weight.shape[0], x.shape[2]), dtype=weight.dtype)
            statistics = _RunningMoments(x.shape[0], x.device)
            shift = None
            for positions in hidden.chunks():
                s = softplus_values(hidden.pre_activation(positions))
                if shift is None:
                    shift = s.mean((1, 2))  # (B,): the first chunk's mean
                    statistics.add_centred(s.sub_(shift[:, None, None]), shift)
                else:
                    statistics.add(s)
                    s.sub_(shift[:, None, None])
                projected[:, :, positions] = torch.bmm(scaled, s)
            mean, inv_std = statistics.mean_and_inv_std(weight.dtype)
            inv_std = torch.where(constant, 0, inv_std)
            offset = (weight @ beta + bias)[None] - (inv_std * (mean - shift))[:, None] * scaled[0].sum(1)[None]
            ctx.save_for_backward(x, in_weight, in_bias, mean, inv_std, gamma, beta, weight)
            output = projected.mul_(inv_std[:, None, None]).add_(offset[:, :, None])
        return output if autocast_dtype is None else output.to(autocast_dtype)

    @staticmethod
    def backward(ctx, grad):
        x, in_weight, in_bias, mean, inv_std, gamma, beta, weight = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            return _ConvSoftplusLayerNormConv._gradients(
                grad.to(weight.dtype), x, in_weight, in_bias, mean, inv_std, gamma, beta, weight,
                ctx.needs_input_grad[0],
            )

    @staticmethod
    def _gradients(grad, x, in_weight, in_bias, mean, inv_std, gamma, beta, weight, input_needs_grad):
        hidden = _HiddenMap(x, in_weight, in_bias)
        batch = x.shape[0]
        grad_times_centred = grad.new_zeros(batch, weight.shape[0], in_weight.shape[0])  # (B, O, C)
        recomputed = []  # (e, s - mean) per chunk, for the second pass
        for positions in hidden.chunks():
            e = hidden.pre_activation(positions)
            centred = softplus_values(e).sub_(mean[:, None, None])
            grad_times_centred.baddbmm_(grad[:, :, positions], centred.transpose(1, 2))
            recomputed.append((e, centred))
        count = in_weight.shape[0] * x.shape[2]
        row_sums = grad.sum(2)  # (B, O)
        grad_times_x_hat = inv_std[:, None, None] * grad_times_centred  # (B, O, C): sum over positions of grad x_hat
        weight_grad = (grad_times_x_hat * gamma).sum(0) + row_sums.sum(0)[:, None] * beta
        gamma_grad = (grad_times_x_hat * weight).sum((0, 1))
        beta_grad = row_sums.sum(0) @ weight
        bias_grad = row_sums.sum(0)
        mean_term = (row_sums @ weight) @ gamma / count  # (B,): mean of d loss / d x_hat
        x_hat_term = (grad_times_x_hat * (weight * gamma)).sum((1, 2)) / count  # (B,): mean of x_hat d loss / d x_hat
        grad_s_offset = -(inv_std * mean_term)[:, None, None]
        grad_s_scale = (inv_std.square() * x_hat_term)[:, None, None]
        grad_s_slope = ((weight * gamma)[None] * inv_std[:, None, None]).transpose(1, 2)  # (B, C, O)
        in_weight_t = in_weight.t().expand(batch, -1, -1)
        grad_x = torch.empty_like(x) if input_needs_grad else None
        in_weight_grad = grad.new_zeros(batch, *in_weight.shape)
        in_bias_grad = grad.new_zeros(batch, in_weight.shape[0])
        recomputed.reverse()
        for positions in hidden.chunks():
            e, centred = recomputed.pop()  # released chunk by chunk
            grad_s = torch.baddbmm(grad_s_offset, grad_s_slope, grad[:, :, positions])
            grad_s.addcmul_(centred, grad_s_scale, value=-1)
            grad_e = torch.ops.aten.softplus_backward(grad_s, e, 1.0, SOFTPLUS_THRESHOLD)
            if grad_x is not None:
                grad_x[:, :, positions] = torch.bmm(in_weight_t, grad_e)
            in_weight_grad.baddbmm_(grad_e, hidden.input(positions).transpose(1, 2))
            in_bias_grad += grad_e.sum(2)
        in_bias_grad = in_bias_grad.sum(0) if in_bias.dim() == 1 else in_bias_grad
        return grad_x, in_weight_grad.sum(0), in_bias_grad, gamma_grad, beta_grad, weight_grad, bias_grad, None


class _HiddenMap:
    """e = conv1x1(weight, x, bias) of x (B, C, P), weight (H, C), bias (H,) or (B, H), computed a chunk of
    positions at a time in the weight's precision."""

    def __init__(self, x: Tensor, weight: Tensor, bias: Tensor):
        batch, channels, positions = x.shape
        self.x = x
        self.weight = weight.expand(batch, -1, -1)
        self.bias = bias.expand(batch, -1)[:, :, None]
        if x.device.type == "cpu":
            self.chunk = max(1, CPU_CHUNK_ELEMENTS // weight.shape[0])
        else:
            self.chunk = positions

    def chunks(self) -> list[slice]:
        return [slice(start, start + self.chunk) for start in range(0, self.x.shape[2], self.chunk)]

    def input(self, positions: slice) -> Tensor:
        return self.x[:, :, positions].to(self.weight.dtype)

    def pre_activation(self, positions: slice) -> Tensor:
        """(B, H, len(positions))."""
        return torch.baddbmm(self.bias, self.weight, self.input(positions))


class _RunningMoments:
    """Per-sample mean and variance over (C, P) of maps given in chunks of positions, merged in float64 (Chan et
    al.'s pairwise update; each chunk's squares are summed around its own mean, so no large-mean cancellation)."""

    def __init__(self, batch: int, device: torch.device):
        self.count = 0
        self.mean = torch.zeros(batch, dtype=torch.float64, device=device)
        self.sum_squares = torch.zeros(batch, dtype=torch.float64, device=device)

    def add(self, values: Tensor) -> None:
        """values (B, C, n): the next chunk."""
        mean = values.mean((1, 2))
        self.add_centred(values - mean[:, None, None], mean)

    def add_centred(self, centred: Tensor, mean: Tensor) -> None:
        """The next chunk given as its values minus their per-sample mean (B, C, n), and that mean (B,)."""
        sum_squares = torch.linalg.vector_norm(centred, dim=(1, 2)).double().square()
        count = centred.shape[1] * centred.shape[2]
        total = self.count + count
        delta = mean.double() - self.mean
        self.mean += delta * (count / total)
        self.sum_squares += sum_squares + delta.square() * (self.count * count / total)
        self.count = total

    def mean_and_inv_std(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(B,) mean and 1 / sqrt(variance + eps), in `dtype`."""
        variance = self.sum_squares / self.count
        return self.mean.to(dtype), torch.rsqrt(variance + LAYER_NORM_EPS).to(dtype)


@torch.compiler.disable
def conv_softplus_layer_norm_conv(
    x: Tensor,
    in_weight: Tensor,
    in_bias: Tensor,
    norm: LayerNorm,
    weight: Tensor,
    bias: Tensor,
    constant: Tensor | None = None,
) -> Tensor:
    """conv1x1(weight, norm(softplus(conv1x1(in_weight, x, in_bias))), bias): x (B, C, P) -> (B, O, P), storing only
    the narrow input x (and per-sample statistics) for the backward pass, not the wide hidden map.

    in_weight (H, C), in_bias (H,) or (B, H), weight (O, H) (or conv weights), bias (O,). `constant` (B,) bool:
    samples whose hidden map is known to be constant over (C, P); their normalised map is set to exactly 0 (a float
    LayerNorm of a constant map returns eps-amplified rounding noise instead).

    Run eagerly under torch.compile (a graph break): with dynamo tracing it, the backward failed to trace under
    CUDA autocast, and compiled training drifted from eager training on torch 2.11 (not on 2.14).
    """
    if constant is None:
        constant = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    return _ConvSoftplusLayerNormConv.apply(
        x, in_weight.flatten(1), in_bias, norm.weight, norm.bias, weight.flatten(1), bias, constant
    )


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
