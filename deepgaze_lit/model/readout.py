"""The four networks of a DeepGaze III component and their joint evaluation over all K components.

The classes own one component's parameters under the released state-dict names; the functions evaluate a list of
them at once on (B, K, C, P) tensors (P: flattened grid positions), which is mathematically the per-component
computation of the paper:

- saliency: LayerNorm(2048) -> 1x1 conv 2048->8 -> bias -> softplus -> LayerNorm(8) -> conv 8->16 -> bias ->
  softplus -> LayerNorm(16) -> conv 16->1 -> bias -> softplus;
- scanpath: per history slot a 1x1 conv 3->128 with bias, summed over the valid slots -> softplus ->
  LayerNorm(128) -> conv 128->16 -> bias -> softplus;
- fixation selection: per-input LayerNorm([1, 16]) -> summed convs ([1, 16] -> 128) -> bias -> softplus ->
  LayerNorm(128) -> conv 128->16 -> bias -> softplus -> conv 16->1;
- finalizer: Gaussian blur + weighted centre bias, normalised to a log density.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from deepgaze_lit.model.grids import NearestMap
from deepgaze_lit.model.layers import (
    LAYER_NORM_EPS,
    Bias,
    GaussianBlur,
    LayerNorm,
    MultiInputConv,
    MultiInputLayerNorm,
    ScanpathHistoryEncoding,
    gaussian_blur,
    group_layer_norm,
    stack_parameters,
)

FEATURE_CHANNELS = 2048
HISTORY_LENGTH = 4
SCANPATH_CHANNELS = 16


class SaliencyNetwork(nn.Module):
    """Parameters of one component's saliency network (spatial priority map, >= 0)."""

    def __init__(self, in_channels: int = FEATURE_CHANNELS):
        super().__init__()
        self.layernorm0 = LayerNorm(in_channels)
        self.conv0 = nn.Conv2d(in_channels, 8, 1, bias=False)
        self.bias0 = Bias(8)
        self.layernorm1 = LayerNorm(8)
        self.conv1 = nn.Conv2d(8, 16, 1, bias=False)
        self.bias1 = Bias(16)
        self.layernorm2 = LayerNorm(16)
        self.conv2 = nn.Conv2d(16, 1, 1, bias=False)
        self.bias2 = Bias(1)


class ScanpathNetwork(nn.Module):
    """Parameters of one component's scanpath network (16 channels from the fixation history)."""

    def __init__(self):
        super().__init__()
        self.encoding0 = ScanpathHistoryEncoding(HISTORY_LENGTH, 3, 128)
        self.layernorm1 = LayerNorm(128)
        self.conv1 = nn.Conv2d(128, SCANPATH_CHANNELS, 1, bias=False)
        self.bias1 = Bias(SCANPATH_CHANNELS)


class FixationSelectionNetwork(nn.Module):
    """Parameters of one component's fixation-selection network; inputs [1, 16], or [1, 0] without scanpath."""

    def __init__(self, scanpath: bool = True):
        super().__init__()
        inputs = [1, SCANPATH_CHANNELS if scanpath else 0]
        self.layernorm0 = MultiInputLayerNorm(inputs)
        self.conv0 = MultiInputConv(inputs, 128)
        self.bias0 = Bias(128)
        self.layernorm1 = LayerNorm(128)
        self.conv1 = nn.Conv2d(128, 16, 1, bias=False)
        self.bias1 = Bias(16)
        self.conv2 = nn.Conv2d(16, 1, 1, bias=False)


class Finalizer(nn.Module):
    """Parameters of one component's finalizer: `gauss.sigma` (finalizer-grid pixels), `center_bias_weight` (1,)."""

    def __init__(self, sigma: float = 8.0, learn_sigma: bool = True, center_bias_weight: float = 1.0):
        super().__init__()
        self.gauss = GaussianBlur(sigma, truncate=3.0, learn_sigma=learn_sigma)
        self.center_bias_weight = nn.Parameter(torch.tensor([float(center_bias_weight)]))


def _conv_weights(convs: list[nn.Conv2d]) -> Tensor:
    """Stacked 1x1 convolution weights (K, C_out, C_in)."""
    out_channels, in_channels = convs[0].weight.shape[:2]
    return stack_parameters([conv.weight for conv in convs], (out_channels, in_channels))


