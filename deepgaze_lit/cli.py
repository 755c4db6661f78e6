"""`deepgaze`: the command line (LightningCLI) over `DeepGazeModule` and `SaliencyDataModule`.

    deepgaze fit --config configs/quickstart.yaml
    deepgaze fit --config configs/baseline.yaml --ckpt_path last          # resume (or start when nothing to resume)
    deepgaze validate --config configs/baseline.yaml --ckpt_path best     # evaluate best.ckpt, write a report
    deepgaze predict --config configs/baseline.yaml --ckpt_path best --input images/ --formats [npy,hdf5]
    deepgaze export --experiment baseline --ckpt_path best --output model.pth   # release layout (deepgaze_lit.export)

Every run of an experiment shares one folder `<experiments_root>/<experiment>/` (see `deepgaze_lit.experiment`);
the checkpoint callbacks, TensorBoard and CSV loggers, learning-rate monitor and validation image panel are added
here, in code, so that configs stay short and checkpoint folders cannot diverge. `fit` also gets the
preemption and non-finite-loss callbacks of `deepgaze_lit.resilience`; `--ckpt_path last` resumes the experiment's
newest checkpoint, and `fit` without `--ckpt_path` into an experiment with checkpoints starts a new run, keeping
the earlier run's checkpoints in `checkpoints.<n>/`. `predict` runs the plain prediction loop of
`deepgaze_lit.predict` on the Trainer's one device.

Whatever goes wrong ends with one line `deepgaze: error: ...` and an exit status (`deepgaze_lit.failures`): the
folders a command writes, the checkpoint it is given and the data settings are checked before any work.
"""

import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import ArgsType, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

from deepgaze_lit.callbacks import AtomicCheckpointIO, ValidationPanel
from deepgaze_lit.data.datamodule import SaliencyDataModule
from deepgaze_lit.data.errors import DataError
from deepgaze_lit.experiment import BEST, LAST, NAMED_CHECKPOINTS, ExperimentDir, ExperimentError
from deepgaze_lit.export import run_export
from deepgaze_lit.failures import (DEBUG_ENVIRONMENT, DEBUG_FLAG, EXIT_FAILED, EXIT_USAGE, UsageError,
                                   describe_os_error, error_message, require_writable_folder)
from deepgaze_lit.model.backbone import minimum_image_side
from deepgaze_lit.model.checkpoint import (CheckpointMismatchError, read_training_checkpoint, require_backbone_weights,
                                           saved_backbone)
from deepgaze_lit.model.errors import ModelConfigError, WeightsFileError
from deepgaze_lit.module import DeepGazeModule
from deepgaze_lit.output import OUTPUT_FORMATS
from deepgaze_lit.output.names import InputImage, check_output_location, list_input_images
from deepgaze_lit.predict import load_training_checkpoint, run_prediction
from deepgaze_lit.resilience import (SIGNAL_EXIT_BASE, FiniteLossGuard, NonFiniteLossError, PreemptionCheckpoint,
                                     StopSignals, Stopped, signal_name)

GPU_ACCELERATORS = ("gpu", "cuda")
HALF_PRECISIONS = ("16", "bf16", "16-mixed", "bf16-mixed", "16-true", "bf16-true")


USER_ERRORS = (UsageError, ExperimentError, DataError, FileNotFoundError, CheckpointMismatchError,
               ModelConfigError, WeightsFileError, MisconfigurationException)
"""Errors whose message tells the user what to fix: printed as one line, without a traceback, exit status 2."""
RUN_ERRORS = (NonFiniteLossError,)
"""Failures while running whose message says what happened and what to do: one line, exit status 1."""


def gpu_settings_without_gpu(trainer_config: Any) -> list[str]:
    """The command-line flags that make a GPU configuration run on this CPU-only machine ([] when CUDA exists
    or nothing asks for a GPU)."""
    if torch.cuda.is_available():
        return []
    accelerator = str(trainer_config.get("accelerator"))
    precision = str(trainer_config.get("precision"))
    wants_gpu = accelerator in GPU_ACCELERATORS or (precision in HALF_PRECISIONS and accelerator != "cpu")
    if not wants_gpu:
        return []
    fixes = ["--trainer.accelerator cpu", "--trainer.precision 32"]
    if str(trainer_config.get("devices")) not in ("1", "auto"):
        fixes.append("--trainer.devices 1")
    if "ddp" in str(trainer_config.get("strategy")):
        fixes.append("--trainer.strategy auto")
    return fixes


@dataclass(frozen=True)
class OutputFolder:
    """The `--output_dir` of `deepgaze predict` as `check_output_location` sees a writer: files named after the
    inputs, inside the folder."""

    destination: Path

    def output_path(self, image: InputImage) -> Path:
        return self.destination / image.relative


