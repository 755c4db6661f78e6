"""`deepgaze`: the command line (LightningCLI) over `DeepGazeModule` and `SaliencyDataModule`.

    deepgaze fit --config configs/quickstart.yaml
    deepgaze fit --config configs/baseline.yaml --ckpt_path last          # resume (or start when nothing to resume)
    deepgaze validate --config configs/baseline.yaml --ckpt_path best     # evaluate best.ckpt, write a report
    deepgaze predict --config configs/baseline.yaml --ckpt_path best --data.predict_dir images/

Every run of an experiment shares one folder `<experiments_root>/<experiment>/` (see `deepgaze_lit.experiment`);
the checkpoint callbacks, TensorBoard logger, learning-rate monitor, validation image panel and prediction writer
are added here, in code, so that configs stay short and checkpoint folders cannot diverge. `fit` also gets the
preemption and non-finite-loss callbacks of `deepgaze_lit.resilience`; `--ckpt_path last` resumes the experiment's
newest checkpoint, and `fit` without `--ckpt_path` into an experiment with checkpoints starts a new run, keeping
the earlier run's checkpoints in `checkpoints.<n>/`.
"""

import sys
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import ArgsType, LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

from deepgaze_lit.callbacks import AtomicCheckpointIO, ValidationPanel
from deepgaze_lit.data.datamodule import SaliencyDataModule
from deepgaze_lit.data.errors import DataError
from deepgaze_lit.experiment import (BEST, NAMED_CHECKPOINTS, ExperimentDir, ExperimentError,
                                     checkpoint_global_step, require_training_checkpoint)
from deepgaze_lit.model.checkpoint import CheckpointMismatchError
from deepgaze_lit.model.errors import ModelConfigError
from deepgaze_lit.module import DeepGazeModule
from deepgaze_lit.predict import PredictionWriter
from deepgaze_lit.resilience import FiniteLossGuard, NonFiniteLossError, PreemptionCheckpoint

GPU_ACCELERATORS = ("gpu", "cuda")
HALF_PRECISIONS = ("16", "bf16", "16-mixed", "bf16-mixed", "16-true", "bf16-true")


class UsageError(Exception):
    """A mistake in the command or its configuration; `main` prints it as one line and exits with status 2."""


USER_ERRORS = (UsageError, ExperimentError, DataError, FileNotFoundError, CheckpointMismatchError,
               ModelConfigError)
"""Errors whose message tells the user what to fix: printed as one line, without a traceback."""


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


class DeepGazeCLI(LightningCLI):
    """LightningCLI with one folder per experiment and the application's callbacks added in code."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument(
            "--experiment", type=str, default="default",
            help="Experiment name: checkpoints in <experiments_root>/<experiment>/checkpoints, "
            "TensorBoard logs and reports in <experiments_root>/<experiment>/logs.",
        )
        parser.add_argument("--experiments_root", type=str, default="experiments", help="Folder of all experiments.")
        parser.add_argument(
            "--output_dir", type=Optional[str], default=None,
            help="predict only: folder for the .npy log densities and .png overlays "
            "(default <experiments_root>/<experiment>/predictions).",
        )

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
        step = checkpoint_global_step(best)
        if step is None:
            raise ExperimentError(f"{best} is not a readable training checkpoint")
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
        if self.subcommand == "fit":
            self.resolve_fit_checkpoint()
        ckpt_path = config.get("ckpt_path")
        if not ckpt_path:
            return
        if ckpt_path in NAMED_CHECKPOINTS:  # fit has resolved its named checkpoints already
            config.ckpt_path = ckpt_path = str(self.experiment.existing_checkpoint(ckpt_path))
        if not Path(ckpt_path).is_file():
            raise UsageError(f"checkpoint {ckpt_path} does not exist")
        require_training_checkpoint(Path(ckpt_path))
        # The checkpoint supplies every weight, the frozen backbone's included: rebuilding the model must not need
        # the starting weights (init_from), nor, outside a resumed fit, the ImageNet file.
        config.model.init_from = None
        if self.subcommand != "fit":
            config.model.backbone_weights = "none"

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer_config = self._get(self.config_init, "trainer")
        experiment = self.experiment
        callbacks = list(trainer_config.get("callbacks") or [])
        logger = trainer_config.get("logger")
        if self.subcommand == "predict" and logger is None:
            logger = False
        elif logger in (None, True):
            logger = experiment.tensorboard_logger()
        if self.subcommand == "fit":
            last = str(experiment.checkpoints.last)
            callbacks += [PreemptionCheckpoint(last), FiniteLossGuard(last)]
            if trainer_config.get("enable_checkpointing") is not False:
                callbacks += experiment.checkpoints.callbacks()
        if logger is not False:
            if self.subcommand == "fit":
                callbacks.append(LearningRateMonitor(logging_interval="epoch"))
            if self.subcommand in ("fit", "validate"):
                callbacks.append(ValidationPanel())
        if self.subcommand == "predict":
            output_dir = self.config[self.subcommand].output_dir or experiment.predictions
            callbacks.append(PredictionWriter(str(output_dir)))
        plugins = list(trainer_config.get("plugins") or [])
        if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
            plugins.append(AtomicCheckpointIO())
        kwargs.update(callbacks=callbacks, logger=logger, plugins=plugins)
        if trainer_config.get("default_root_dir") is None:
            kwargs["default_root_dir"] = str(experiment.path)
        return super().instantiate_trainer(**kwargs)

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


def main(args: ArgsType = None) -> None:
    """Entry point of the `deepgaze` console script; `args` replaces sys.argv[1:] (used by tests)."""
    try:
        command = list(sys.argv[1:] if args is None else args)
        if command[:1] == ["protocol"]:
            from deepgaze_lit.protocol import run_protocol  # the protocol module builds on this one
            return run_protocol(command[1:])
        DeepGazeCLI(
            DeepGazeModule,
            SaliencyDataModule,
            trainer_defaults={"use_distributed_sampler": False},
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            args=args,
        )
    except USER_ERRORS as error:
        print(f"deepgaze: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except NonFiniteLossError as error:
        print(f"deepgaze: error: {error}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