def _biases(biases: list[Bias]) -> Tensor:
    """Stacked biases (K, C, 1), broadcastable over positions."""
    return stack_parameters([bias.bias for bias in biases], (-1, 1))


def _affine(norms: list[LayerNorm]) -> tuple[Tensor, Tensor]:
    """Stacked LayerNorm weight and bias, each (K, C)."""
    return torch.stack([norm.weight for norm in norms]), torch.stack([norm.bias for norm in norms])


def saliency_maps(networks: list[SaliencyNetwork], features: Tensor, cell_weight: Tensor) -> Tensor:
    """Saliency of every component on the backbone's native grid.

    features (B, 2048, P) (no gradient), `cell_weight` (P,): readout-grid cells per native position (the networks
    conceptually run on the nearest-upsampled readout grid; all their layers are pointwise except the LayerNorm
    statistics, which are weighted accordingly). Returns (B, K, 1, P).

    The 2048-channel LayerNorm statistics do not depend on the component: they are computed once, and each
    component's affine is folded into its first 1x1 convolution (W diag(gamma), W beta) at compute time.
    """
    batch, channels, positions = features.shape
    components = len(networks)
    position_weight = cell_weight / (channels * cell_weight.sum())
    mean = (features @ position_weight).sum(-1)
    centred = features - mean[:, None, None]
    variance = (centred.square() @ position_weight).sum(-1)
    normalised = centred * torch.rsqrt(variance + LAYER_NORM_EPS)[:, None, None]

    conv0 = _conv_weights([net.conv0 for net in networks])
    scale, shift = _affine([net.layernorm0 for net in networks])
    folded_weight = (conv0 * scale[:, None, :]).reshape(-1, channels)
    folded_bias = (conv0 @ shift[..., None]) + _biases([net.bias0 for net in networks])
    x = (folded_weight @ normalised).view(batch, components, -1, positions) + folded_bias
    x = F.softplus(x)
    x = group_layer_norm(x, *_affine([net.layernorm1 for net in networks]), cell_weight)
    x = F.softplus(_conv_weights([net.conv1 for net in networks]) @ x + _biases([net.bias1 for net in networks]))
    x = group_layer_norm(x, *_affine([net.layernorm2 for net in networks]), cell_weight)
    return F.softplus(_conv_weights([net.conv2 for net in networks]) @ x + _biases([net.bias2 for net in networks]))


def scanpath_features(networks: list[ScanpathNetwork], encoding: Tensor, valid: Tensor) -> Tensor:
    """Scanpath features of every component on the readout grid.

    encoding (B, 12, P): channels [dx0..dx3, dy0..dy3, d0..d3] in pixels, 0 where a slot is missing; valid (B, 4)
    bool. A missing slot contributes exactly 0 (its bias too). Returns (B, K, 16, P).

    A sample without any history has a constant softplus(0) map, whose LayerNorm is exactly its bias: it is set so
    explicitly, so that no eps-amplified rounding noise reaches the output or the LayerNorm weight's gradient.
    """
    batch, _, positions = encoding.shape
    components = len(networks)
    slot_weights = torch.stack(
        [_conv_weights(list(net.encoding0.convolutions)) for net in networks]
    )  # (K, slots, 128, 3): input order (dx, dy, d)
    encoding_weight = slot_weights.permute(0, 2, 3, 1).reshape(components, -1, 3 * HISTORY_LENGTH)
    slot_biases = torch.stack(
        [torch.stack([conv.bias for conv in net.encoding0.convolutions]) for net in networks]
    )  # (K, slots, 128)
    with torch.autocast(encoding.device.type, enabled=False):
        encoding_weight = encoding_weight.to(encoding.dtype)
        bias = torch.einsum("bs,ksc->bkc", valid.to(encoding.dtype), slot_biases.to(encoding.dtype))
        x = (encoding_weight.reshape(-1, 3 * HISTORY_LENGTH) @ encoding).view(batch, components, -1, positions)
        x = x + bias[..., None]
    x = F.softplus(x)
    scale, shift = _affine([net.layernorm1 for net in networks])
    conv1 = _conv_weights([net.conv1 for net in networks])
    x = conv1 @ group_layer_norm(x, scale, shift)
    x = torch.where(valid.any(dim=1)[:, None, None, None], x, conv1 @ shift[..., None])
    return F.softplus(x + _biases([net.bias1 for net in networks]))


