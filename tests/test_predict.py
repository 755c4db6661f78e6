"""`deepgaze predict`: safe defaults (input size, centre bias never fitted on synthetic data), a folder tree into
every format, resumable runs, unreadable images skipped and counted, unwritable outputs refused up front."""

import math

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.special import logsumexp

from conftest import run_cli, tiny_config, write_config
from deepgaze_lit.data.datamodule import SaliencyDataModule
from deepgaze_lit.model import DeepGazeIII
from deepgaze_lit.output.writers import HDF5_FILE_NAME
from deepgaze_lit.predict import choose_input_size
from deepgaze_lit.rendering import density_overlay, heat_colours

TREE = {  # relative path -> (height, width, Pillow mode)
    "a/x.jpg": (100, 150, "RGB"),
    "b/x.jpg": (131, 77, "L"),
    "x.png": (64, 64, "RGBA"),
}
TINY_MODEL = ["--model.num_components", "2", "--model.backbone_weights", "none", "--trainer.accelerator", "cpu"]
"""Model settings of the tiny experiment, for runs with released-layout weights (a checkpoint brings its own)."""


def write_tree(root, broken=False):
    rng = np.random.default_rng(0)
    for relative, (height, width, mode) in TREE.items():
        channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
        pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels, mode).save(root / relative)
    (root / "notes.txt").write_text("not an image")
    if broken:
        (root / "b" / "broken.jpg").write_bytes(b"not a JPEG")
    return root


def stem(relative):
    return relative.rsplit(".", 1)[0]


@pytest.fixture
def no_synthetic_data(monkeypatch):
    """Fail the test if the DataModule reads its data source (the synthetic images, without a config)."""
    def refuse(self):
        raise AssertionError("predict read the DataModule's data source")
    monkeypatch.setattr(SaliencyDataModule, "_setup_splits", refuse)


def test_predict_without_config_uses_no_synthetic_data_and_the_trained_input_size(
        trained_experiment, tmp_path, no_synthetic_data, caplog):
    images = write_tree(tmp_path / "images", broken=True)
    output_dir = tmp_path / "out"
    # no config, no model settings: the 2-component network comes from the checkpoint's own settings
    args = ["predict", "--ckpt_path", str(trained_experiment.checkpoints / "best.ckpt"), "--trainer.accelerator",
            "cpu", "--input", str(images), "--output_dir", str(output_dir), "--formats", "[npy,hdf5,saliency,overlay]"]
    printed = run_cli(args, tmp_path)
    assert "centre bias uniform (no dataset configured (data.source synthetic), so no KDE is fitted" in printed
    assert "input size native (each image at its own size), as the checkpoint was trained" in printed
    assert "3 written, 0 already predicted (kept), 1 not readable" in printed
    warnings = [record.getMessage() for record in caplog.records if "broken.jpg" in record.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("skipped ")

    with h5py.File(output_dir / HDF5_FILE_NAME, "r") as file:
        keys = []
        file.visititems(lambda name, item: keys.append(name) if isinstance(item, h5py.Dataset) else None)
        assert sorted(keys) == sorted(TREE)
        for relative, (height, width, _) in TREE.items():
            log_density = np.load(output_dir / "npy" / f"{stem(relative)}.npy")
            assert log_density.dtype == np.float32 and log_density.shape == (height, width)
            assert abs(logsumexp(log_density.astype(np.float64))) < 1e-5
            np.testing.assert_array_equal(file[relative][:], log_density)
            for folder in ("saliency", "overlay"):
                with Image.open(output_dir / folder / f"{stem(relative)}.png") as written:
                    assert written.size == (width, height)

    again = run_cli(args, tmp_path)
    assert "0 written, 3 already predicted (kept), 1 not readable" in again


def test_predict_input_size_follows_the_configuration_over_the_checkpoint(trained_experiment, tmp_path,
                                                                          no_synthetic_data):
    images = write_tree(tmp_path / "images")
    printed = run_cli(["predict", "--ckpt_path", str(trained_experiment.checkpoints / "best.ckpt"),
                       "--data.resize", "max_side", "--data.max_side", "96", "--input", str(images / "a" / "x.jpg"),
                       "--output_dir", str(tmp_path / "out"), "--formats", "[npy]"], tmp_path)
    assert "input size max_side (longer side at most 96 pixels), as configured (data.resize)" in printed
    assert np.load(tmp_path / "out" / "npy" / "x.npy").shape == TREE["a/x.jpg"][:2]


@pytest.mark.parametrize("configured, expected", [
    ({}, ("max_side", 80, "as the checkpoint was trained (its data settings)")),
    ({"resize": "native"}, ("native", None, "as configured (data.resize)")),
    ({"resize": "two_sizes"}, ("two_sizes", None, "as configured (data.resize)")),
])
def test_an_explicit_data_resize_native_is_not_mistaken_for_unset(configured, expected):
    trained = {"resize": "max_side", "max_side": 80}
    data = SaliencyDataModule(**configured)
    assert data.hparams.resize == configured.get("resize", "native")
    size = choose_input_size(data, trained)
    assert (size.resize, size.max_side, size.reason) == expected
    unset_and_untrained = choose_input_size(SaliencyDataModule(), None)
    assert (unset_and_untrained.resize, unset_and_untrained.max_side) == ("two_sizes", None)


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
    images = write_tree(tmp_path / "images")
    output_dir = tmp_path / "predictions"
    config = write_config(tmp_path / "c.yaml", tiny_config(
        model={"init_from": str(weights), "num_components": 2, "scanpath": True},
        data={"centerbias": "template", "centerbias_template": str(tmp_path / "template.npy"),
              "resize": "max_side", "max_side": 1000},
    ))
    printed = run_cli(["predict", "--config", str(config), "--input", str(images), "--output_dir", str(output_dir),
                       "--formats", "[npy]"], tmp_path)
    assert f"centre bias template (template {tmp_path / 'template.npy'})" in printed

    image = torch.from_numpy(np.asarray(Image.open(images / "a" / "x.jpg").convert("RGB"))).permute(2, 0, 1)[None]
    history = torch.tensor([[width / 2, math.nan, math.nan, math.nan]]), torch.tensor([[height / 2] + [math.nan] * 3])
    centerbias = torch.from_numpy(template).float()[None]
    with torch.no_grad():
        expected = network(image, centerbias, *history)[0, 0].double().numpy()
    np.testing.assert_allclose(np.load(output_dir / "npy" / "a" / "x.npy"), expected - logsumexp(expected),
                               atol=1e-4)


def test_predict_without_weights_or_into_an_unwritable_folder_is_one_line(tmp_path, capsys):
    images = write_tree(tmp_path / "images")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["predict", *TINY_MODEL, "--input", str(images)], tmp_path)
    assert exit_info.value.code == 2
    assert "predict needs weights: --ckpt_path" in capsys.readouterr().err

    weights = tmp_path / "deepgaze3.pth"
    torch.save(DeepGazeIII(num_components=2, scanpath=True, backbone_weights="none").state_dict(), weights)
    blocker = tmp_path / "file"
    blocker.write_text("a file where the output folder should be")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["predict", *TINY_MODEL, "--model.init_from", str(weights), "--input", str(images),
                 "--output_dir", str(blocker / "out")], tmp_path)
    assert exit_info.value.code == 2
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("deepgaze")]
    assert len(error) == 1 and "out is under a regular file" in error[0]


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
