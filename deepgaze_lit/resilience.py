"""What keeps `deepgaze fit` correct when a job is preempted, killed or diverges.

- `PreemptionCheckpoint`: SIGUSR1 (SLURM's warning before a time limit, `#SBATCH --signal=SIGUSR1@90`) only sets a
  flag; after the current training step, at the same step on every rank, the full training state goes to
  `last.ckpt` (written atomically by the CLI's checkpoint I/O), rank 0 asks SLURM to requeue the job and the run
  stops. It replaces Lightning's own SLURM handler, which saves `hpc_ckpt_<n>.ckpt` from inside the signal handler
  (possibly in the middle of an optimizer step or a collective), never deletes it and prefers it on relaunch even
  over a newer checkpoint.
- `FiniteLossGuard`: a NaN or infinite loss on any rank stops training before that step's update, naming the step;
  no checkpoint is written after it, so `last.ckpt` keeps the last good weights.
- `ignore_requeue_signal`: the loaders' `worker_init_fn`. SLURM signals every process of the job, loader workers
  included; a worker started with the default SIGUSR1 action (spawn or forkserver start methods) would die of it
  and take the training down before the checkpoint is written.

Which checkpoint a relaunched job resumes, how an earlier run is set aside and which files are partial writes are
rules of the experiment folder: `deepgaze_lit.experiment`.
"""

import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback

from deepgaze_lit.experiment import checkpoint_global_step

REQUEUE_SIGNAL = signal.SIGUSR1


class NonFiniteLossError(RuntimeError):
    """A training loss that is NaN or infinite."""


class Preempted(SystemExit):
    """Training stopped after saving its state on a requeue signal (exit status 0)."""


def slurm_job_id() -> Optional[str]:
    """The id `scontrol requeue` takes for this job (`<array job>_<task>` for array jobs); None outside SLURM."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job is not None and "SLURM_ARRAY_TASK_ID" in os.environ:
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def requeue_slurm_job() -> str:
    """Ask SLURM to requeue this job; a sentence saying what happened."""
    job_id = slurm_job_id()
    if job_id is None:
        return "not a SLURM job, nothing requeued: resume with --ckpt_path last"
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"`scontrol requeue {job_id}` failed ({error}): resubmit the job (it resumes with --ckpt_path last)"
    if result.returncode != 0:
        return (f"`scontrol requeue {job_id}` failed with status {result.returncode} ({result.stderr.strip()}): "
                "resubmit the job (it resumes with --ckpt_path last)")
    return f"SLURM job {job_id} requeued"


def ignore_requeue_signal(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: the worker ignores SIGUSR1 (the training process handles it)."""
    signal.signal(REQUEUE_SIGNAL, signal.SIG_IGN)


class PreemptionCheckpoint(Callback):
    """On SIGUSR1: save the training state to `checkpoint_path` after the current step, requeue, stop.

    The signal handler only records the signal. After every optimizer step (with gradient accumulation: after the
    last batch of each accumulation window, whose gradients a checkpoint would not hold) all ranks agree (one
    all-reduce of a flag) whether any of them received it; if so, all ranks save together, rank 0 runs
    `scontrol requeue` (under SLURM) and every rank exits with `Preempted` (status 0). The checkpoint is a normal
    mid-epoch checkpoint: the training loader's position is part of it, so the relaunched job continues with the
    next batch.

    The handler is installed in `setup`, before Lightning installs its own SLURM handlers (which then leaves
    SIGUSR1 alone), and the previous handler is restored in `teardown`.

    Args:
        checkpoint_path: where the state goes; the experiment's `last.ckpt`, which `--ckpt_path last` resumes.
    """

    def __init__(self, checkpoint_path: str) -> None:
        self.checkpoint_path = Path(checkpoint_path)
        self.received = False
        self._previous_handler: Any = None

    def _record_signal(self, signum: int, frame: Any) -> None:
        self.received = True

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(REQUEUE_SIGNAL, self._record_signal)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._previous_handler is not None:
            signal.signal(REQUEUE_SIGNAL, self._previous_handler)
            self._previous_handler = None

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        batches_done = batch_idx + 1
        step_done = batches_done % trainer.accumulate_grad_batches == 0 or batches_done == trainer.num_training_batches
        if not step_done or not trainer.strategy.reduce_boolean_decision(self.received, all=False):
            return
        trainer.save_checkpoint(self.checkpoint_path)
        if trainer.is_global_zero:
            outcome = requeue_slurm_job()
            print(f"deepgaze: {signal.Signals(REQUEUE_SIGNAL).name} received: training state at global step "
                  f"{trainer.global_step} saved to {self.checkpoint_path}; {outcome}", flush=True)
        raise Preempted(0)


class FiniteLossGuard(Callback):
    """Stops training with NonFiniteLossError at the first step whose loss is NaN or infinite on any rank.

    Checked before the backward pass (one all-reduce of a flag per step under DDP), so the step's update never
    happens, every rank stops at the same step, and no checkpoint with the diverged state is written.

    Args:
        checkpoint_path: the checkpoint that keeps the last good state, named in the error message.
    """

    def __init__(self, checkpoint_path: str) -> None:
        self.checkpoint_path = Path(checkpoint_path)

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        local_finite = bool(torch.isfinite(loss.detach()).all())
        if trainer.strategy.reduce_boolean_decision(local_finite, all=True):
            return
        where = f"is {float(loss.detach().float().sum())}" if not local_finite else "is not finite on another rank"
        saved = (f"{self.checkpoint_path} (global step {checkpoint_global_step(self.checkpoint_path)})"
                 if self.checkpoint_path.is_file() else "no checkpoint (none was written before this step)")
        raise NonFiniteLossError(
            f"the training loss {where} at global step {trainer.global_step} (epoch {trainer.current_epoch}, batch "
            f"{trainer.fit_loop.epoch_loop.batch_idx}): training stopped before this step's update. The last good state is {saved}; "
            "lower the learning rate or check the data, then resume with --ckpt_path last"
        )
