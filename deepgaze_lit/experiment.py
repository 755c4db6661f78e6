"""The experiment folder: its layout and every rule about the checkpoints in it.

Every run of an experiment shares one folder `<experiments_root>/<experiment>/`:

    checkpoints/        best.ckpt      lowest validation loss
                        epochNNN.ckpt  every 5 epochs, all kept (NNN: the zero-based epoch index)
                        last.ckpt      refreshed after every epoch and on preemption; what `--ckpt_path last` resumes
                        <name>.ckpt.tmp  a checkpoint being written (left behind only by a killed process)
    checkpoints.<n>/    checkpoints of an earlier run, set aside (n = 1, 2, ...: higher numbers are more recent)
    logs/version_N/     TensorBoard event files, the run's config and evaluation reports
    logs/version_N/csv/ metrics.csv, the same logged history as CSV
    predictions/        `deepgaze predict` output (unless --output_dir says otherwise)

`ExperimentDir` names the parts; `CheckpointFolder` holds the rules: which checkpoint is the newest, how an earlier
run is set aside, which files are partial writes, and the checkpoint callbacks that write the names above.
"""

import os
import shutil
import warnings
from pathlib import Path
from typing import Optional

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from deepgaze_lit.model.checkpoint import read_training_checkpoint
from deepgaze_lit.model.errors import WeightsFileError

CHECKPOINT_SUFFIX = ".ckpt"
PARTIAL_SUFFIX = ".tmp"
BEST = "best"
LAST = "last"
NAMED_CHECKPOINTS = (BEST, LAST)
PERIODIC_CHECKPOINT_EPOCHS = 5
PERIODIC_FILENAME = "epoch{epoch:03d}"
"""ModelCheckpoint file name template of the periodic checkpoints (suffix added by Lightning)."""
CHECKPOINTS_FOLDER = "checkpoints"
LOGS_FOLDER = "logs"
CSV_LOG_FOLDER = "csv"
"""Sub-folder of a run's log folder for the CSV history (Lightning's CSVLogger warns when its folder holds other
files, and deletes a metrics.csv it finds)."""
PREDICTIONS_FOLDER = "predictions"


class ExperimentError(Exception):
    """A named checkpoint of the experiment that is missing; the message says which file and what to use instead
    (an unreadable file or one of another kind raises `WeightsFileError`)."""


def checkpoint_global_step(path: Path) -> Optional[int]:
    """The global step (optimizer steps done) stored in a Lightning checkpoint; None, with a warning, when the
    file cannot be read as one."""
    try:
        return int(read_training_checkpoint(path, mmap=True)["global_step"])
    except WeightsFileError as error:
        warnings.warn(f"{path} is not a readable training checkpoint ({error}); ignored", stacklevel=2)
        return None


def partial_path(target: Path) -> Path:
    """Where a checkpoint bound for `target` is written before it is renamed over `target`."""
    target = Path(target)
    return target.with_name(target.name + PARTIAL_SUFFIX)