def check_prediction_folders(source: Optional[str], output_dir: Path) -> None:
    """Before predicting: the inputs exist and are listable without name clashes, the outputs cannot land on them
    (an output folder equal to or inside the input folder is refused) and the output folder can be written."""
    if source is None:
        raise UsageError("deepgaze predict needs --input: an image file or a folder of images")
    check_output_location(source, list_input_images(source), [OutputFolder(output_dir)])
    require_writable_folder(output_dir, "--output_dir")


def minimum_side_for_downsample(downsample: float) -> int:
    """The smallest image side (pixels) the network takes at `model.downsample` (the data checks every image)."""
    if not downsample > 0:
        raise ValueError(f"model.downsample must be a positive factor, got {downsample}")
    return minimum_image_side(downsample)


class DeepGazeCLI(LightningCLI):
    """LightningCLI with one folder per experiment and the application's callbacks added in code.

    Args:
        stop_signals: the process's signal records (`deepgaze_lit.resilience.StopSignals`), installed by `main`
            before anything else and handed to the preemption callback of `fit`.
    """

    def __init__(self, *args: Any, stop_signals: Optional[StopSignals] = None, **kwargs: Any) -> None:
        self.stop_signals = stop_signals
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument(
            "--experiment", type=str, default="default",
            help="Experiment name: checkpoints in <experiments_root>/<experiment>/checkpoints, "
            "TensorBoard logs and reports in <experiments_root>/<experiment>/logs.",
        )
        parser.add_argument("--experiments_root", type=str, default="experiments", help="Folder of all experiments.")
        parser.add_argument(
            "--input", type=Optional[str], default=None,
            help="predict only: an image file, or a folder of images (subfolders walked and mirrored in the output).",
        )
        parser.add_argument(
            "--output_dir", type=Optional[str], default=None,
            help="predict only: output folder, one sub-folder (or file) per format "
            "(default <experiments_root>/<experiment>/predictions).",
        )
        parser.add_argument(
            "--formats", type=list[Literal[OUTPUT_FORMATS]], default=["npy", "overlay"],
            help="predict only: output formats, one or more of npy (log density, float32, nats), hdf5 (one file in "
            "pysaliency's export_model_to_hdf5 layout), saliency (8-bit maps named like the images), overlay "
            "(heat-map PNGs); e.g. --formats [npy,hdf5].",
        )
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="predict only: predict again images whose outputs exist (default: keep them).")
        parser.add_argument(
            "--keep_extension", type=bool, default=False,
            help="predict only: saliency maps keep each input's file name and format (benchmark submissions) "
            "instead of <stem>.png.",
        )
        parser.link_arguments("model.downsample", "data.min_image_side", compute_fn=minimum_side_for_downsample)

    def _parse_ckpt_path(self) -> None:
        """LightningCLI reads the hyper-parameters of a `--ckpt_path` file while parsing: the file is checked to
        be a training checkpoint first, so that a wrong file is one clear error."""
        config = self.config.get(self.config.get("subcommand") or "", None)
        ckpt_path = config.get("ckpt_path") if config is not None else None
        if ckpt_path and Path(ckpt_path).is_file():
            read_training_checkpoint(ckpt_path, mmap=True)  # WeightsFileError saying what the file is instead
        super()._parse_ckpt_path()

    @property
    def experiment(self) -> ExperimentDir:
        config = self.config[self.subcommand]
        return ExperimentDir(config.experiments_root, config.experiment)

    def resolve_fit_checkpoint(self) -> None:
        """`--ckpt_path last` -> the experiment's newest checkpoint (None: start); no `--ckpt_path` -> a new run,
        the earlier run's checkpoints moved to `checkpoints.<n>/`. Rank 0 alone moves and cleans files (other ranks
        start before any file is written)."""
        config = self.config[self.subcommand]
        requested = config.get("ckpt_path")
        if requested == BEST:
            self.resolve_fit_from_best()
            return
        checkpoints = self.experiment.checkpoints
        config.ckpt_path = checkpoints.resume_point(requested)
        if rank_zero_only.rank != 0:
            return
        checkpoints.remove_partial()
        resumed = config.ckpt_path if requested == LAST else None
        if resumed is not None and checkpoints.refresh_last(Path(resumed)):
            print(f"deepgaze: {config.ckpt_path} is newer than last.ckpt (a killed run wrote it after last.ckpt); "
                  "last.ckpt is now a copy of it", file=sys.stderr)
        kept = checkpoints.start_new_run() if requested is None else None
        if kept is not None:
            print(f"deepgaze: experiment '{config.experiment}' already had checkpoints: they are kept in {kept}; "
                  "this is a new run (to continue a run instead, use --ckpt_path last)", file=sys.stderr)

    def resolve_fit_from_best(self) -> None:
        """`fit --ckpt_path best`: continue from best.ckpt; rank 0 moves the checkpoints written after it (the
        continuation this restart abandons) to `checkpoints.<n>/`, so that a later `--ckpt_path last` resumes this
        run, not that one."""
        config = self.config[self.subcommand]
        experiment = self.experiment
        best = experiment.existing_checkpoint(BEST)
        step = int(read_training_checkpoint(best, mmap=True)["global_step"])
        config.ckpt_path = str(best)
        if rank_zero_only.rank != 0:
            return
        experiment.checkpoints.remove_partial()
        kept = experiment.checkpoints.set_aside_after(step)
        if kept is not None:
            print(f"deepgaze: continuing experiment '{config.experiment}' from {best}: the checkpoints written after "
                  f"it are kept in {kept}", file=sys.stderr)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        fixes = gpu_settings_without_gpu(config.trainer)
        if fixes:
            raise UsageError("no GPU found: run with " + " ".join(fixes))
        if self.subcommand == "predict":
            check_prediction_folders(config.input, Path(config.output_dir or self.experiment.predictions))
        else:
            require_writable_folder(self.experiment.path, "--experiments_root/--experiment")
        if self.subcommand == "fit":
            self.resolve_fit_checkpoint()
        ckpt_path = config.get("ckpt_path")
        if not ckpt_path:
            return
        if ckpt_path in NAMED_CHECKPOINTS:  # fit has resolved its named checkpoints already
            config.ckpt_path = ckpt_path = str(self.experiment.existing_checkpoint(ckpt_path))
        if not Path(ckpt_path).is_file():
            raise UsageError(f"checkpoint {ckpt_path} does not exist")
        # The checkpoint supplies the trained weights: rebuilding the model must not need the starting weights
        # (init_from), nor, outside a resumed fit, the backbone's weights file when the checkpoint holds the backbone.
        config.model.init_from = None
        with_backbone, record = saved_backbone(ckpt_path)
        if with_backbone and self.subcommand != "fit":
            config.model.backbone_weights = "none"
        elif not with_backbone and record is not None:
            require_backbone_weights(config.model.backbone_weights, ckpt_path)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer_config = self._get(self.config_init, "trainer")
        experiment = self.experiment
        callbacks = list(trainer_config.get("callbacks") or [])
        logger = trainer_config.get("logger")
        if self.subcommand == "predict" and logger is None:
            logger = False
        elif logger in (None, True):
            logger = experiment.loggers()
        if self.subcommand == "fit":
            last = str(experiment.checkpoints.last)
            callbacks += [PreemptionCheckpoint(last, self.stop_signals), FiniteLossGuard(last)]
            if trainer_config.get("enable_checkpointing") is not False:
                callbacks += experiment.checkpoints.callbacks()
        if logger is not False:
            if self.subcommand == "fit":
                callbacks.append(LearningRateMonitor(logging_interval="epoch"))
            if self.subcommand in ("fit", "validate"):
                callbacks.append(ValidationPanel())
        plugins = list(trainer_config.get("plugins") or [])
        if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
            plugins.append(AtomicCheckpointIO())
        kwargs.update(callbacks=callbacks, logger=logger, plugins=plugins)
        if trainer_config.get("default_root_dir") is None:
            kwargs["default_root_dir"] = str(experiment.path)
        return super().instantiate_trainer(**kwargs)

    def predict(self, model: DeepGazeModule, datamodule: SaliencyDataModule, ckpt_path: Optional[str] = None,
                **trainer_predict_arguments: Any) -> None:
        """`deepgaze predict`: the network of `ckpt_path` (rebuilt from the checkpoint's own model settings), or
        `model` with `model.init_from`'s weights, predicts `--input` into `--formats` below `--output_dir`
        (`deepgaze_lit.predict.run_prediction`) on the Trainer's one device. Lightning's other predict arguments
        (dataloaders, return_predictions) do not apply."""
        config = self.config[self.subcommand]
        if ckpt_path is None and config.model.init_from is None:
            raise UsageError("predict needs weights: --ckpt_path (a training checkpoint, or best / last of the "
                             "experiment) or --model.init_from (released weights such as deepgaze3.pth)")
        if self.trainer.num_devices != 1:
            raise UsageError("predict runs on one device: use --trainer.devices 1")
        network, trained_settings = model.model, None
        if ckpt_path is not None:
            network, trained_settings = load_training_checkpoint(ckpt_path)
        output_dir = config.output_dir or self.experiment.predictions
        run_prediction(network, datamodule, config.input, output_dir, list(config.formats), config.overwrite,
                       self.trainer.strategy.root_device, trained_settings, config.keep_extension)

    def after_fit(self) -> None:
        if self.trainer.is_global_zero:
            print(ig_summary(self.trainer.callback_metrics), flush=True)


