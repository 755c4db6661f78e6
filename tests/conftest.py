"""Shared fixtures of the application tests: a tiny synthetic experiment trained once per test session."""

import contextlib
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml

from deepgaze_lit import DeepGazeIII
from deepgaze_lit.cli import main
from deepgaze_lit.module import DeepGazeModule

REPOSITORY = Path(__file__).resolve().parents[1]
DATA = REPOSITORY / "tests" / "data"
IG_LINE = re.compile(
    r"validation IG over centre bias: (-?\d+\.\d+) bit/fix \((-?\d+\.\d+)% of the gold standard (\d+\.\d+) bit/fix\)"
)
"""The last line `deepgaze fit` prints when the data has a true density: IG (bit/fix), share of gold (%), gold."""

TINY_EPOCHS = 5
TINY_TRAIN_IMAGES = 8
TINY_BATCH_SIZE = 4


def tiny_config(**overrides) -> dict:
    """`deepgaze` config of a tiny synthetic experiment on CPU: 12 images of 128x192 pixels (8 train / 4 val),
    a 2-component scanpath model on a random frozen backbone, 5 epochs of 2 steps."""
    config = {
        "seed_everything": 42,
        "experiment": "tiny",
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "precision": 32,
            "max_epochs": TINY_EPOCHS,
            "deterministic": True,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
        },
        "model": {
            "num_components": 2,
            "scanpath": True,
            "backbone_weights": "none",
            "feature_cache_mb": 64,
            "gold_kernel_size": 6.0,
            "optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.02}},
        },
        "data": {
            "source": "synthetic",
            "synthetic_images": 12,
            "synthetic_sizes": [[128, 192]],
            "val_images": 4,
            "batch_size": TINY_BATCH_SIZE,
            "image_cache_mb": 0,
        },
    }
    for section, values in overrides.items():
        if isinstance(values, dict):
            config[section].update(values)
        else:
            config[section] = values
    return config


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(args: list[str], cwd: Path) -> str:
    """Run `deepgaze <args>` in-process with `cwd` as working directory; returns what it printed to stdout."""
    printed = io.StringIO()
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(printed):
            main(args)
    finally:
        os.chdir(previous)
    return printed.getvalue()


@dataclass
class TrainedExperiment:
    root: Path  # working directory of the run: experiments/tiny/ lies below it
    config: Path
    stdout: str

    @property
    def directory(self) -> Path:
        return self.root / "experiments" / "tiny"

    @property
    def checkpoints(self) -> Path:
        return self.directory / "checkpoints"


@pytest.fixture(scope="session")
def trained_experiment(tmp_path_factory) -> TrainedExperiment:
    """`deepgaze fit` of the tiny config, run once; tests must not write into its experiment folder."""
    root = tmp_path_factory.mktemp("trained")
    config = write_config(root / "tiny.yaml", tiny_config())
    stdout = run_cli(["fit", "--config", str(config)], root)
    return TrainedExperiment(root, config, stdout)


def two_component_module(**options) -> DeepGazeModule:
    """A seeded 2-component scanpath DeepGazeModule on a random backbone, Adam (lr 0.01); `options` override."""
    torch.manual_seed(0)
    settings = dict(num_components=2, scanpath=True, backbone_weights="none",
                    optimizer=lambda parameters: torch.optim.Adam(parameters, lr=1e-2))
    settings.update(options)
    return DeepGazeModule(**settings)


class StepLosses(L.Callback):
    """Every training step's loss (float)."""

    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def load_head_case(name: str, scanpath: bool, components: int):
    """Our head loaded with a reference head-vector case: (network, features, [centerbias, x_hist, y_hist],
    expected log density, image shape). Origin: shared/reference/vectors/head_*.npz (reference DeepGazeIIIMixture
    with random readout parameters)."""
    data = np.load(DATA / f"{name}.npz")
    net = DeepGazeIII(num_components=components, scanpath=scanpath, backbone_weights="none")
    state = {key[len("state/"):]: torch.from_numpy(data[key]) for key in data.files if key.startswith("state/")}
    report = net.load_weights(state, strict=False)
    assert not report.unexpected and all(key.startswith("features.") for key in report.missing)
    features = torch.cat([torch.from_numpy(data[f"feature_{i}"]) for i in range(3)], dim=1)
    inputs = [torch.from_numpy(data[key]) for key in ("centerbias", "x_hist", "y_hist")]
    return net, features, inputs, torch.from_numpy(data["expected_log_density"]), tuple(data["image_shape"])
