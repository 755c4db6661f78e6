"""Frozen DenseNet-201 feature extractor of DeepGaze III (torchvision architecture, ImageNet normalisation).

State-dict layout (as the released model): `features.0` is the parameter-free ImageNet normaliser, `features.1` the
whole torchvision DenseNet-201, norm5 and classifier included so that release checkpoints load, although the
forward pass stops where the last captured layer is computed.
"""

import functools
import math
import re
from collections import OrderedDict
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torchvision.models import DenseNet201_Weights, densenet201

from deepgaze_lit.batch import MIN_IMAGE_SIDE  # noqa: F401 - re-exported: the limit at downsample 2
from deepgaze_lit.model.errors import ModelConfigError, WeightsFileError
from deepgaze_lit.model.files import load_torch_file
from deepgaze_lit.model.grids import DOWNSAMPLE, subsampled_side

IMAGENET_WEIGHTS = DenseNet201_Weights.IMAGENET1K_V1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FEATURE_CHANNELS = 2048
"""denselayer32.norm1 (1888, before its ReLU) + denselayer32.conv1 (128) + denselayer31.conv2 (32)."""
RANDOM_BACKBONE_SEED = 0
"""Seed of the random backbone (`backbone_weights='none'`): the same weights whenever it is built."""

_LEGACY_DENSELAYER_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12])\.(weight|bias|running_mean|running_var|num_batches_tracked)$"
)


def imagenet_weights_path() -> Path:
    """Where torchvision's ImageNet DenseNet-201 file must lie: <torch hub dir>/checkpoints/densenet201-c1103571.pth."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(IMAGENET_WEIGHTS.url).path).name


def backbone_output_side(side: int) -> int:
    """Side of the DenseNet-201 feature maps (stride 32) for a backbone input side (pixels); 0 = too small.

    The arithmetic behind `batch.MIN_IMAGE_SIDE`: the smallest image side whose subsampled side gives 1 here.
    """
    side = (side + 2 * 3 - 7) // 2 + 1  # conv0: 7x7, stride 2, padding 3
    side = (side + 2 * 1 - 3) // 2 + 1  # pool0: 3x3 max pool, stride 2, padding 1
    for _ in range(3):  # transitions 1-3: 2x2 average pool, stride 2
        side = side // 2 if side >= 2 else 0
    return side


@functools.cache
def minimum_image_side(downsample: float = DOWNSAMPLE) -> int:
    """Smallest image side (pixels) DeepGaze III accepts with `downsample`: after subsampling, DenseNet-201 needs an
    input side that gives >= 1 output (29 px); 58 px at the release's downsample 2."""
    backbone_side = 1
    while backbone_output_side(backbone_side) < 1:
        backbone_side += 1
    side = max(1, math.floor(backbone_side * downsample) - 1)
    while subsampled_side(side, downsample) < backbone_side:
        side += 1
    while side > 1 and subsampled_side(side - 1, downsample) >= backbone_side:
        side -= 1
    return side


def read_densenet_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a torchvision densenet201 state dict (legacy `norm.1`-style keys are renamed to `norm1`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DenseNet-201 weight file {path} does not exist")
    state = load_torch_file(path, "torchvision DenseNet-201 weights (a state dict saved with torch.save)")
    if not isinstance(state, dict) or not all(isinstance(value, Tensor) for value in state.values()):
        raise WeightsFileError(f"{path} does not hold a state dict (a dict of tensors) but a {type(state).__name__}; "
                               "expected torchvision DenseNet-201 weights")
    return OrderedDict((_LEGACY_DENSELAYER_KEY.sub(r"\1\2.\3", key), value) for key, value in state.items())


def backbone_weights_file(weights: str | Path) -> Path | None:
    """The file `weights` ('imagenet', 'none' or a .pth path) reads, whether or not it exists; None for 'none'."""
    if weights == "none":
        return None
    return imagenet_weights_path() if weights == "imagenet" else Path(weights)


def _backbone_state_dict(weights: str | Path) -> dict[str, Tensor] | None:
    """The torchvision state dict for `weights` ('imagenet', 'none' or a .pth path); None for 'none'."""
    path = backbone_weights_file(weights)
    if path is None:
        return None
    if not path.is_file():
        if weights == "imagenet":
            raise FileNotFoundError(
                f"ImageNet weights for DenseNet-201 not found: put the file {path.name} (torchvision "
                f"DenseNet201_Weights.IMAGENET1K_V1, {IMAGENET_WEIGHTS.url}) into the folder {path.parent} "
                f"(set TORCH_HOME to use another torch hub folder), or use backbone_weights='none' or a .pth path. "
                f"Nothing is downloaded at run time."
            )
        raise FileNotFoundError(
            f"backbone_weights={str(weights)!r}: expected 'imagenet', 'none' or the path of a torchvision "
            f"densenet201 state dict (.pth), but {path} does not exist"
        )
    return read_densenet_state_dict(path)


def seeded_initialisation(network: nn.Module, seed: int = RANDOM_BACKBONE_SEED) -> None:
    """Re-draw `network`'s random weights (convolutions: Kaiming normal, as torchvision's DenseNet; linear layers:
    PyTorch's default uniform) from a generator seeded with `seed`, leaving the global random state alone: the
    random backbone (`backbone_weights='none'`) is the same tensors in every process, so a checkpoint need not
    store it."""
    generator = torch.Generator().manual_seed(seed)
    for module in network.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, generator=generator)
        elif isinstance(module, nn.Linear):
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)