def ig_summary(metrics: dict) -> str:
    """The line `deepgaze fit` ends with: the last validation IG over the centre bias, with the gold standard's."""
    if "val/ig" not in metrics:
        return "validation IG over centre bias: not computed (no validation ran)"
    line = f"validation IG over centre bias: {float(metrics['val/ig']):.4f} bit/fix"
    if "val/gold_ig" in metrics:
        share, gold = 100.0 * float(metrics["val/ig_explained"]), float(metrics["val/gold_ig"])
        line += f" ({share:.1f}% of the gold standard {gold:.4f} bit/fix)"
    return line


def without_debug_flag(args: ArgsType) -> tuple[ArgsType, bool]:
    """The arguments without `--debug`, and whether a traceback was asked for (`--debug` or DEEPGAZE_DEBUG=1)."""
    arguments = sys.argv[1:] if args is None else args
    debug = os.environ.get(DEBUG_ENVIRONMENT, "") not in ("", "0")
    if isinstance(arguments, (list, tuple)) and DEBUG_FLAG in arguments:
        return [argument for argument in arguments if argument != DEBUG_FLAG], True
    return arguments, debug


def failure_report(error: BaseException, signals: StopSignals) -> tuple[int, Optional[str]]:
    """The exit status of a run that ended with `error`, and its one-line message (None: already printed)."""
    signum = signals.terminating_signal()
    if isinstance(error, Stopped):
        signum = error.signum
    if signum is not None:
        return SIGNAL_EXIT_BASE + signum, (f"stopped by {signal_name(signum)}; the checkpoints written so far are "
                                           "kept (a fit resumes with --ckpt_path last)")
    if isinstance(error, SystemExit):
        return error.code, None
    if isinstance(error, USER_ERRORS):
        return EXIT_USAGE, error_message(error)
    if isinstance(error, RUN_ERRORS):
        return EXIT_FAILED, error_message(error)
    if isinstance(error, OSError):
        return EXIT_FAILED, describe_os_error(error)
    return EXIT_FAILED, (f"unexpected {type(error).__name__}: {error_message(error)}. This is a bug in deepgaze: rerun "
                         f"with {DEBUG_FLAG} (or {DEBUG_ENVIRONMENT}=1) for the traceback and report it")


