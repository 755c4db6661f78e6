"""Test oracle: DeepGaze III written straightforwardly at full resolution, from the facts in the reference notes.

Every component on its own, every resize by `F.interpolate`, the scanpath encoding at full resolution, the full
2048-channel LayerNorm per component, the finalizer upsampled to full resolution and the mixture's logsumexp over
full-resolution maps. Slow and memory-hungry on purpose; used only to check the optimised network. The state-dict
keys equal the release's, so `load_state_dict(optimised.state_dict())` works.
"""

import math
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

EPS = 1e-12


def layer_norm(channels):
    return nn.GroupNorm(1, channels, eps=EPS)


class Bias(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        return x + self.bias[None, :, None, None]


class Normalizer(nn.Module):
    def forward(self, x):
        mean = torch.tensor([0.485, 0.456, 0.406], dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225], dtype=x.dtype).view(1, 3, 1, 1)
        return (x / 255 - mean) / std


class Backbone(nn.Module):
    """Full torchvision forward; the three layers are captured with hooks (norm1 cloned before its in-place ReLU)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(Normalizer(), torchvision.models.densenet201())

    def forward(self, x):
        captured = {}
        block = self.features[1].features.denseblock4
        hooks = [
            block.denselayer32.norm1.register_forward_hook(lambda m, i, o: captured.__setitem__(0, o.clone())),
            block.denselayer32.conv1.register_forward_hook(lambda m, i, o: captured.__setitem__(1, o.clone())),
            block.denselayer31.conv2.register_forward_hook(lambda m, i, o: captured.__setitem__(2, o.clone())),
        ]
        self.features(x)
        for hook in hooks:
            hook.remove()
        return [captured[0], captured[1], captured[2]]


def saliency_network():
    return nn.Sequential(OrderedDict([
        ("layernorm0", layer_norm(2048)), ("conv0", nn.Conv2d(2048, 8, 1, bias=False)), ("bias0", Bias(8)),
        ("softplus0", nn.Softplus()),
        ("layernorm1", layer_norm(8)), ("conv1", nn.Conv2d(8, 16, 1, bias=False)), ("bias1", Bias(16)),
        ("softplus1", nn.Softplus()),
        ("layernorm2", layer_norm(16)), ("conv2", nn.Conv2d(16, 1, 1, bias=False)), ("bias2", Bias(1)),
        ("softplus2", nn.Softplus()),
    ]))


class HistoryEncoding(nn.Module):
    def __init__(self):
        super().__init__()
        self.convolutions = nn.ModuleList(nn.Conv2d(3, 128, 1) for _ in range(4))

    def forward(self, x):
        out = torch.zeros(x.shape[0], 128, x.shape[2], x.shape[3], dtype=x.dtype)
        for slot in range(4):
            valid = ~torch.isnan(x[:, slot, 0, 0])
            if valid.any():
                out[valid] = out[valid] + self.convolutions[slot](x[valid][:, slot::4])
        return out


def scanpath_network():
    return nn.Sequential(OrderedDict([
        ("encoding0", HistoryEncoding()), ("softplus0", nn.Softplus()),
        ("layernorm1", layer_norm(128)), ("conv1", nn.Conv2d(128, 16, 1, bias=False)), ("bias1", Bias(16)),
        ("softplus1", nn.Softplus()),
    ]))


class Parts(nn.Module):
    def __init__(self, make, channels, prefix):
        super().__init__()
        for index, count in enumerate(channels):
            if count:
                self.add_module(f"{prefix}{index}", make(count))


class FixationSelection(nn.Module):
    def __init__(self, scanpath):
        super().__init__()
        channels = [1, 16 if scanpath else 0]
        self.layernorm0 = Parts(layer_norm, channels, "layernorm_part")
        self.conv0 = Parts(lambda count: nn.Conv2d(count, 128, 1, bias=False), channels, "conv_part")
        self.bias0 = Bias(128)
        self.layernorm1 = layer_norm(128)
        self.conv1 = nn.Conv2d(128, 16, 1, bias=False)
        self.bias1 = Bias(16)
        self.conv2 = nn.Conv2d(16, 1, 1, bias=False)

    def forward(self, inputs):
        out = 0
        for index, x in enumerate(inputs):
            if x is not None:
                normalised = getattr(self.layernorm0, f"layernorm_part{index}")(x)
                out = out + getattr(self.conv0, f"conv_part{index}")(normalised)
        x = F.softplus(self.bias0(out))
        x = F.softplus(self.bias1(self.conv1(self.layernorm1(x))))
        return self.conv2(x)


class Gauss(nn.Module):
    def __init__(self):
        super().__init__()
        self.sigma = nn.Parameter(torch.tensor(8.0))

    def forward(self, x):
        size = 2 * math.ceil(3 * self.sigma.item()) + 1
        t = torch.arange(size, dtype=x.dtype) - size // 2
        kernel = torch.exp(-0.5 * (t / self.sigma) ** 2)
        kernel = kernel / kernel.sum()
        radius = size // 2
        x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, size, 1))
        return F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, size))


class Finalizer(nn.Module):
    def __init__(self):
        super().__init__()
        self.gauss = Gauss()
        self.center_bias_weight = nn.Parameter(torch.tensor([1.0]))

    def forward(self, readout, centerbias):
        cb = F.interpolate(centerbias[:, None], scale_factor=1 / 4)
        out = self.gauss(F.interpolate(readout, size=cb.shape[-2:]))
        out = out + self.center_bias_weight * cb
        out = F.interpolate(out, size=centerbias.shape[-2:])
        return out - out.logsumexp(dim=(2, 3), keepdim=True)


def encode_scanpath(x_hist, y_hist, height, width):
    """(B, 12, H, W): [dx0..dx3, dy0..dy3, d0..d3] at every pixel."""
    ys, xs = torch.meshgrid(torch.arange(height, dtype=x_hist.dtype), torch.arange(width, dtype=x_hist.dtype),
                            indexing="ij")
    dx = xs[None, None] - x_hist[:, :, None, None]
    dy = ys[None, None] - y_hist[:, :, None, None]
    return torch.cat([dx, dy, torch.sqrt(dx ** 2 + dy ** 2)], dim=1)


class NaiveDeepGazeIII(nn.Module):
    def __init__(self, num_components, scanpath, downsample=2):
        super().__init__()
        self.scanpath = scanpath
        self.downsample = downsample
        self.features = Backbone()
        self.saliency_networks = nn.ModuleList(saliency_network() for _ in range(num_components))
        if scanpath:
            self.scanpath_networks = nn.ModuleList(scanpath_network() for _ in range(num_components))
        self.fixation_selection_networks = nn.ModuleList(FixationSelection(scanpath) for _ in range(num_components))
        self.finalizers = nn.ModuleList(Finalizer() for _ in range(num_components))

    def backbone(self, image):
        image = image.to(self.finalizers[0].center_bias_weight.dtype)
        if image.shape[1] == 1:
            image = image.repeat(1, 3, 1, 1)
        self.features.eval()
        with torch.no_grad():
            return self.features(F.interpolate(image, scale_factor=1 / self.downsample, recompute_scale_factor=False))

    def head(self, feature_maps, centerbias, x_hist=None, y_hist=None):
        """feature_maps: the three backbone layers; returns (B, 1, H, W) log density."""
        height, width = centerbias.shape[-2:]
        readout_shape = (math.ceil(height / self.downsample / 4), math.ceil(width / self.downsample / 4))
        x = torch.cat([F.interpolate(f, size=readout_shape) for f in feature_maps], dim=1)
        if self.scanpath:
            history = F.interpolate(encode_scanpath(x_hist, y_hist, height, width), size=readout_shape)
        outputs = []
        for k, saliency_net in enumerate(self.saliency_networks):
            saliency = saliency_net(x)
            scanpath = self.scanpath_networks[k](history) if self.scanpath else None
            readout = self.fixation_selection_networks[k]([saliency, scanpath])
            outputs.append(self.finalizers[k](readout, centerbias))
        return torch.logsumexp(torch.cat(outputs, dim=1), dim=1, keepdim=True) - math.log(len(outputs))

    def forward(self, image, centerbias, x_hist=None, y_hist=None):
        return self.head(self.backbone(image), centerbias, x_hist, y_hist)


def randomise_readout(model, seed):
    """Give every readout parameter a random value away from its initialisation (backbone untouched)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.startswith("features."):
                continue
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
            if name.endswith("gauss.sigma"):
                value = 1.5 + 5 * torch.rand((), generator=generator, dtype=torch.float64)
            elif name.endswith("center_bias_weight"):
                value = 0.5 + torch.rand(parameter.shape, generator=generator, dtype=torch.float64)
            elif ".layernorm" in name and name.endswith(".weight"):
                value = 1 + 0.3 * noise
            elif parameter.dim() == 4:
                value = noise * 2 / math.sqrt(parameter.shape[1])
            else:
                value = 0.5 * noise
            parameter.copy_(value)
