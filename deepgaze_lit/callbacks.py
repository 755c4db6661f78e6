"""Checkpoint I/O and the validation image panel of a deepgaze-lit experiment (the folder's layout and checkpoint
names: `deepgaze_lit.experiment`)."""

import os
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from deepgaze_lit.experiment import partial_path
from deepgaze_lit.rendering import render_panel


class AtomicCheckpointIO(TorchCheckpointIO):
    """The one place where checkpoints are written: to `partial_path(<file>)` (`<file>.tmp`) in the target folder,
    flushed to disk, then renamed over `<file>`, so an interrupted save never leaves a truncated checkpoint behind
    and the previous `<file>` stays intact. A save that fails (a full disk, a signal) removes its `.tmp` at once;
    a failure of the disk is raised as the OSError behind it with the checkpoint's path as `filename` (torch
    reports a full disk as a RuntimeError about zip positions, with the OSError only as its context)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        target = Path(path)
        temporary = partial_path(target)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(temporary, "wb") as stream:
                torch.save(checkpoint, stream)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, target)
        except BaseException as error:
            temporary.unlink(missing_ok=True)
            cause = os_error_behind(error)
            if cause is None:
                raise
            raise OSError(cause.errno, cause.strerror or str(cause), str(target)) from error


def os_error_behind(error: BaseException) -> Optional[OSError]:
    """`error` itself when it is an OSError, else the first OSError among its causes and contexts; None if none."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


class ValidationPanel(Callback):
    """Every validation epoch, log one TensorBoard image `val/prediction`: the first `num_images` images of rank 0's
    first validation batch (the same images every epoch) with the predicted density and their fixations.

    Reads the full-resolution log density (B,1,H,W) from `validation_step`'s output `{"log_density": ...}`.
    """

    def __init__(self, num_images: int = 4, height: int = 192) -> None:
        self.num_images = num_images
        self.height = height

    def on_validation_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if batch_idx != 0 or dataloader_idx != 0 or trainer.sanity_checking or not trainer.is_global_zero:
            return
        writers = [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
        if not writers:
            return
        panel = render_panel(batch, outputs["log_density"], self.num_images, self.height)
        for writer in writers:
            writer.add_image("val/prediction", panel, global_step=trainer.global_step, dataformats="HWC")
