"""Callbacks the protocol tests put into stage configs: record a stage's starting weights, die mid-stage once."""

import os
import signal
from pathlib import Path

import lightning as L
import torch

START_WEIGHTS = "start_weights.pth"


class RecordStartWeights(L.Callback):
    """Save the network's weights as the first training step of a fresh run sees them, into
    `<experiment folder>/start_weights.pth`."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 0 and batch_idx == 0:
            torch.save(pl_module.model.state_dict(), Path(trainer.default_root_dir) / START_WEIGHTS)


class KillOnce(L.Callback):
    """SIGKILL this process after the first training step of epoch `epoch` of the experiment named `experiment`,
    once (a marker file in the experiment folder remembers it)."""

    def __init__(self, experiment: str, epoch: int):
        self.experiment = experiment
        self.epoch = epoch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        folder = Path(trainer.default_root_dir)
        marker = folder / "killed_once"
        if folder.name == self.experiment and trainer.current_epoch == self.epoch and batch_idx == 0 \
                and not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
