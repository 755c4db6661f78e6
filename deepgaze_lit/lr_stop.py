"""Stop training once the learning rate has decayed below a minimum: the stopping rule of the reference DeepGaze
training loop, so that a config states the published milestones as they are and `max_epochs` is only a cap.

In YAML (`deepgaze fit`):

    trainer:
      max_epochs: 1000
      callbacks:
        - class_path: deepgaze_lit.lr_stop.StopAtMinimumLearningRate
          init_args:
            min_lr: 1.0e-7
"""

import math

import lightning as L
from lightning.pytorch.utilities import rank_zero_info


class StopAtMinimumLearningRate(L.Callback):
    """Stop `fit` when every parameter group's learning rate is below `min_lr` (strictly).

    The reference loop trains another epoch while the learning rate is >= the minimum and steps its scheduler after
    each epoch; here the rate is read after each training epoch, once Lightning has stepped the epoch-interval
    schedulers, and at the start of `fit`, so the same epochs run: with Adam at 1e-3 and MultiStepLR (gamma 0.1)
    at 3, 6, ..., 24, 15 epochs (the rate reaches 1e-8 at epoch 15; after 12 it is still 1.0000000000000004e-07).
    The decision reads only the optimisers' current rates, which a resumed run restores with the scheduler state:
    it is the same after a resume and on every rank, and a run resumed after its last epoch trains no further one.
    """

    def __init__(self, min_lr: float = 1e-7):
        if not (math.isfinite(min_lr) and min_lr > 0):
            raise ValueError(f"StopAtMinimumLearningRate: min_lr must be a positive learning rate, got {min_lr!r}")
        self.min_lr = min_lr

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_below_minimum(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_below_minimum(trainer)

    def _stop_below_minimum(self, trainer: L.Trainer) -> None:
        rates = [group["lr"] for optimizer in trainer.optimizers for group in optimizer.param_groups]
        if rates and max(rates) < self.min_lr:
            trainer.should_stop = True
            rank_zero_info(f"learning rate {max(rates):.3g} is below min_lr {self.min_lr:.3g}: training stops")
