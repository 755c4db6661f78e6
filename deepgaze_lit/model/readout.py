"""The four networks of one DeepGaze III component, on maps laid out as (B, C, P) (see `layers`).

- saliency: LayerNorm(2048) -> 1x1 conv 2048->8 -> bias -> softplus -> LayerNorm(8) -> conv 8->16 -> bias ->
  softplus -> LayerNorm(16) -> conv 16->1 -> bias -> softplus;
- scanpath: per history slot a 1x1 conv 3->128 with bias, summed over the present slots -> softplus ->
  LayerNorm(128) -> conv 128->16 -> bias -> softplus;
- fixation selection: per-input LayerNorm([1, 16]) -> summed convs ([1, 16] -> 128) -> bias -> softplus ->
  LayerNorm(128) -> conv 128->16 -> bias -> softplus -> conv 16->1;
- finalizer: Gaussian blur + weighted centre bias, normalised to a log density (`finalize`, all components at once).
"""

import torch
import torch.nn as nn
from torch import Tensor

from deepgaze_lit.batch import HISTORY_LENGTH
from deepgaze_lit.model.backbone import FEATURE_CHANNELS
from deepgaze_lit.model.fused import conv_softplus_layer_norm_conv
from deepgaze_lit.model.grids import NearestMap
from deepgaze_lit.model.layers import (
    Bias,
    GaussianBlur,
    LayerNorm,
    MultiInputConv,
    MultiInputLayerNorm,
    ScanpathHistoryEncoding,
    conv1x1,
    gaussian_blur,
    softplus,
)

SCANPATH_CHANNELS = 16


class SaliencyNetwork(nn.Module):
    """Spatial priority map (>= 0) from the backbone features."""

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

    def forward(self, normalised_features: Tensor, cell_weight: Tensor) -> Tensor:
        """normalised_features (B, 2048, P): the features after LayerNorm without affine (`layers.normalise`; the
        statistics are the same for every component, so the mixture computes them once). This component's
        layernorm0 affine is folded into conv0 (W diag(gamma), W beta). Returns (B, 1, P)."""
        weight = self.conv0.weight.flatten(1)
        folded_weight = weight * self.layernorm0.weight
        folded_bias = weight @ self.layernorm0.bias + self.bias0.bias
        x = softplus(conv1x1(folded_weight, normalised_features, folded_bias))
        x = softplus(conv1x1(self.conv1.weight, self.layernorm1(x, cell_weight), self.bias1.bias))
        return softplus(conv1x1(self.conv2.weight, self.layernorm2(x, cell_weight), self.bias2.bias))


class ScanpathNetwork(nn.Module):
    """16 channels from the fixation history."""

    def __init__(self):
        super().__init__()
        self.encoding0 = ScanpathHistoryEncoding(HISTORY_LENGTH, 3, 128)
        self.layernorm1 = LayerNorm(128)
        self.conv1 = nn.Conv2d(128, SCANPATH_CHANNELS, 1, bias=False)
        self.bias1 = Bias(SCANPATH_CHANNELS)

    def forward(self, encoding: Tensor, valid: Tensor) -> Tensor:
        """encoding (B, 12, P) and valid (B, 4) from `scanpath_encoding` -> (B, 16, P).

        A sample without any history has a constant softplus(0) map, whose LayerNorm is exactly its bias: it is set
        so explicitly, so that no eps-amplified rounding noise reaches the output or the LayerNorm weight's gradient.
        """
        in_weight, in_bias = self.encoding0.affine(valid)
        without_history = ~valid.any(dim=1)
        x = conv_softplus_layer_norm_conv(
            encoding, in_weight, in_bias, self.layernorm1, self.conv1.weight, self.bias1.bias, without_history
        )
        return softplus(x)


class FixationSelectionNetwork(nn.Module):
    """Readout (before the finalizer) from saliency and, with `scanpath`, scanpath features: inputs [1, 16] or
    [1, 0]."""

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

    def normalise_saliency(self, saliency: Tensor, cell_weight: Tensor) -> Tensor:
        """layernorm0's saliency part: (B, 1, P) -> (B, 1, P). Apply it on the saliency's own (native) grid with
        `cell_weight`, before upsampling, so that a spatially constant saliency (1x1 features) gives exactly 0."""
        return self.layernorm0.layernorm_part0(saliency, cell_weight)

    def forward(self, saliency: Tensor, scanpath: Tensor | None, cell_weight: Tensor | None = None) -> Tensor:
        """saliency (B, 1, P) from `normalise_saliency`, scanpath (B, 16, P) or None -> readout (B, 1, P).

        `cell_weight` (P,) weights the LayerNorm statistics (None: each position once)."""
        x = saliency
        weight = self.conv0.conv_part0.weight.flatten(1)
        if scanpath is not None:
            x = torch.cat([x, self.layernorm0.layernorm_part1(scanpath, cell_weight)], dim=1)
            weight = torch.cat([weight, self.conv0.conv_part1.weight.flatten(1)], dim=1)
        if cell_weight is None:
            x = conv_softplus_layer_norm_conv(
                x, weight, self.bias0.bias, self.layernorm1, self.conv1.weight, self.bias1.bias
            )
        else:
            x = softplus(conv1x1(weight, x, self.bias0.bias))
            x = conv1x1(self.conv1.weight, self.layernorm1(x, cell_weight), self.bias1.bias)
        return conv1x1(self.conv2.weight, softplus(x))


class Finalizer(nn.Module):
    """Parameters of one component's finalizer: `gauss.sigma` (finalizer-grid pixels), `center_bias_weight` (1,)."""

    def __init__(self, sigma: float = 8.0, learn_sigma: bool = True, center_bias_weight: float = 1.0):
        super().__init__()
        self.gauss = GaussianBlur(sigma, truncate=3.0, learn_sigma=learn_sigma)
        self.center_bias_weight = nn.Parameter(torch.tensor([float(center_bias_weight)]))


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