class CheckpointFolder:
    """The checkpoint folder of one run (`<experiment>/checkpoints`) and the rules about its files."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def named(self, name: str) -> Path:
        """`<folder>/<name>.ckpt` (e.g. "best", "last"), whether or not it exists."""
        return self.path / f"{name}{CHECKPOINT_SUFFIX}"

    @property
    def last(self) -> Path:
        return self.named(LAST)

    def checkpoints(self) -> list[Path]:
        """The complete checkpoint files (partial writes excluded), sorted by name."""
        return sorted(self.path.glob(f"*{CHECKPOINT_SUFFIX}"))

    def newest(self) -> Optional[Path]:
        """The readable checkpoint with the highest global step (`last.ckpt` first on ties, then the most recently
        written); None when there is none."""
        ranked = []
        for path in self.checkpoints():
            step = checkpoint_global_step(path)
            if step is not None:
                ranked.append((step, path.name == self.last.name, path.stat().st_mtime, path))
        return max(ranked)[-1] if ranked else None

    def resume_point(self, ckpt_path: Optional[str]) -> Optional[str]:
        """The checkpoint `deepgaze fit` restores, given its `--ckpt_path`: for "last" the newest checkpoint
        (`newest`), so a relaunched job never rolls back past a newer checkpoint, or None (a fresh start) when there
        is none yet; any other value unchanged (None: a new run, see `start_new_run`)."""
        if ckpt_path != LAST:
            return ckpt_path
        newest = self.newest()
        if newest is None:
            rank_zero_info(f"--ckpt_path last: no checkpoint in {self.path} yet, starting a new run")
            return None
        rank_zero_info(f"--ckpt_path last: resuming from {newest} (global step {checkpoint_global_step(newest)}, "
                       "the newest checkpoint of the experiment)")
        return str(newest)

    def refresh_last(self, newest: Path) -> bool:
        """Make `last.ckpt` a copy of `newest` when that is another file (a run killed after writing best or a
        periodic checkpoint of an epoch but before last.ckpt of it): resuming from `newest` at the end of training
        writes no checkpoint, and last.ckpt must not stay behind. Copied through `last.ckpt.tmp`, so a kill leaves
        the old last.ckpt. Whether it copied. Call it on one process only."""
        if Path(newest) == self.last:
            return False
        partial = partial_path(self.last)
        shutil.copyfile(newest, partial)
        os.replace(partial, self.last)
        return True

    def start_new_run(self) -> Optional[Path]:
        """Make way for a new run: when the folder holds checkpoints of an earlier run, rename it to
        `<folder>.<n>` (the first free n = 1, 2, ...) and return that path; None when there was nothing to keep.
        Call it on one process only."""
        if not self.checkpoints():
            return None
        archive = self._free_archive()
        self.path.rename(archive)
        return archive

    def set_aside_after(self, global_step: int) -> Optional[Path]:
        """Make way for a run that restarts from an earlier checkpoint (`fit --ckpt_path best`): move the readable
        checkpoints with a global step above `global_step` (the abandoned continuation, which `--ckpt_path last`
        would otherwise resume) into `<folder>.<n>` and return that folder; None when there are none. Call it on
        one process only."""
        later = [path for path in self.checkpoints() if (checkpoint_global_step(path) or 0) > global_step]
        if not later:
            return None
        archive = self._free_archive()
        archive.mkdir()
        for path in later:
            path.rename(archive / path.name)
        return archive

    def _free_archive(self) -> Path:
        """`<folder>.<n>` with the first n = 1, 2, ... that does not exist (higher numbers: more recent)."""
        number = 1
        while self.path.with_name(f"{self.path.name}.{number}").exists():
            number += 1
        return self.path.with_name(f"{self.path.name}.{number}")

    def remove_partial(self) -> list[Path]:
        """Delete the partial writes (`*.ckpt.tmp`) a killed process left behind; the removed paths."""
        removed = []
        for path in self.path.glob(f"*{CHECKPOINT_SUFFIX}{PARTIAL_SUFFIX}"):
            path.unlink(missing_ok=True)
            removed.append(path)
        return removed

    def callbacks(self, monitor: str = "val/loss") -> list[ModelCheckpoint]:
        """The three checkpoint callbacks writing into the folder: best by `monitor` (lower is better), every 5
        epochs (all kept) and last (every epoch). File names are fixed (no `-v1` versions): a resumed or moved
        experiment overwrites its own files. `last` comes last so that it stores the other two callbacks' state
        after their own update of the same epoch."""
        common = {"dirpath": self.path, "auto_insert_metric_name": False, "enable_version_counter": False}
        best = ModelCheckpoint(filename=BEST, monitor=monitor, mode="min", save_top_k=1, **common)
        periodic = ModelCheckpoint(
            filename=PERIODIC_FILENAME, every_n_epochs=PERIODIC_CHECKPOINT_EPOCHS, save_top_k=-1, **common
        )
        last = ModelCheckpoint(filename=LAST, monitor=None, save_top_k=1, **common)
        return [best, periodic, last]


class ExperimentDir:
    """The folder `<root>/<name>/` of one experiment (layout in the module docstring)."""

    def __init__(self, root: str | Path, name: str) -> None:
        self.name = name
        self.path = Path(root) / name
        self.checkpoints = CheckpointFolder(self.path / CHECKPOINTS_FOLDER)

    def loggers(self) -> list[Logger]:
        """The run's loggers: TensorBoard writing `logs/version_N/` (a new version per run) and the same history
        as CSV in `logs/version_N/csv/metrics.csv`."""
        tensorboard = TensorBoardLogger(save_dir=str(self.path), name=LOGS_FOLDER)
        return [tensorboard, CSVLogger(tensorboard.log_dir, name="", version=CSV_LOG_FOLDER)]

    @property
    def predictions(self) -> Path:
        return self.path / PREDICTIONS_FOLDER

    def existing_checkpoint(self, name: str) -> Path:
        """The experiment's `<name>.ckpt` ("best" or "last"); ExperimentError when it is missing."""
        path = self.checkpoints.named(name)
        if not path.is_file():
            raise ExperimentError(f"no {name} checkpoint of experiment '{self.name}': {path} is missing")
        return path
