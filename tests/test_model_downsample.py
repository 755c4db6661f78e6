"""`downsample`: the factor by which the image is subsampled before the backbone (2 in the release, 1.5 in the
reference's SALICON pretraining). Sizes and indices equal the reference's F.interpolate arithmetic; the network
equals the naive oracle (tests/naive_deepgaze.py) at 1.5 and 2."""

import math

import pytest
import torch
import torch.nn.functional as F

from deepgaze_lit import DeepGazeIII
from deepgaze_lit.feature_cache import feature_namespace
from deepgaze_lit.model.backbone import MIN_IMAGE_SIDE, minimum_image_side
from deepgaze_lit.model.errors import ModelConfigError
from deepgaze_lit.model.grids import NearestMap, readout_shape, subsampled_side
from deepgaze_lit.module import DeepGazeModule
from naive_deepgaze import NaiveDeepGazeIII, randomise_readout


@pytest.mark.parametrize("downsample", [1.5, 2, 1.1, 3, 0.75])
def test_subsampled_grid_equals_f_interpolate(downsample):
    """Backbone input size and source pixels equal the reference's
    F.interpolate(x, scale_factor=1/downsample, recompute_scale_factor=False) at every side up to 400."""
    for side in range(2, 401):
        other = side // 7 + 3
        grid = torch.arange(side * other, dtype=torch.float64).view(1, 1, side, other)
        if subsampled_side(other, downsample) < 1 or subsampled_side(side, downsample) < 1:
            continue
        resized = F.interpolate(grid, scale_factor=1 / downsample, recompute_scale_factor=False)
        assert resized.shape[-2:] == (subsampled_side(side, downsample), subsampled_side(other, downsample))
        assert torch.equal(NearestMap.by_factor((side, other), downsample, "cpu").apply(grid), resized), side


def test_readout_grid_is_the_reference_ceiling():
    assert readout_shape((768, 1024)) == (96, 128)
    assert readout_shape((768, 1024), 1.5) == (128, 171)  # 1024 / 1.5 / 4 = 170.67
    assert readout_shape((97, 131), 1.5) == (17, 22)
    assert readout_shape((33, 55), 1.1) == (math.ceil(33 / 1.1 / 4), math.ceil(55 / 1.1 / 4)) == (8, 13)


@pytest.mark.parametrize("downsample, minimum", [(2, 58), (1.5, 44), (3, 87), (1.1, 32)])
def test_minimum_image_side_follows_the_factor(downsample, minimum):
    """DenseNet-201 needs 29 input pixels: floor(side * (1/downsample)) >= 29."""
    assert minimum_image_side(downsample) == minimum
    assert subsampled_side(minimum, downsample) == 29 and subsampled_side(minimum - 1, downsample) == 28
    assert MIN_IMAGE_SIDE == minimum_image_side(2)


@pytest.fixture(scope="module")
def model_pairs():
    """(optimised, naive) 1-component scanpath networks with the same random readout and backbone, per factor."""
    pairs = {}
    for downsample in (1.5, 2):
        torch.manual_seed(3)
        fast = DeepGazeIII(num_components=1, scanpath=True, backbone_weights="none", downsample=downsample)
        randomise_readout(fast, seed=7)
        naive = NaiveDeepGazeIII(1, True, downsample=downsample)
        naive.load_state_dict(fast.state_dict())
        pairs[downsample] = fast, naive
    return pairs


def random_inputs(height, width, seed):
    generator = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (2, 3, height, width), dtype=torch.uint8, generator=generator)
    centerbias = torch.randn(2, height * width, generator=generator).log_softmax(-1).view(2, height, width)
    x_hist = torch.rand(2, 4, generator=generator) * width
    y_hist = torch.rand(2, 4, generator=generator) * height
    x_hist[1, 2:] = y_hist[1, 2:] = float("nan")
    return image, centerbias, x_hist, y_hist


@pytest.mark.parametrize("downsample, height, width", [(1.5, 97, 131), (1.5, 128, 160), (2, 100, 140)])
def test_forward_equals_naive_oracle(model_pairs, downsample, height, width):
    """Whole forward from uint8 images (random backbone and readout): within 1e-4 nats of the oracle; at 1.5 the
    backbone sees 64x87 (97x131) and 85x106 (128x160) pixels, the readout grid is 17x22 and 22x27."""
    fast, naive = model_pairs[downsample]
    inputs = random_inputs(height, width, seed=height)
    with torch.no_grad():
        out_fast = fast(*inputs)
        out_naive = naive(*inputs)
    assert out_fast.shape == (2, 1, height, width)
    assert (out_fast - out_naive).abs().max().item() < 1e-4


def test_the_factor_changes_the_output(model_pairs):
    """The same weights at 1.5 and 2 give different densities (the factor is not silently ignored)."""
    fast15, _ = model_pairs[1.5]
    fast2, _ = model_pairs[2]
    inputs = random_inputs(100, 140, seed=1)
    with torch.no_grad():
        assert (fast15(*inputs) - fast2(*inputs)).abs().max().item() > 1e-3


def test_bad_factors_name_the_fix(model_pairs):
    for bad in (0, -1.5, float("nan"), float("inf")):
        with pytest.raises(ModelConfigError, match="downsample must be a finite factor > 0"):
            DeepGazeIII(num_components=1, backbone_weights="none", downsample=bad)
    fast, _ = model_pairs[1.5]
    image, centerbias, x_hist, y_hist = random_inputs(43, 80, seed=0)
    with pytest.raises(ModelConfigError, match=r"43x80 pixels is too small: DeepGaze III subsamples by 1.5 .*>= 44"):
        fast(image, centerbias, x_hist, y_hist)


def test_module_passes_the_factor_and_the_cache_tells_factors_apart():
    module = DeepGazeModule(num_components=1, scanpath=False, backbone_weights="none", downsample=1.5)
    assert module.model.downsample == 1.5 and module.hparams.downsample == 1.5
    assert DeepGazeModule(num_components=1, scanpath=False, backbone_weights="none").model.downsample == 2
    signature = {"device": "cpu"}
    assert feature_namespace("data", "backbone", signature, 1.5) != feature_namespace("data", "backbone", signature, 2)
    assert feature_namespace("data", "backbone", signature, 2) == feature_namespace("data", "backbone", signature)
