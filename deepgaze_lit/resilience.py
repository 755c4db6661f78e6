"""What keeps `deepgaze fit` correct when a job is preempted, stopped, killed or diverges.

- `StopSignals`: installed by `deepgaze` before anything else, so a signal is never lost during start-up. SIGUSR1
  (SLURM's warning before a time limit, `#SBATCH --signal=SIGUSR1@90`) is only recorded: it never kills the
  process. SIGTERM (`scancel`, most schedulers) is recorded while training runs and stops the process at once
  (`Stopped`) before training has started or outside `fit`. SIGINT (Ctrl-C) is recorded and interrupts as usual.
  A run stopped by signal n exits with status 128 + n.
- `PreemptionCheckpoint`: after the current training step, at the same step on every rank, when any rank has
  recorded SIGUSR1 or SIGTERM, the full training state goes to `last.ckpt` (written atomically by the CLI's
  checkpoint I/O); on SIGUSR1 rank 0 also asks SLURM to requeue the job. The run then stops with `Stopped`:
  status 138 (128 + SIGUSR1) or 143 (128 + SIGTERM). `scontrol requeue` puts the job back in the queue whatever
  status the process ends with (only a site's `RequeueExit` setting, empty by default, reads exit codes), so the
  status can tell the truth: the run did not finish. It replaces Lightning's own SLURM and SIGTERM handlers: the
  SLURM one saves `hpc_ckpt_<n>.ckpt` from inside the signal handler (possibly in the middle of an optimizer step
  or a collective), never deletes it and prefers it on relaunch even over a newer checkpoint; the SIGTERM one
  stops without saving and with status 0.
- `FiniteLossGuard`: a NaN or infinite loss on any rank stops training before that step's update, naming the step;
  no checkpoint is written after it, so `last.ckpt` keeps the last good weights.
- `ignore_stop_signals`: the loaders' `worker_init_fn`. SLURM signals every process of the job, loader workers
  included; a worker with the default SIGUSR1 or SIGTERM action would die of it and take the training down before
  the checkpoint is written.

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
TERMINATE_SIGNAL = signal.SIGTERM
INTERRUPT_SIGNAL = signal.SIGINT
STOP_SIGNALS = (REQUEUE_SIGNAL, TERMINATE_SIGNAL)
"""Signals after which training saves its state at the next step boundary and stops."""
SIGNAL_EXIT_BASE = 128
"""A run stopped by signal n exits with status SIGNAL_EXIT_BASE + n (the shell's convention)."""


class NonFiniteLossError(RuntimeError):
    """A training loss that is NaN or infinite."""


class Stopped(SystemExit):
    """The run stopped because of signal `signum` (after saving what it could); exit status 128 + signum."""

    def __init__(self, signum: int) -> None:
        super().__init__(SIGNAL_EXIT_BASE + int(signum))
        self.signum = int(signum)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class StopSignals:
    """The process's handlers of SIGUSR1, SIGTERM and SIGINT, recording every arrival in `received`.

    SIGUSR1 is only recorded. SIGTERM is only recorded while `training` is set (`PreemptionCheckpoint` sets it
    for the training loop, and saves and stops at the next step boundary); otherwise it raises `Stopped` at once.
    SIGINT is recorded and raises KeyboardInterrupt, as Python's default handler does. Handlers can only be set
    from the main thread; elsewhere `install` does nothing.
    """

    def __init__(self) -> None:
        self.received: list[int] = []
        self.training = False
        self._previous: dict[int, Any] = {}

    def install(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in (*STOP_SIGNALS, INTERRUPT_SIGNAL):
                self._previous[signum] = signal.signal(signum, self._record)
        return self

    def reinstall_termination_handler(self) -> None:
        """Take SIGTERM back from Lightning, whose trainer sets its own handler when a stage starts."""
        if self._previous:
            signal.signal(TERMINATE_SIGNAL, self._record)

    def restore(self) -> None:
        """Put back the handlers `install` replaced."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _record(self, signum: int, frame: Any) -> None:
        self.received.append(signum)
        if signum == INTERRUPT_SIGNAL:
            raise KeyboardInterrupt
        if signum == TERMINATE_SIGNAL and not self.training:
            raise Stopped(signum)

    @property
    def stop_requested(self) -> bool:
        """Whether SIGUSR1 or SIGTERM has arrived: training should save and stop."""
        return any(signum in STOP_SIGNALS for signum in self.received)

    @property
    def requeue_requested(self) -> bool:
        """Whether SIGUSR1 (SLURM's preemption warning) has arrived: the job should be requeued."""
        return REQUEUE_SIGNAL in self.received

    def terminating_signal(self) -> Optional[int]:
        """The first SIGTERM or SIGINT received (the process must end with 128 + it), or None."""
        return next((signum for signum in self.received if signum in (TERMINATE_SIGNAL, INTERRUPT_SIGNAL)), None)


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


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: the worker ignores SIGUSR1 and SIGTERM (the training process handles them)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


class PreemptionCheckpoint(Callback):
    """On SIGUSR1 or SIGTERM: save the training state to `checkpoint_path` after the current step, then stop.

    The signal handlers (`StopSignals`) only record the signal. After every optimizer step (with gradient
    accumulation: after the last batch of each accumulation window, whose gradients a checkpoint would not hold)
    all ranks agree (one all-reduce of a flag) whether any of them received one; if so, all ranks save together,
    on SIGUSR1 rank 0 runs `scontrol requeue` (under SLURM), and every rank stops with `Stopped` (status 138 for
    SIGUSR1, 143 for SIGTERM). The checkpoint is a normal mid-epoch checkpoint: the training loader's position is
    part of it, so the relaunched job continues with the next batch.

    Args:
        checkpoint_path: where the state goes; the experiment's `last.ckpt`, which `--ckpt_path last` resumes.
        signals: the process's `StopSignals`, installed by `deepgaze` at start-up so that a signal that arrives
            before training is not lost; None: the callback installs its own in `setup` and restores the previous
            handlers in `teardown`.
    """

    def __init__(self, checkpoint_path: str, signals: Optional[StopSignals] = None) -> None:
        self.checkpoint_path = Path(checkpoint_path)
        self.signals = signals if signals is not None else StopSignals()
        self._owns_signals = signals is None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and self._owns_signals:
            self.signals.install()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.signals.training = True
        self.signals.reinstall_termination_handler()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.signals.training = False

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.signals.training = False
        if self._owns_signals:
            self.signals.restore()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        batches_done = batch_idx + 1
        step_done = batches_done % trainer.accumulate_grad_batches == 0 or batches_done == trainer.num_training_batches
        decide = trainer.strategy.reduce_boolean_decision
        if not step_done or not decide(self.signals.stop_requested, all=False):
            return
        requeue = decide(self.signals.requeue_requested, all=False)
        signum = REQUEUE_SIGNAL if requeue else TERMINATE_SIGNAL
        trainer.save_checkpoint(self.checkpoint_path)
        if trainer.is_global_zero:
            outcome = requeue_slurm_job() if requeue else "resume with --ckpt_path last"
            print(f"deepgaze: {signal_name(signum)} received: training state at global step {trainer.global_step} "
                  f"saved to {self.checkpoint_path}; {outcome}", flush=True)
        raise Stopped(signum)


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
