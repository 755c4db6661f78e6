"""The optimised network against the naive full-resolution oracle (tests/naive_deepgaze.py), random readout
parameters: outputs in float32 within 1e-4 nats, gradients of every readout parameter in float64 within 1e-4
relative (float64 separates the mathematics from float32 rounding, which the reductions over differently sized grids
accumulate differently)."""

import copy

import pytest
import torch

from deepgaze_lit import DeepGazeIII
from deepgaze_lit.model import fused
from naive_deepgaze import NaiveDeepGazeIII, randomise_readout

FEATURE_GRID = (3, 4)  # what the backbone returns for ~200x260 images; the head accepts any grid
# (components, scanpath, height, width, history): every size, history case, component count and variant appears.
HEAD_CASES = [
    (10, True, 64, 64, "mixed"),
    (10, True, 100, 140, "mixed"),
    (10, True, 76, 120, "one_without"),
    (10, True, 130, 97, "all_nan"),
    (10, True, 100, 140, "shared"),
    (1, True, 64, 64, "one_without"),
    (1, True, 100, 140, "all_nan"),
    (1, True, 130, 97, "mixed"),
    (10, False, 76, 120, "mixed"),
    (10, False, 130, 97, "mixed"),
    (1, False, 64, 64, "mixed"),
    (1, False, 100, 140, "mixed"),
]
_PAIRS = {}


def model_pair(components, scanpath):
    """(optimised, naive) with the same random readout parameters, in float32 and float64 (built once)."""
    if (components, scanpath) not in _PAIRS:
        torch.manual_seed(components)
        fast = DeepGazeIII(num_components=components, scanpath=scanpath, backbone_weights="none")
        randomise_readout(fast, seed=components + scanpath)
        naive = NaiveDeepGazeIII(components, scanpath)
        naive.load_state_dict(fast.state_dict())
        _PAIRS[components, scanpath] = {
            torch.float32: (fast, naive),
            torch.float64: (copy.deepcopy(fast).double(), copy.deepcopy(naive).double()),
        }
    return _PAIRS[components, scanpath]


def head_inputs(height, width, history, dtype, seed):
    """Features, centre bias, history and output weights, drawn in float64 and then cast to `dtype`."""
    generator = torch.Generator().manual_seed(seed)
    features = 2 * torch.randn(2, 2048, *FEATURE_GRID, generator=generator, dtype=torch.float64) + 0.5
    centerbias = torch.randn(2, height * width, generator=generator, dtype=torch.float64).log_softmax(-1)
    centerbias = centerbias.view(2, height, width)
    x_hist = torch.rand(2, 4, generator=generator, dtype=torch.float64) * (width + 20) - 10
    y_hist = torch.rand(2, 4, generator=generator, dtype=torch.float64) * (height + 20) - 10
    if history == "mixed":
        x_hist[1, 2:] = y_hist[1, 2:] = float("nan")
    elif history == "shared":
        x_hist[:, 2:] = y_hist[:, 2:] = float("nan")
        x_hist[1], y_hist[1] = x_hist[0], y_hist[0]
    elif history == "one_without":
        x_hist[1] = y_hist[1] = float("nan")
    else:
        x_hist[:] = y_hist[:] = float("nan")
    weights = torch.randn(2, 1, height, width, generator=generator, dtype=torch.float64)
    return [tensor.to(dtype) for tensor in (features, centerbias, x_hist, y_hist, weights)]


def run_both(fast, naive, inputs):
    """Both outputs and the gradients of sum(weights * log density) for every readout parameter (None -> 0)."""
    features, centerbias, x_hist, y_hist, weights = inputs
    fast.zero_grad(set_to_none=True)
    naive.zero_grad(set_to_none=True)
    out_fast = fast.head(features, centerbias, x_hist, y_hist).full()
    out_naive = naive.head(list(features.split([1888, 128, 32], dim=1)), centerbias, x_hist, y_hist)
    (weights * out_fast).sum().backward()
    (weights * out_naive).sum().backward()
    naive_parameters = dict(naive.named_parameters())
    gradients = {}
    for name, parameter in fast.named_parameters():
        if name.startswith("features."):
            continue
        other = naive_parameters[name].grad
        gradients[name] = (
            parameter.grad if parameter.grad is not None else torch.zeros_like(parameter),
            other if other is not None else torch.zeros_like(parameter),
        )
    return out_fast.detach(), out_naive.detach(), gradients