class ImageNetNormalization(nn.Module):
    """RGB 0..255 -> (x / 255 - mean) / std with the ImageNet statistics (non-persistent buffers)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, image: Tensor) -> Tensor:
        return (image / 255 - self.mean) / self.std


class DenseNetFeatures(nn.Module):
    """Frozen DenseNet-201: (B, 3, h, w) RGB 0..255 -> (B, 2048, ~h/32, ~w/32) features (always eval mode).

    `weights`: 'imagenet' (torchvision IMAGENET1K_V1 from the torch hub cache, never downloaded), 'none' (random,
    drawn from `RANDOM_BACKBONE_SEED`: the same weights every time; for tests, the synthetic quickstart and for
    loading a full checkpoint afterwards) or the path of a torchvision densenet201 `.pth`.
    """

    def __init__(self, weights: str | Path = "imagenet"):
        super().__init__()
        state = _backbone_state_dict(weights)
        network = densenet201(weights=None)
        if state is None:
            seeded_initialisation(network)
        else:
            try:
                result = network.load_state_dict(state, strict=False)
            except RuntimeError as error:
                raise WeightsFileError(f"backbone_weights={str(weights)!r}: its tensor shapes are not DenseNet-201's; "
                                       "expected torchvision densenet201 weights") from error
            if result.missing_keys or result.unexpected_keys:
                raise WeightsFileError(
                    f"backbone_weights={str(weights)!r} is not a torchvision densenet201 state dict: "
                    f"missing keys {result.missing_keys[:5]}, unexpected keys {result.unexpected_keys[:5]}"
                )
        self.features = nn.Sequential(ImageNetNormalization(), network)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "DenseNetFeatures":
        """The backbone is frozen: it stays in eval mode (fixed BatchNorm statistics) whatever `mode` is."""
        return super().train(False)

    def forward(self, image: Tensor) -> Tensor:
        """image (B, 3, h, w) float RGB 0..255 -> (B, 2048, h', w'); runs nothing after denselayer32.conv1."""
        network = self.features[1].features
        x = self.features[0](image)
        for name, module in network.named_children():
            if name == "denseblock4":
                break
            x = module(x)
        *layers, last = network.denseblock4.children()
        block_features = [x]
        for layer in layers:
            block_features.append(layer(block_features))
        before_relu = last.norm1(torch.cat(block_features, dim=1))
        bottleneck = last.conv1(F.relu(before_relu))
        return torch.cat([before_relu, bottleneck, block_features[-1]], dim=1)


def check_image_side(height: int, width: int, downsample: float = DOWNSAMPLE) -> None:
    """Raise a ModelConfigError when an image of height x width pixels is too small for the backbone after
    subsampling by `downsample`."""
    minimum = minimum_image_side(downsample)
    if min(height, width) < minimum:
        raise ModelConfigError(
            f"image of {height}x{width} pixels is too small: DeepGaze III subsamples by {downsample:g} and "
            f"DenseNet-201 then needs both image sides >= {minimum} pixels; resize the image "
            f"(e.g. by a factor {math.ceil(minimum / max(min(height, width), 1))}) or a smaller downsample"
        )
