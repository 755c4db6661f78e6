"""Shape-bucketing batch sampler: ranks, epochs, seeds and resuming in the middle of an epoch (also via Lightning)."""

import json
import shutil
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from deepgaze_lit.data import ResumableDataLoader, SaliencyDataModule, ShapeBucketBatchSampler

SHAPES = np.array([[64, 96]] * 11 + [[96, 64]] * 7 + [[80, 80]] * 2)


def _flatten(batches):
    return [index for batch in batches for index in batch]


def _rank_batches(shuffle, world_size, epoch=0, seed=0, batch_size=3):
    per_rank = []
    for rank in range(world_size):
        sampler = ShapeBucketBatchSampler(SHAPES, batch_size, shuffle=shuffle, seed=seed, rank=rank,
                                          world_size=world_size)
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        per_rank.append(batches)
    return per_rank


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_evaluation_sees_every_sample_once(world_size):
    per_rank = _rank_batches(shuffle=False, world_size=world_size)
    seen = _flatten(batch for batches in per_rank for batch in batches)
    assert sorted(seen) == list(range(len(SHAPES)))
    sizes = [len(_flatten(batches)) for batches in per_rank]
    assert max(sizes) - min(sizes) <= 1
    for batches in per_rank:
        for batch in batches:
            assert len({tuple(SHAPES[i]) for i in batch}) == 1 and len(batch) <= 3


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_training_ranks_get_equal_batch_counts_and_all_samples(world_size):
    per_rank = _rank_batches(shuffle=True, world_size=world_size)
    assert len({len(batches) for batches in per_rank}) == 1
    assert set(_flatten(batch for batches in per_rank for batch in batches)) == set(range(len(SHAPES)))
    for batches in per_rank:
        for batch in batches:
            assert len({tuple(SHAPES[i]) for i in batch}) == 1


def test_training_order_depends_on_seed_and_epoch_only():
    epoch0 = _rank_batches(shuffle=True, world_size=2, epoch=0)
    assert epoch0 == _rank_batches(shuffle=True, world_size=2, epoch=0)
    assert epoch0 != _rank_batches(shuffle=True, world_size=2, epoch=1)
    assert epoch0 != _rank_batches(shuffle=True, world_size=2, epoch=0, seed=1)


def test_sampler_is_its_own_sampler_for_lightning_set_epoch():
    sampler = ShapeBucketBatchSampler(SHAPES, 4, shuffle=True)
    sampler.sampler.set_epoch(5)
    assert sampler.epoch == 5


class _Indices(torch.utils.data.Dataset):
    def __len__(self):
        return len(SHAPES)

    def __getitem__(self, item):
        return item


def test_resumable_loader_continues_mid_epoch():
    def loader():
        sampler = ShapeBucketBatchSampler(SHAPES, 3, shuffle=True, seed=7)
        sampler.set_epoch(2)
        return ResumableDataLoader(_Indices(), sampler, collate_fn=list)

    full = list(loader())
    interrupted = loader()
    iterator = iter(interrupted)
    first = [next(iterator) for _ in range(3)]
    state = interrupted.state_dict()
    assert state["epoch"] == 2 and state["batches_done"] == 3
    resumed = loader()
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert first + rest == full
    assert resumed.state_dict()["batches_done"] == len(full)
    assert list(resumed) == full


class _RecordingModule(pl.LightningModule):
    """Records the training batches' image indices per epoch."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, batch["image_index"].tolist()))
        return (self.weight - 1).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(tmp_path, num_workers, ckpt_path=None, callbacks=(), max_steps=-1):
    module = _RecordingModule()
    data = SaliencyDataModule(synthetic_images=24, val_images=4, synthetic_sizes=[(64, 96), (96, 64)], batch_size=3,
                              num_workers=num_workers, image_cache_mb=16)
    trainer = pl.Trainer(max_epochs=3, max_steps=max_steps, accelerator="cpu", logger=False,
                         enable_checkpointing=bool(callbacks), callbacks=list(callbacks), enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, use_distributed_sampler=False,
                         default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module.seen


@pytest.mark.timeout(300)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_lightning_resume_mid_epoch_and_end_of_epoch_keeps_the_order(tmp_path, num_workers):
    full = _fit(tmp_path, num_workers)
    epochs = [epoch for epoch, _ in full]
    assert len(set(epochs)) == 3 and full[:7] != full[7:14]
    mid = ModelCheckpoint(dirpath=tmp_path / "mid", every_n_train_steps=10, save_top_k=-1, filename="mid")
    first = _fit(tmp_path, num_workers, callbacks=[mid], max_steps=10)
    second = _fit(tmp_path, num_workers, ckpt_path=str(tmp_path / "mid" / "mid.ckpt"))
    assert first + second == full
    shutil.rmtree(tmp_path / "mid")
    end = ModelCheckpoint(dirpath=tmp_path / "end", every_n_epochs=1, save_top_k=-1, filename="{epoch}")
    first = _fit(tmp_path, num_workers, callbacks=[end], max_steps=7)
    second = _fit(tmp_path, num_workers, ckpt_path=str(tmp_path / "end" / "epoch=0.ckpt"))
    assert first + second == full


class _RankRecordingModule(_RecordingModule):
    """Writes each rank's training batch count and validation image indices to `folder`."""

    def __init__(self, folder):
        super().__init__()
        self.folder = str(folder)
        self.validated = []

    def validation_step(self, batch, batch_idx):
        self.validated += batch["image_index"].tolist()

    def on_fit_end(self):
        record = {"train_batches": len(self.seen), "validated": self.validated}
        (Path(self.folder) / f"rank{self.global_rank}.json").write_text(json.dumps(record))


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ddp_spawn_two_ranks(tmp_path):
    data = SaliencyDataModule(synthetic_images=15, val_images=5, synthetic_sizes=[(64, 96), (96, 64)], batch_size=2,
                              image_cache_mb=16)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, use_distributed_sampler=False, default_root_dir=tmp_path)
    trainer.fit(_RankRecordingModule(tmp_path), datamodule=data)
    records = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert records[0]["train_batches"] == records[1]["train_batches"] == 3
    assert sorted(records[0]["validated"] + records[1]["validated"]) == list(range(5))
