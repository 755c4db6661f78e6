"""Shared pieces of the benchmarks: peak memory, and a Lightning callback that splits each epoch's wall time.

`StageTimer` splits every training epoch into (seconds):
- data: waiting for the next batch (loader and host-to-device copy), from the end of the previous batch (or the
  epoch start, or the end of validation) to the start of this one;
- backbone: inside `DeepGazeIII.backbone_features` during training steps (0 for images served by the feature
  cache);
- readout+loss: the rest of the training step up to the optimiser: head forward, loss, backward, zero_grad and,
  with the feature cache, its lookups;
- optimiser: `optimizer.step` and Lightning's bookkeeping after it;
- validation: the whole validation loop (its loader, network and metrics), over `val_images` images;
- other: the rest of the epoch up to the start of the next one (or the end of fit): logging, epoch hooks and
  checkpoint writing.
On a GPU every boundary synchronises the device, so the split is honest (and the run slightly slower).

Peak RSS never decreases, so it is also read at the start of fit (data set up, model built), at the end of each
epoch's training steps and at the end of its validation: the growth between marks says which part set the peak.
"""

from __future__ import annotations

import functools
import json
import resource
import time
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.callbacks import Callback

PHASES = ("data", "backbone", "readout+loss", "optimiser", "validation", "other")
REFERENCE = {"size": "768x1024", "step_s": 14.1, "images_per_s": 0.14, "peak_rss_mb": 7.6 * 1000}
"""The reference implementation on a 2-core CPU, 768x1024, batch 2, 10 scanpath components (issue 7)."""


def peak_rss_mb() -> float:
    """Peak resident memory (MiB) of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_stall_microseconds() -> Optional[int]:
    """Total microseconds in which some runnable task waited for a CPU (Linux pressure stall information), or
    None where the kernel does not report it. Its growth over a run, divided by the run's duration, is the share
    of the time the CPUs were oversubscribed: about 0 on a quiet machine, near 1 when other work competes."""
    try:
        with open("/proc/pressure/cpu") as stream:
            fields = dict(item.split("=") for item in stream.readline().split()[1:])
    except (OSError, ValueError):
        return None
    return int(fields["total"])


def cuda_peak_mb() -> Optional[float]:
    """`torch.cuda.max_memory_allocated` in MiB, or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 2**20


class StageTimer(Callback):
    """Per training epoch: seconds per phase (see the module docstring), training images, and at the end peak
    memory, written as JSON to `output` when training ends.

    Args:
        output: JSON file for the results (a list of epochs and the peak memory).
    """

    def __init__(self, output: str):
        self.output = Path(output)
        self.epochs: list[dict[str, Any]] = []
        self.setup_rss_mb = 0.0
        self._current: dict[str, Any] = {}
        self._ended: dict[str, Any] = {}
        self._mark = 0.0
        self._step_start = 0.0
        self._optimiser_start = 0.0
        self._validation_start = 0.0
        self._epoch_start = 0.0
        self._in_training_step = False
        self._backbone_seconds = 0.0
        self._device: Optional[torch.device] = None

    def _now(self) -> float:
        if self._device is not None and self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        return time.perf_counter()

    def _timed_backbone(self, backbone_features):
        @functools.wraps(backbone_features)
        def timed(images):
            if not self._in_training_step:
                return backbone_features(images)
            begin = self._now()
            try:
                return backbone_features(images)
            finally:
                self._backbone_seconds += self._now() - begin
        return timed

    def on_fit_start(self, trainer, pl_module) -> None:
        self._device = pl_module.device
        self.setup_rss_mb = peak_rss_mb()
        network = pl_module.model
        network.backbone_features = self._timed_backbone(network.backbone_features)
        if self._device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self._device)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        now = self._now()
        self._close_epoch(now)
        self._current = {phase: 0.0 for phase in PHASES}
        self._current.update(epoch=trainer.current_epoch, images=0, steps=0)
        self._epoch_start = self._mark = now

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_start = self._now()
        self._current["data"] += self._step_start - self._mark
        self._backbone_seconds = 0.0
        self._in_training_step = True

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._optimiser_start = self._now()
        self._in_training_step = False
        self._current["backbone"] += self._backbone_seconds
        self._current["readout+loss"] += self._optimiser_start - self._step_start - self._backbone_seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._mark = self._now()
        self._current["optimiser"] += self._mark - self._optimiser_start
        self._current["images"] += int(batch["image"].shape[0])
        self._current["steps"] += 1

    def on_validation_start(self, trainer, pl_module) -> None:
        self._validation_start = self._now()
        if self._current:
            self._current["train_rss_mb"] = peak_rss_mb()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking and self._current:
            self._current["val_images"] = self._current.get("val_images", 0) + int(batch["image"].shape[0])

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not self._current:
            return
        self._mark = self._now()
        self._current["validation"] += self._mark - self._validation_start

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        """The epoch's steps and validation are done; it is closed (with what follows, such as checkpoint
        writing, in `other`) when the next epoch starts or fit ends."""
        self._current.setdefault("train_rss_mb", peak_rss_mb())
        cache = getattr(pl_module, "feature_cache", None)
        if cache is not None:
            self._current["cache"] = dict(vars(cache.stats))
        self._ended, self._current = self._current, {}

    def _close_epoch(self, now: float) -> None:
        if not self._ended:
            return
        epoch, self._ended = self._ended, {}
        epoch["total"] = now - self._epoch_start
        epoch["other"] = epoch["total"] - sum(epoch[phase] for phase in PHASES if phase != "other")
        epoch["end_rss_mb"] = peak_rss_mb()
        self.epochs.append(epoch)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._close_epoch(self._now())
        if not trainer.is_global_zero:
            return
        result = {"epochs": self.epochs, "setup_rss_mb": self.setup_rss_mb, "peak_rss_mb": peak_rss_mb(),
                  "cuda_peak_mb": cuda_peak_mb()}
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.output.write_text(json.dumps(result, indent=1) + "\n")


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """A plain-text table with right-aligned columns (the first left-aligned)."""
    widths = [max(len(str(row[column])) for row in [header, *rows]) for column in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [str(cell).ljust(widths[0]) if column == 0 else str(cell).rjust(widths[column])
                 for column, cell in enumerate(row)]
        lines.append("  ".join(cells))
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
