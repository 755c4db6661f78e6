"""`deepgaze export`: a training checkpoint as a state dict in the release's layout (`deepgaze3.pth`).

    deepgaze export --ckpt_path best --output model.pth [--experiment NAME] [--experiments_root DIR]

The file holds the network's state dict, frozen backbone included (as the release does), with the release's key
names, shapes and dtypes: `DeepGazeIII.from_release` and the reference code load it. It does not record the
subsampling factor: a model trained with another `downsample` than the release's 2 is rebuilt with it.
"""

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from deepgaze_lit.experiment import NAMED_CHECKPOINTS, ExperimentDir
from deepgaze_lit.failures import UsageError
from deepgaze_lit.model.checkpoint import BACKBONE_PREFIX, LoadReport
from deepgaze_lit.model.deepgaze3 import DeepGazeIII
from deepgaze_lit.model.grids import DOWNSAMPLE
from deepgaze_lit.output.writers import write_atomically

def export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepgaze export",
        description="Write the network of a training checkpoint as a state dict in the release's layout "
        "(deepgaze3.pth), backbone included.",
    )
    parser.add_argument("--ckpt_path", required=True,
                        help="'best' or 'last' (of --experiment) or the path of a .ckpt file")
    parser.add_argument("--output", required=True, help="the .pth file to write")
    parser.add_argument("--experiment", default="default", help="experiment of a named checkpoint (best, last)")
    parser.add_argument("--experiments_root", default="experiments", help="folder of all experiments")
    parser.add_argument("--backbone_weights", default=None,
                        help="where the backbone weights the checkpoint was trained with lie now, when it was saved "
                        "without its backbone and they moved ('imagenet' or a .pth path)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return parser


def export_checkpoint(checkpoint: str | Path, output: str | Path, backbone_weights: str | None = None,
                      overwrite: bool = False) -> tuple[DeepGazeIII, LoadReport]:
    """Write the network of `checkpoint` to `output` in the release's layout (`output.writers.write_atomically`: a
    hidden partial file beside it, renamed into place); return the network and the key report of loading the file back into one of the same architecture."""
    output = Path(output)
    if output.exists() and not overwrite:
        raise UsageError(f"{output} exists: choose another --output or pass --overwrite")
    if not output.parent.is_dir():
        raise FileNotFoundError(f"the folder of --output {output} does not exist: create it first")
    model = DeepGazeIII.from_checkpoint(checkpoint, backbone_weights=backbone_weights)
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    write_atomically(output, lambda file: torch.save(state, file))
    reloaded = DeepGazeIII(model.num_components, scanpath=model.scanpath, backbone_weights="none")
    return model, reloaded.load_weights(output, strict=False)


def describe_export(output: Path, model: DeepGazeIII, report: LoadReport) -> str:
    """What `deepgaze export` prints: the file, its tensors and the key report of reading it back."""
    keys = list(model.state_dict())
    backbone = sum(key.startswith(BACKBONE_PREFIX) for key in keys)
    line = (f"deepgaze export: wrote {output} ({len(keys)} tensors, {backbone} of them the backbone, "
            f"{output.stat().st_size / 2**20:.1f} MiB; {model.num_components} components, "
            f"{'with' if model.scanpath else 'without'} scanpath networks); read back in the release layout: "
            f"{report.describe()}")
    downsample = model.downsample
    if downsample != DOWNSAMPLE:
        line += (f"; trained with downsample {downsample:g}: build it with DeepGazeIII(..., downsample={downsample:g})"
                 " and load the file with load_weights")
    return line


def run_export(args: Sequence[str]) -> None:
    """`deepgaze export ARGS` (ARGS: the words after `export`), inside `cli.main`'s error handling (user errors:
    one line, exit status 2)."""
    options = export_parser().parse_args(list(args))
    checkpoint = Path(options.ckpt_path)
    if options.ckpt_path in NAMED_CHECKPOINTS:
        checkpoint = ExperimentDir(options.experiments_root, options.experiment).existing_checkpoint(options.ckpt_path)
    model, report = export_checkpoint(checkpoint, options.output, options.backbone_weights, options.overwrite)
    print(describe_export(Path(options.output), model, report))