@pytest.mark.parametrize("components, scanpath, height, width, history", HEAD_CASES)
def test_head_equals_naive_oracle(components, scanpath, height, width, history, monkeypatch):
    """mixed: every sample has 2-4 history slots; one_without: sample 1 has none; all_nan: no sample has any;
    shared: both samples have the same 2-slot history (one scanpath evaluation for both), and the wide hidden maps
    are computed in chunks of 50 positions (the readout grid has 13 x 18).

    Without history the oracle, like the reference, takes the LayerNorm of a constant map, which in float32 returns
    eps-amplified rounding noise (up to ~1e-2 nats); the optimised network returns the exact value. So the float32
    network is compared with the float64 oracle in every case, with the float32 oracle only when every sample has
    history.
    """
    if history == "shared":
        monkeypatch.setattr(fused, "CPU_CHUNK_ELEMENTS", 128 * 50)
    pair = model_pair(components, scanpath)
    fast32, naive32 = pair[torch.float32]
    fast64, naive64 = pair[torch.float64]
    inputs32 = head_inputs(height, width, history, torch.float32, seed=height * width)
    inputs64 = head_inputs(height, width, history, torch.float64, seed=height * width)

    out_exact, out_naive64, gradients64 = run_both(fast64, naive64, inputs64)
    out_fast, out_naive, gradients = run_both(fast32, naive32, inputs32)
    assert out_fast.shape == (2, 1, height, width)
    assert (out_fast - out_exact.float()).abs().max().item() < 1e-4
    if history in ("mixed", "shared"):
        assert (out_fast - out_naive).abs().max().item() < 1e-4
        flat_fast = torch.cat([g.flatten() for g, _ in gradients.values()])
        flat_naive = torch.cat([g.flatten() for _, g in gradients.values()])
        assert ((flat_fast - flat_naive).norm() / flat_naive.norm()).item() < 1e-4

    assert (out_exact - out_naive64).abs().max().item() < 1e-9
    assert len(gradients64) == sum(1 for name, _ in fast64.named_parameters() if not name.startswith("features."))
    for name, (grad_fast, grad_naive) in gradients64.items():
        tolerance = 1e-4 * grad_naive.abs().max().item() + 1e-6
        assert (grad_fast - grad_naive).abs().max().item() <= tolerance, name


@pytest.mark.parametrize(
    "components, scanpath, height, width, greyscale, dtype",
    [
        (10, True, 200, 260, False, torch.float32),
        (1, False, 100, 140, True, torch.float32),
        (1, True, 64, 64, False, torch.float64),
    ],
)
def test_forward_with_backbone_equals_naive_oracle(components, scanpath, height, width, greyscale, dtype):
    """Whole forward from uint8 images: the truncated backbone equals torchvision's full forward with hooks.

    At 64x64 the backbone returns a 1x1 map, so the saliency is spatially constant and the fixation-selection
    LayerNorm of it is 0/0 up to eps: a float32 full-resolution implementation returns rounding noise there, hence
    float64 for that size.
    """
    fast, naive = model_pair(components, scanpath)[dtype]
    generator = torch.Generator().manual_seed(height)
    image = torch.randint(0, 256, (2, 1 if greyscale else 3, height, width), dtype=torch.uint8, generator=generator)
    _, centerbias, x_hist, y_hist, _ = head_inputs(height, width, "mixed", dtype, seed=width)
    with torch.no_grad():
        out_fast = fast(image, centerbias, x_hist, y_hist)
        out_naive = naive(image, centerbias, x_hist, y_hist)
    assert (out_fast - out_naive).abs().max().item() < 1e-4
