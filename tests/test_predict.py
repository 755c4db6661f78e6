"""`deepgaze predict`: one .npy log density and one .png overlay per input image, at the input image's size."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli, tiny_config, write_config
from deepgaze_lit.model import DeepGazeIII
from deepgaze_lit.predict import PredictionWriter
from deepgaze_lit.rendering import density_overlay, heat_colours

INPUTS = {  # file name -> (height, width, Pillow mode)
    "street.png": (100, 150, "RGB"),
    "portrait.jpg": (131, 77, "L"),
    "icon.png": (64, 64, "RGBA"),
}


def write_images(folder):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, (height, width, mode) in INPUTS.items():
        channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
        pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
        Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels, mode).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    return folder


def assert_outputs_at_input_sizes(output_dir):
    assert sorted(path.name for path in output_dir.iterdir()) == sorted(
        f"{name.rsplit('.', 1)[0]}.{suffix}" for name in INPUTS for suffix in ("npy", "png")
    )
    for name, (height, width, _) in INPUTS.items():
        stem = name.rsplit(".", 1)[0]
        log_density = np.load(output_dir / f"{stem}.npy")
        assert log_density.dtype == np.float32 and log_density.shape == (height, width)
        assert abs(float(torch.logsumexp(torch.from_numpy(log_density).double().flatten(), 0))) < 1e-4
        with Image.open(output_dir / f"{stem}.png") as overlay:
            assert overlay.size == (width, height) and overlay.mode == "RGB"


@pytest.mark.parametrize("resize", ["native", "max_side"])
def test_predict_from_a_training_checkpoint_writes_npy_and_png_per_image(trained_experiment, tmp_path, resize):
    images = write_images(tmp_path / "images")
    output_dir = tmp_path / "predictions"
    config = write_config(tmp_path / "c.yaml", tiny_config(data={"resize": resize, "max_side": 128}))
    run_cli(["predict", "--config", str(config), "--ckpt_path", str(trained_experiment.checkpoints / "best.ckpt"),
             "--data.predict_dir", str(images), "--output_dir", str(output_dir)], tmp_path)
    assert_outputs_at_input_sizes(output_dir)


def test_predict_with_released_weights_matches_the_network(tmp_path):
    """Weights in the release layout (init_from), a centre-bias template: the written log density is the
    network's output for the image, the template zoomed to its size and a central dummy history."""
    torch.manual_seed(0)
    network = DeepGazeIII(num_components=2, scanpath=True, backbone_weights="none").eval()
    for finalizer in network.finalizers:
        torch.nn.init.normal_(finalizer.center_bias_weight, 1.0, 0.3)
    weights = tmp_path / "deepgaze3.pth"
    torch.save(network.state_dict(), weights)
    height, width = 100, 150
    rows, cols = np.mgrid[0:height, 0:width]
    template = -((rows - 30.0) ** 2 + (cols - 40.0) ** 2) / 800.0
    template -= np.log(np.exp(template).sum())
    np.save(tmp_path / "template.npy", template)
    images = write_images(tmp_path / "images")
    output_dir = tmp_path / "predictions"
    config = write_config(tmp_path / "c.yaml", tiny_config(
        model={"init_from": str(weights), "num_components": 2, "scanpath": True},
        data={"centerbias": "template", "centerbias_template": str(tmp_path / "template.npy")},
    ))
    run_cli(["predict", "--config", str(config), "--data.predict_dir", str(images), "--output_dir", str(output_dir)],
            tmp_path)
    assert_outputs_at_input_sizes(output_dir)

    image = torch.from_numpy(np.asarray(Image.open(images / "street.png").convert("RGB"))).permute(2, 0, 1)[None]
    history = torch.tensor([[width / 2, math.nan, math.nan, math.nan]]), torch.tensor([[height / 2] + [math.nan] * 3])
    centerbias = torch.from_numpy(template).float()[None]
    with torch.no_grad():
        expected = network(image, centerbias, *history)[0, 0].numpy()
    np.testing.assert_allclose(np.load(output_dir / "street.npy"), expected, atol=1e-4)


def test_heat_colours_and_overlay():
    assert np.allclose(heat_colours(np.array([0.0, 1.0])), [[0, 0, 4], [252, 255, 164]])
    image = np.full((4, 6), 100, dtype=np.uint8)
    log_density = np.full((4, 6), -math.log(24))
    log_density[0, 0] += 2.0
    overlay = density_overlay(image, log_density, opacity=0.5)
    assert overlay.shape == (4, 6, 3) and overlay.dtype == np.uint8
    assert overlay[0, 0].tolist() == [176, 178, 132]
    with pytest.raises(ValueError, match="differs"):
        density_overlay(image, log_density[:3])


def test_writer_refuses_two_inputs_with_the_same_stem(tmp_path):
    writer = PredictionWriter(str(tmp_path))
    assert writer._unique_stem("a/photo.jpg") == "photo"
    with pytest.raises(ValueError, match="photo.npy"):
        writer._unique_stem("a/photo.png")