def run_trainer_cli(args: ArgsType, signals: StopSignals) -> None:
    """One `deepgaze fit|validate|test|predict ...` run in this process, without `main`'s error printing; `signals`
    are the process's signal records (a preemption signal at any moment reaches the preemption callback)."""
    DeepGazeCLI(DeepGazeModule, SaliencyDataModule, trainer_defaults={"use_distributed_sampler": False},
                save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False, args=args,
                stop_signals=signals)


def main(args: ArgsType = None) -> None:
    """Entry point of the `deepgaze` console script; `args` replaces sys.argv[1:] (used by tests).

    Signals are recorded from the first moment (`StopSignals`); every failure ends with one line on stderr and the
    exit status of `deepgaze_lit.failures`; `--debug` (or DEEPGAZE_DEBUG=1) prints the traceback before it.
    """
    args, debug = without_debug_flag(args)
    signals = StopSignals().install()
    command = list(args) if isinstance(args, (list, tuple)) else []
    try:
        if command[:1] == ["export"]:  # not a Trainer subcommand: its own parser
            run_export(command[1:])
        elif command[:1] == ["protocol"]:
            from deepgaze_lit.protocol import run_protocol  # the protocol module builds on this one
            run_protocol(command[1:], signals)
        else:
            run_trainer_cli(args, signals)
    except BaseException as error:  # noqa: BLE001 - every way out gets its status and one line
        status, message = failure_report(error, signals)
        if debug and not isinstance(error, SystemExit):
            traceback.print_exception(error)
        if message is not None:
            print(f"deepgaze: error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(status) from None
    finally:
        signals.restore()
    signum = signals.terminating_signal()
    if signum is not None:
        print(f"deepgaze: error: stopped by {signal_name(signum)}", file=sys.stderr, flush=True)
        raise SystemExit(SIGNAL_EXIT_BASE + signum)


if __name__ == "__main__":
    main()
