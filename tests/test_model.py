"""DeepGaze III network: release layout, reference head vectors, backbone contract, inputs, BlockLogDensity."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision

from conftest import load_head_case
from deepgaze_lit import DeepGazeIII
from deepgaze_lit.model import MIN_IMAGE_SIDE, imagenet_weights_path
from deepgaze_lit.model.backbone import backbone_output_side
from deepgaze_lit.model.deepgaze3 import distinct_histories
from deepgaze_lit.model.grids import NearestMap

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def model():
    """10 scanpath components, random backbone."""
    torch.manual_seed(0)
    return DeepGazeIII(num_components=10, scanpath=True, backbone_weights="none")


def release_rows():
    # Origin: shared/reference/vectors/deepgaze3_state_dict.tsv (reference DeepGazeIII(pretrained=False).state_dict()).
    lines = (DATA / "deepgaze3_state_dict.tsv").read_text().splitlines()[1:]
    rows = [line.split("\t") for line in lines]
    return [
        (key, () if shape == "scalar" else tuple(int(n) for n in shape.split("x")), dtype) for key, shape, dtype in rows
    ]


def test_state_dict_equals_release_layout(model):
    rows = release_rows()
    state = model.state_dict()
    assert len(rows) == 1587
    assert [(key, tuple(value.shape), str(value.dtype)) for key, value in state.items()] == rows


def test_release_layout_loads_strictly_and_from_release(tmp_path):
    generator = torch.Generator().manual_seed(1)

    def random_tensor(shape, dtype):
        if "int" in dtype:
            return torch.randint(0, 5, shape, generator=generator)
        return torch.randn(shape, generator=generator)

    release = {key: random_tensor(shape, dtype) for key, shape, dtype in release_rows()}
    DeepGazeIII(num_components=10, scanpath=True, backbone_weights="none").load_state_dict(release, strict=True)
    path = tmp_path / "deepgaze3.pth"
    torch.save(release, path)
    loaded = DeepGazeIII.from_release(path)
    assert loaded.num_components == 10 and loaded.scanpath
    assert all(torch.equal(value, release[key]) for key, value in loaded.state_dict().items())
    fold3 = DeepGazeIII.from_release(path, component=3)
    assert fold3.num_components == 1
    for key, value in fold3.state_dict().items():
        source = key.replace("networks.0.", "networks.3.").replace("finalizers.0.", "finalizers.3.")
        assert torch.equal(value, release[source]), key


@pytest.mark.parametrize("name, scanpath, components", [("head_scanpath", True, 2), ("head_spatial", False, 1)])
def test_head_matches_reference_vectors(name, scanpath, components):
    net, features, (centerbias, x_hist, y_hist), expected, image_shape = load_head_case(name, scanpath, components)
    density = net.head(features, centerbias, x_hist, y_hist)
    full = density.full()
    assert density.image_shape == image_shape and full.shape == expected.shape
    assert (full - expected).abs().max().item() < 1e-4
    assert torch.allclose(full.exp().sum(dim=(1, 2, 3)), torch.ones(len(full)), atol=1e-5)


def random_inputs(batch, height, width, seed):
    generator = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (batch, 3, height, width), dtype=torch.uint8, generator=generator)
    centerbias = torch.randn(batch, height * width, generator=generator).log_softmax(-1).view(batch, height, width)
    x_hist = torch.rand(batch, 4, generator=generator) * width
    y_hist = torch.rand(batch, 4, generator=generator) * height
    x_hist[-1, 1:] = y_hist[-1, 1:] = float("nan")
    return image, centerbias, x_hist, y_hist


@pytest.mark.parametrize("height, width", [(100, 140), (76, 120), (MIN_IMAGE_SIDE, 97)])
def test_forward_shape_and_normalisation_at_odd_sizes(model, height, width):
    image, centerbias, x_hist, y_hist = random_inputs(2, height, width, seed=height)
    with torch.no_grad():
        log_density = model(image, centerbias, x_hist, y_hist)
    assert log_density.shape == (2, 1, height, width)
    assert torch.allclose(log_density.exp().sum(dim=(1, 2, 3)), torch.ones(2), atol=1e-5)


def test_minimum_image_side_is_exact(model):
    """58 px is the smallest side: 57 // 2 = 28 px make torchvision's DenseNet-201 fail, 58 // 2 = 29 px work."""
    assert MIN_IMAGE_SIDE == 58
    densenet = torchvision.models.densenet201().features.eval()
    with torch.no_grad():
        assert densenet(torch.zeros(1, 3, 29, 29)).shape[-1] == backbone_output_side(29) == 1
        with pytest.raises(RuntimeError):
            densenet(torch.zeros(1, 3, 28, 28))
    assert backbone_output_side(28) == 0
    image, centerbias, _, _ = random_inputs(1, 57, 80, seed=0)
    with pytest.raises(ValueError, match=r"57x80 .*>= 58 pixels"):
        model(image, centerbias)


