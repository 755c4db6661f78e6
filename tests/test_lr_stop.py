"""StopAtMinimumLearningRate: the same epochs as the reference loop (deepgaze_pytorch/training.py: train while
lr >= minimum, the scheduler stepping after each epoch), also across a resume."""

import lightning as L
import pytest
import torch

from deepgaze_lit.lr_stop import StopAtMinimumLearningRate

MIN_LR = 1e-7
STAGE_MILESTONES = {
    "salicon_pretrain": (1e-3, [15, 30, 45, 60, 75, 90, 105, 120], 75),
    "mit_spatial": (1e-3, [3, 6, 9, 12, 15, 18, 21, 24], 15),
    "mit_scanpath_frozen": (1e-3, [10, 20, 30, 31, 32, 33, 34, 35], 32),
    "mit_scanpath_full": (1e-5, [3, 6, 9, 12, 15, 18, 21, 24], 9),
    "short": (1e-5, [1, 2, 3], 3),
}
"""(initial lr, MultiStepLR milestones, epochs): the reference's epoch counts of the four protocol stages."""


def reference_epochs(lr: float, milestones: list[int], cap: int = 1000) -> int:
    """Epochs the reference loop trains: `while lr >= minimum: train an epoch; scheduler.step()`."""
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
    epochs = 0
    while optimizer.param_groups[0]["lr"] >= MIN_LR and epochs < cap:
        epochs += 1
        optimizer.step()
        scheduler.step()
    return epochs


class TinyRegression(L.LightningModule):
    """One linear layer, Adam and MultiStepLR (gamma 0.1, stepped per epoch)."""

    def __init__(self, lr: float, milestones: list[int]):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.lr, self.milestones = lr, milestones

    def training_step(self, batch, batch_idx):
        return self.layer(batch).square().mean()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.ones(2, 2), batch_size=2)

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, self.milestones, gamma=0.1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


class EpochCounter(L.Callback):
    def __init__(self):
        self.epochs = 0

    def on_train_epoch_start(self, trainer, pl_module):
        self.epochs += 1


def fit(module: TinyRegression, max_epochs: int, ckpt_path=None) -> tuple[int, L.Trainer]:
    """Epochs this fit trains with the stopping rule, and its trainer."""
    counter = EpochCounter()
    trainer = L.Trainer(max_epochs=max_epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[StopAtMinimumLearningRate(MIN_LR), counter])
    trainer.fit(module, ckpt_path=ckpt_path)
    return counter.epochs, trainer


@pytest.mark.parametrize("stage", list(STAGE_MILESTONES))
def test_stops_after_the_reference_epochs(stage):
    lr, milestones, epochs = STAGE_MILESTONES[stage]
    assert reference_epochs(lr, milestones) == epochs
    trained, trainer = fit(TinyRegression(lr, milestones), max_epochs=1000)
    assert trained == epochs and trainer.current_epoch == epochs
    assert trainer.optimizers[0].param_groups[0]["lr"] < MIN_LR


def test_a_rate_equal_to_the_minimum_keeps_training():
    """1e-5 after milestones 1 and 2 is 1.0000000000000002e-07 >= 1e-7: the reference trains on (until max_epochs)."""
    assert reference_epochs(1e-5, [1, 2]) == 1000
    trained, _ = fit(TinyRegression(1e-5, [1, 2]), max_epochs=6)
    assert trained == 6


def test_resumed_run_stops_where_an_uninterrupted_one_does(tmp_path):
    lr, milestones, epochs = STAGE_MILESTONES["mit_scanpath_full"]
    first, trainer = fit(TinyRegression(lr, milestones), max_epochs=4)
    assert first == 4
    trainer.save_checkpoint(tmp_path / "interrupted.ckpt")
    second, trainer = fit(TinyRegression(lr, milestones), max_epochs=1000, ckpt_path=tmp_path / "interrupted.ckpt")
    assert first + second == epochs and trainer.current_epoch == epochs
    trainer.save_checkpoint(tmp_path / "finished.ckpt")
    again, trainer = fit(TinyRegression(lr, milestones), max_epochs=1000, ckpt_path=tmp_path / "finished.ckpt")
    assert again == 0 and trainer.current_epoch == epochs


def test_minimum_must_be_positive():
    with pytest.raises(ValueError, match="min_lr must be a positive learning rate"):
        StopAtMinimumLearningRate(0.0)
