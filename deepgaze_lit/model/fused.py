"""The fused readout layer conv1x1 -> softplus -> LayerNorm -> conv1x1 on maps (B, C, P) (see `layers`), with a
custom autograd Function that never holds the wide hidden map whole in the forward pass."""

import torch
import torch.nn.functional as F
from torch import Tensor

from deepgaze_lit.model.layers import LAYER_NORM_EPS, SOFTPLUS_THRESHOLD, LayerNorm, conv1x1, softplus_values

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

    Under torch.compile the same function is computed as the plain composition (`plain_conv_softplus_layer_norm_conv`):
    the compiler traces and fuses that, not the chunked autograd Function.
    """
    if constant is None:
        constant = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    if torch.compiler.is_compiling():
        return plain_conv_softplus_layer_norm_conv(x, in_weight, in_bias, norm, weight, bias, constant)
    return _ConvSoftplusLayerNormConv.apply(
        x, in_weight.flatten(1), in_bias, norm.weight, norm.bias, weight.flatten(1), bias, constant
    )


def plain_conv_softplus_layer_norm_conv(
    x: Tensor, in_weight: Tensor, in_bias: Tensor, norm: LayerNorm, weight: Tensor, bias: Tensor, constant: Tensor
) -> Tensor:
    """`conv_softplus_layer_norm_conv` as four ordinary operations with the same semantics: computed in the
    parameters' precision with autocast off, the output cast to the autocast dtype under autocast; samples flagged
    `constant` (B,) take a normalised map of exactly 0. Holds the wide hidden map for the backward pass."""
    device = x.device.type
    autocast_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    with torch.autocast(device, enabled=False):
        hidden = F.softplus(conv1x1(in_weight, x.to(weight.dtype), in_bias))
        normalised = F.group_norm(hidden, 1, None, None, LAYER_NORM_EPS)
        normalised = torch.where(constant[:, None, None], 0, normalised)
        affine = normalised * norm.weight[:, None] + norm.bias[:, None]
        output = conv1x1(weight, affine, bias)
    return output if autocast_dtype is None else output.to(autocast_dtype)