def test_backbone_stays_frozen_in_train_mode(model):
    model.train()
    batch_norms = [m for m in model.features.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(batch_norms) == 201 and not any(m.training for m in batch_norms)
    assert all(m.training for m in model.saliency_networks.modules())
    running = [m.running_mean.clone() for m in batch_norms]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    image, centerbias, x_hist, y_hist = random_inputs(2, 64, 80, seed=1)
    density = model.head(model.backbone_features(image), centerbias, x_hist, y_hist)
    loss = -density.at(torch.tensor([0, 1]), torch.tensor([3.0, 50.0]), torch.tensor([10.0, 60.0])).mean()
    loss.backward()
    optimizer.step()
    assert all(torch.equal(before, m.running_mean) for before, m in zip(running, batch_norms))
    for name, parameter in model.named_parameters():
        if name.startswith("features."):
            assert not parameter.requires_grad and parameter.grad is None, name
        else:
            assert parameter.grad is not None, name
    model.zero_grad(set_to_none=True)
    model.eval()


def test_cpu_backbone_features_do_not_depend_on_the_batch(model):
    """One image at a time on the CPU: an image's features are bitwise the same alone and within any batch."""
    image, _, _, _ = random_inputs(3, 96, 128, seed=8)
    batched = model.backbone_features(image)
    for index in range(3):
        assert torch.equal(batched[index : index + 1], model.backbone_features(image[index : index + 1]))
    assert torch.equal(model.backbone_features(image[[2, 0]]), batched[[2, 0]])


def test_uint8_greyscale_and_channels_last_inputs(model):
    image, centerbias, x_hist, y_hist = random_inputs(2, 64, 72, seed=2)
    with torch.no_grad():
        features = model.backbone_features(image)
        assert torch.equal(model.backbone_features(image.float()), features)
        features_cl = model.backbone_features(image.contiguous(memory_format=torch.channels_last))
        assert features_cl.is_contiguous(memory_format=torch.channels_last)
        assert ((features_cl - features).abs().max() / features.abs().max()).item() < 1e-5
        density = model.head(features, centerbias, x_hist, y_hist).full()
        density_cl = model.head(features_cl, centerbias, x_hist, y_hist).full()
        assert (density_cl - density).abs().max().item() < 1e-3
        grey = image[:, :1]
        assert torch.equal(model.backbone_features(grey), model.backbone_features(grey.expand(-1, 3, -1, -1)))


def test_bf16_autocast_keeps_float32_normalised_output(model):
    image, centerbias, x_hist, y_hist = random_inputs(2, 64, 64, seed=3)
    with torch.no_grad():
        reference = model(image, centerbias, x_hist, y_hist)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        density = model.head(model.backbone_features(image), centerbias, x_hist, y_hist)
    assert density.values.dtype == torch.float32
    assert torch.allclose(density.full().exp().sum(dim=(1, 2, 3)), torch.ones(2), atol=1e-5)
    assert (density.full() - reference).abs().max().item() < 0.1
    density.at(torch.tensor([0]), torch.tensor([5.0]), torch.tensor([7.0])).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("history", ["all_nan", "none"])
def test_batch_without_any_history(model, history):
    image, centerbias, x_hist, y_hist = random_inputs(2, 64, 64, seed=4)
    x_hist[:] = y_hist[:] = float("nan")
    args = (x_hist, y_hist) if history == "all_nan" else ()
    with torch.no_grad():
        log_density = model(image, centerbias, *args)
    assert torch.isfinite(log_density).all()
    assert torch.allclose(log_density.exp().sum(dim=(1, 2, 3)), torch.ones(2), atol=1e-5)


def test_distinct_histories_share_rows_of_equal_histories():
    """Equal histories (missing slots equal whatever coordinate is left) map to one row, in the right order."""
    nan = float("nan")
    x_hist = torch.tensor([[5.0, nan, nan, nan], [7.0, 1.0, nan, nan], [5.0, 3.0, nan, nan], [5.0, nan, 2.0, nan]])
    y_hist = torch.tensor([[6.0, nan, nan, nan], [8.0, 2.0, nan, nan], [6.0, nan, nan, nan], [6.0, nan, nan, 9.0]])
    x_distinct, y_distinct, row = distinct_histories(x_hist, y_hist)
    assert x_distinct.shape == (2, 4)
    assert row[0] == row[2] == row[3] != row[1]
    expected_x = torch.tensor([[5.0, nan, nan, nan], [7.0, 1.0, nan, nan]])
    expected_y = torch.tensor([[6.0, nan, nan, nan], [8.0, 2.0, nan, nan]])
    assert torch.equal(x_distinct[row[[0, 1]]].nan_to_num(-1), expected_x.nan_to_num(-1))
    assert torch.equal(y_distinct[row[[0, 1]]].nan_to_num(-1), expected_y.nan_to_num(-1))


def test_head_is_differentiable_in_the_history_coordinates(model):
    """Histories that need a gradient are not merged (torch.unique has none), even when two rows are equal."""
    image, centerbias, x_hist, y_hist = random_inputs(2, 64, 96, seed=9)
    x_hist[1], y_hist[1] = x_hist[0], y_hist[0]
    x_hist.requires_grad_()
    with torch.no_grad():
        features = model.backbone_features(image)
    (gradient,) = torch.autograd.grad(model.head(features, centerbias, x_hist, y_hist).values.sum(), x_hist)
    present = torch.isfinite(x_hist.detach()) & torch.isfinite(y_hist)
    assert torch.isfinite(gradient).all() and (gradient[present] != 0).all()


def test_block_log_density_lookup_and_entropy(model):
    image, centerbias, x_hist, y_hist = random_inputs(2, 83, 101, seed=5)
    with torch.no_grad():
        density = model.head(model.backbone_features(image), centerbias, x_hist, y_hist)
    full = density.full()
    assert density.values.shape == (2, 1, 83 // 4, 101 // 4)
    batch_index = torch.tensor([0, 0, 1, 1, 1])
    x = torch.tensor([0.0, 100.9, 37.5, 50.2, 3.99])
    y = torch.tensor([0.0, 82.9, 12.1, 81.0, 41.7])
    expected = full[batch_index, 0, y.long(), x.long()]
    assert torch.equal(density.at(batch_index, x, y), expected)
    assert torch.equal(density.at(torch.tensor([1]), torch.tensor([101.0]), torch.tensor([-0.5])), full[1:, 0, 0, 100])
    entropy = -(full.exp() * full).sum(dim=(1, 2, 3))
    assert torch.allclose(density.entropy(), entropy, rtol=1e-5)
    assert density.cell_sizes().sum().item() == 83 * 101


@pytest.mark.parametrize("size", list(range(5, 40)) + [97, 130, 257, 768, 1023])
def test_nearest_maps_equal_f_interpolate(size):
    other = size // 3 + 1
    grid = torch.arange(size * other, dtype=torch.float64).view(1, 1, size, other)
    for out_shape in [(math.ceil(size / 8), other), (size * 2 + 1, other + 3), (max(size // 4, 1), other)]:
        resized = F.interpolate(grid, size=out_shape)
        assert torch.equal(NearestMap.to_size((size, other), out_shape, "cpu").apply(grid), resized)
    if size >= 4 and other >= 4:
        for factor in (2, 4):
            resized = F.interpolate(grid, scale_factor=1 / factor)
            assert torch.equal(NearestMap.by_factor((size, other), factor, "cpu").apply(grid), resized)


def test_input_errors_name_the_fix(model, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert imagenet_weights_path() == tmp_path / "hub" / "checkpoints" / "densenet201-c1103571.pth"
    with pytest.raises(FileNotFoundError, match=r"densenet201-c1103571\.pth.*" + str(tmp_path / "hub" / "checkpoints")):
        DeepGazeIII(num_components=1, backbone_weights="imagenet")
    with pytest.raises(FileNotFoundError, match="'imagenet', 'none'"):
        DeepGazeIII(num_components=1, backbone_weights=str(tmp_path / "missing.pth"))
    features = torch.zeros(2, 2048, 2, 3)
    with pytest.raises(ValueError, match=r"x_hist must be \(B, 4\)"):
        model.head(features, torch.zeros(2, 64, 64), torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="features must be"):
        model.head(torch.zeros(2, 1024, 2, 3), torch.zeros(2, 64, 64))


def test_grid_maps_made_under_inference_mode_serve_training():
    """The nearest maps are cached per shape: one first made under inference mode (validation, predict) must still
    work in a training step that needs its gradient."""
    model = DeepGazeIII(num_components=1, scanpath=False, backbone_weights="none")
    image = torch.randint(0, 256, (1, 3, 61, 83), dtype=torch.uint8)
    centerbias = torch.full((1, 61, 83), -math.log(61 * 83))
    with torch.inference_mode():
        model(image, centerbias)
    model(image, centerbias).sum().backward()
    assert model.finalizers[0].center_bias_weight.grad is not None
