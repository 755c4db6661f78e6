"""`deepgaze predict`: the input size and centre bias a prediction run uses, and the run itself.

Prediction is a plain loop on one device (`output.PredictionJob`: one image at a time, memory flat in the number
of images, resumable), not Lightning's predict loop: nothing in it needs a Trainer, and several processes could not
share one HDF5 file.

Safe defaults, each printed when the run starts:
- Input size: `data.resize` / `data.max_side` when `data.resize` is set (any policy, "native" included); else the
  data settings the checkpoint was trained with (saved with it by `deepgaze fit`); else
  MIT1003's two sizes (768x1024 / 1024x768, as the released model was trained). Every density is resized back to
  its file's size.
- Centre bias: `data.centerbias` "uniform", or "template" (e.g. the released centerbias_mit1003.npy); "kde" is fitted
  on the training split of a configured dataset only: with the built-in synthetic data (the DataModule's default
  source, i.e. no dataset configured) prediction uses the uniform centre bias instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch

from deepgaze_lit.data.centerbias import CenterbiasModel, UniformCenterbias
from deepgaze_lit.data.datamodule import SaliencyDataModule
from deepgaze_lit.data.resize import TWO_SIZES_LANDSCAPE, TWO_SIZES_PORTRAIT, ResizePolicy, target_shape
from deepgaze_lit.inference import DensityPredictor
from deepgaze_lit.model import DeepGazeIII
from deepgaze_lit.model.checkpoint import read_training_checkpoint
from deepgaze_lit.output import PredictionJob, WriteSummary, make_writers

RELEASE_RESIZE: ResizePolicy = "two_sizes"
"""Input-size policy without any other information: MIT1003's two sizes, at which the release was trained."""


@dataclass(frozen=True)
class InputSize:
    """The input-size policy of a prediction run and why it was chosen."""

    resize: ResizePolicy
    max_side: Optional[int]
    reason: str

    def describe(self) -> str:
        if self.resize == "two_sizes":
            sizes = (f"two_sizes ({TWO_SIZES_LANDSCAPE[0]}x{TWO_SIZES_LANDSCAPE[1]} landscape, "
                     f"{TWO_SIZES_PORTRAIT[0]}x{TWO_SIZES_PORTRAIT[1]} otherwise, H x W)")
        elif self.resize == "max_side":
            sizes = f"max_side (longer side at most {self.max_side} pixels)"
        else:
            sizes = "native (each image at its own size)"
        return f"input size {sizes}, {self.reason}; densities resized back to each image's size"


@dataclass(frozen=True)
class CenterbiasChoice:
    """The centre bias of a prediction run: the model, its kind and where it comes from."""

    model: CenterbiasModel
    kind: str
    source: str

    def describe(self) -> str:
        return f"centre bias {self.kind} ({self.source})"


def choose_input_size(data: SaliencyDataModule, trained_settings: Optional[Mapping[str, Any]]) -> InputSize:
    """The input size: the configured `data.hparams` ("resize", "max_side") when `data.resize` was set, else
    `trained_settings` (the checkpoint's data settings, None when unknown), else MIT1003's two sizes."""
    data_settings = data.hparams
    if data.resize_configured:
        size = InputSize(data_settings["resize"], data_settings.get("max_side"), "as configured (data.resize)")
    elif trained_settings is not None and "resize" in trained_settings:
        size = InputSize(trained_settings["resize"], trained_settings.get("max_side"),
                         "as the checkpoint was trained (its data settings)")
    else:
        size = InputSize(RELEASE_RESIZE, None, "MIT1003's sizes (the checkpoint records no data settings)")
    target_shape((1, 1), size.resize, size.max_side)
    return size


def choose_centerbias(data: SaliencyDataModule) -> CenterbiasChoice:
    """The centre bias configured in `data`, except that "kde" on the synthetic source becomes uniform."""
    settings = data.hparams
    if settings.centerbias == "kde" and settings.source == "synthetic":
        return CenterbiasChoice(UniformCenterbias(), "uniform",
                                "no dataset configured (data.source synthetic), so no KDE is fitted; for the "
                                "release use --data.centerbias template --data.centerbias_template "
                                "centerbias_mit1003.npy")
    if settings.centerbias == "kde":
        source = f"KDE of the training split of data.source {settings.source} at {settings.path}"
    elif settings.centerbias == "template":
        source = f"template {settings.centerbias_template}"
    else:
        source = "as configured"
    return CenterbiasChoice(data.centerbias_model(), settings.centerbias, source)


def load_training_checkpoint(path: str | Path) -> tuple[DeepGazeIII, Optional[dict]]:
    """The network of a `deepgaze fit` checkpoint (`DeepGazeIII.from_checkpoint`: rebuilt from the model settings
    saved in it, so no config is needed; a backbone the checkpoint left out is rebuilt from the weights it was
    trained with) and the data settings it was trained with (None when it records none)."""
    network = DeepGazeIII.from_checkpoint(path)
    checkpoint = read_training_checkpoint(path, mmap=True)
    return network, checkpoint.get(SaliencyDataModule.CHECKPOINT_HYPER_PARAMS_KEY)


def run_prediction(network: DeepGazeIII, data: SaliencyDataModule, source: str | Path, output_dir: str | Path,
                   formats: list[str], overwrite: bool, device: torch.device,
                   trained_settings: Optional[Mapping[str, Any]] = None, keep_extension: bool = False,
                   report: Callable[[str], None] = print) -> WriteSummary:
    """Predict `source` (an image file or a folder tree) with `network` into `formats` below `output_dir`.

    The inputs are listed and the outputs opened before the centre bias is built or the network moved (so a bad
    input or an unwritable output folder fails first); `report` receives the lines saying which input size and
    centre bias are used and, at the end, what was written, skipped and not readable.
    """
    with PredictionJob(source, make_writers(output_dir, formats, keep_extension), overwrite) as job:
        size = choose_input_size(data, trained_settings)
        centerbias = choose_centerbias(data)
        report(f"deepgaze predict: {size.describe()}")
        report(f"deepgaze predict: {centerbias.describe()}")
        done = 0 if overwrite else job.count_done()
        report(f"deepgaze predict: {len(job.images)} image(s) in {source}, {done} already predicted; writing "
               f"{', '.join(formats)} to {output_dir} on {device}")
        predictor = DensityPredictor(network.to(device), centerbias.model, size.resize, size.max_side)
        summary = job.run(predictor)
    line = f"deepgaze predict: {summary.written} written, {summary.skipped} already predicted (kept)"
    if summary.failed:
        line += f", {len(summary.failed)} not readable (skipped, named in the warnings above)"
    report(line)
    return summary