def normalised_saliency(
    networks: list[FixationSelectionNetwork], saliency: Tensor, cell_weight: Tensor | None = None
) -> Tensor:
    """The fixation-selection networks' LayerNorm of the saliency input (`layernorm0.layernorm_part0`).

    saliency (B, K, 1, P) -> (B, K, 1, P); `cell_weight` as in `group_layer_norm`. Apply it on the native grid,
    before any upsampling, so that a spatially constant saliency (a 1x1 feature map) normalises to exactly 0.
    """
    return group_layer_norm(saliency, *_affine([net.layernorm0.layernorm_part0 for net in networks]), cell_weight)


def fixation_selection(
    networks: list[FixationSelectionNetwork],
    saliency: Tensor,
    scanpath: Tensor | None,
    cell_weight: Tensor | None = None,
) -> Tensor:
    """Readout of every component: normalised saliency (B, K, 1, P) (see `normalised_saliency`), scanpath
    features (B, K, 16, P) or None -> (B, K, 1, P).

    `cell_weight` (P,) weights the LayerNorm statistics as in `group_layer_norm` (None: each position once).
    """
    x = saliency
    weight = _conv_weights([net.conv0.conv_part0 for net in networks])
    if scanpath is not None:
        history = group_layer_norm(
            scanpath, *_affine([net.layernorm0.layernorm_part1 for net in networks]), cell_weight
        )
        x = torch.cat([x, history], dim=2)
        weight = torch.cat([weight, _conv_weights([net.conv0.conv_part1 for net in networks])], dim=2)
    x = F.softplus(weight @ x + _biases([net.bias0 for net in networks]))
    x = group_layer_norm(x, *_affine([net.layernorm1 for net in networks]), cell_weight)
    x = F.softplus(_conv_weights([net.conv1 for net in networks]) @ x + _biases([net.bias1 for net in networks]))
    return _conv_weights([net.conv2 for net in networks]) @ x


def finalize(finalizers: list[Finalizer], readout: Tensor, centerbias: Tensor, log_cell_size: Tensor) -> Tensor:
    """Log density of every component on the finalizer grid, normalised over the full image.

    readout (B, K, h4, w4) (already on the finalizer grid); centerbias (B, 1, h4, w4) log density (nats);
    log_cell_size (h4, w4): log of the number of full-resolution pixels each grid cell stands for.
    Returns (B, K, h4, w4): log density (nats) of one full-resolution pixel of each cell.
    """
    sigma = torch.stack([finalizer.gauss.sigma for finalizer in finalizers])
    blurred = gaussian_blur(readout, sigma, finalizers[0].gauss.truncate)
    weight = torch.stack([finalizer.center_bias_weight for finalizer in finalizers]).view(1, -1, 1, 1)
    unnormalised = blurred + weight * centerbias
    normaliser = torch.logsumexp((unnormalised + log_cell_size).flatten(2), dim=-1)
    return unnormalised - normaliser[..., None, None]


def scanpath_encoding(x_hist: Tensor, y_hist: Tensor, image_to_readout: NearestMap) -> tuple[Tensor, Tensor]:
    """The scanpath encoding sampled at the readout-grid positions, and which history slots are present.

    x_hist, y_hist (B, 4): fixation coordinates in image pixels, most recent first, NaN = missing. Each readout cell
    samples the image pixel (column xs, row ys) that nearest-neighbour resizing picks; there dx = xs - x,
    dy = ys - y, d = sqrt(dx^2 + dy^2) (pixels, integer pixel grid without +0.5). Returns the encoding
    (B, 12, P), channels [dx0..dx3, dy0..dy3, d0..d3], 0 for missing slots, and valid (B, 4) bool.
    """
    valid = torch.isfinite(x_hist) & torch.isfinite(y_hist)
    x = torch.where(valid, x_hist, 0)[:, :, None, None]
    y = torch.where(valid, y_hist, 0)[:, :, None, None]
    dx = image_to_readout.cols.to(x.dtype)[None, None, None, :] - x
    dy = image_to_readout.rows.to(y.dtype)[None, None, :, None] - y
    dx, dy = torch.broadcast_tensors(dx, dy)
    distance = torch.sqrt(dx.square() + dy.square())
    encoding = torch.cat([dx, dy, distance], dim=1)
    encoding = torch.where(valid.repeat(1, 3)[:, :, None, None], encoding, 0)
    return encoding.flatten(2), valid
