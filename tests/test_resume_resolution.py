"""Which checkpoint `fit` resumes from, a new run of an experiment that has checkpoints, partial-file cleanup, and
the preemption and non-finite-loss callbacks on a toy model in one process (fast)."""

import os
import signal
import time

import lightning as L
import pytest
import torch

from deepgaze_lit.cli import main
from deepgaze_lit.experiment import CheckpointFolder
from deepgaze_lit.resilience import (FiniteLossGuard, NonFiniteLossError, PreemptionCheckpoint, Stopped,
                                     ignore_stop_signals, slurm_job_id)
from helpers_multiprocess import checkpoint_dir, write_config


def write_checkpoint(path, global_step, mtime=None):
    torch.save({"global_step": global_step, "state_dict": {}}, path)
    if mtime is not None:
        os.utime(path, (mtime, mtime))


def test_last_resolves_to_the_checkpoint_with_the_highest_global_step(tmp_path):
    now = time.time()
    write_checkpoint(tmp_path / "last.ckpt", 40, now)
    write_checkpoint(tmp_path / "best.ckpt", 50, now - 100)  # written after last.ckpt's kill
    write_checkpoint(tmp_path / "epoch004.ckpt", 30, now + 100)  # recent file, older state
    (tmp_path / "last.ckpt.tmp").write_bytes(b"partial")
    assert CheckpointFolder(tmp_path).resume_point("last") == str(tmp_path / "best.ckpt")
    write_checkpoint(tmp_path / "last.ckpt", 50, now - 200)
    assert CheckpointFolder(tmp_path).newest() == tmp_path / "last.ckpt", "ties go to last.ckpt"


def test_unreadable_checkpoints_are_skipped_with_a_warning(tmp_path):
    write_checkpoint(tmp_path / "best.ckpt", 7)
    (tmp_path / "last.ckpt").write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="last.ckpt is not a readable training checkpoint"):
        assert CheckpointFolder(tmp_path).newest() == tmp_path / "best.ckpt"


def test_last_without_checkpoints_starts_fresh_and_explicit_paths_pass_through(tmp_path):
    assert CheckpointFolder(tmp_path / "missing").resume_point("last") is None
    assert CheckpointFolder(tmp_path).resume_point(None) is None
    assert CheckpointFolder(tmp_path).resume_point("some/run.ckpt") == "some/run.ckpt"


def test_a_new_run_keeps_each_earlier_run_in_a_numbered_folder(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    assert CheckpointFolder(checkpoints).start_new_run() is None
    for run in (1, 2):
        checkpoints.mkdir()
        write_checkpoint(checkpoints / "last.ckpt", run)
        assert CheckpointFolder(checkpoints).start_new_run() == tmp_path / f"checkpoints.{run}"
        assert not checkpoints.exists()
    assert [torch.load(tmp_path / f"checkpoints.{run}" / "last.ckpt")["global_step"] for run in (1, 2)] == [1, 2]
    checkpoints.mkdir()
    (checkpoints / "last.ckpt.tmp").write_bytes(b"partial")
    assert CheckpointFolder(checkpoints).start_new_run() is None, "partial files are no earlier run"


def test_partial_checkpoint_files_are_removed(tmp_path):
    write_checkpoint(tmp_path / "last.ckpt", 3)
    (tmp_path / "last.ckpt.tmp").write_bytes(b"partial")
    assert CheckpointFolder(tmp_path).remove_partial() == [tmp_path / "last.ckpt.tmp"]
    assert [path.name for path in tmp_path.iterdir()] == ["last.ckpt"]


def test_loader_workers_ignore_the_requeue_and_termination_signals():
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        ignore_stop_signals(worker_id=0)
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_slurm_job_id_of_array_and_plain_jobs(monkeypatch):
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert slurm_job_id() is None
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    assert slurm_job_id() == "1234"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "1200")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert slurm_job_id() == "1200_3"


class ToyModule(L.LightningModule):
    """A linear regression whose step `signal_step` sends SIGUSR1 and whose loss at `nan_step` is NaN."""

    def __init__(self, signal_step=None, nan_step=None):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.signal_step = signal_step
        self.nan_step = nan_step

    def training_step(self, batch, batch_idx):
        if self.global_step == self.signal_step:
            os.kill(os.getpid(), signal.SIGUSR1)
        loss = self.layer(batch[0]).square().mean()
        return loss * float("nan") if self.global_step == self.nan_step else loss

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(8, 2)), batch_size=2)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def toy_trainer(tmp_path, callback, accumulate_grad_batches=1):
    return L.Trainer(default_root_dir=tmp_path, max_epochs=2, callbacks=[callback], logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     accumulate_grad_batches=accumulate_grad_batches)


@pytest.mark.parametrize("accumulate, signal_step, saved_step", [(1, 5, 6), (2, 2, 3)])
def test_sigusr1_saves_after_the_optimizer_step_and_stops(tmp_path, monkeypatch, accumulate, signal_step,
                                                          saved_step):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    handler_before = signal.getsignal(signal.SIGUSR1)
    callback = PreemptionCheckpoint(str(tmp_path / "last.ckpt"))
    toy_trainer(tmp_path, callback).fit(ToyModule())
    assert signal.getsignal(signal.SIGUSR1) == handler_before, "a finished fit restores the previous handler"
    assert not (tmp_path / "last.ckpt").exists()
    with pytest.raises(Stopped) as stopped:
        toy_trainer(tmp_path, callback, accumulate).fit(ToyModule(signal_step=signal_step))
    assert stopped.value.code == 128 + signal.SIGUSR1
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert saved["global_step"] == saved_step and saved["epoch"] == 1
    assert saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"] == 2
    signal.signal(signal.SIGUSR1, handler_before)


def test_nan_loss_stops_before_the_update_naming_the_step(tmp_path):
    module = ToyModule(nan_step=5)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at global step 5 \(epoch 1, batch 1\)"):
        toy_trainer(tmp_path, FiniteLossGuard(str(tmp_path / "last.ckpt"))).fit(module)
    assert module.global_step == 5
    assert all(torch.isfinite(parameter).all() for parameter in module.parameters())


def test_a_second_fit_without_ckpt_path_is_a_new_run_and_keeps_the_first(tmp_path, capsys):
    config = write_config(tmp_path, "twice", trainer={"max_epochs": 1}, data={"synthetic_images": 8, "val_images": 2})
    checkpoints = checkpoint_dir(tmp_path, "twice")
    main(["fit", "--config", str(config)])
    first = torch.load(checkpoints / "last.ckpt", weights_only=True)["state_dict"]
    main(["fit", "--config", str(config), "--model.optimizer.init_args.lr", "0.5"])
    assert "already had checkpoints: they are kept in" in capsys.readouterr().err
    assert sorted(path.name for path in checkpoints.parent.iterdir()) == ["checkpoints", "checkpoints.1", "logs"]
    kept = torch.load(checkpoints.parent / "checkpoints.1" / "last.ckpt", weights_only=True)["state_dict"]
    second = torch.load(checkpoints / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(kept[key], first[key]) for key in first)
    assert not all(torch.equal(second[key], first[key]) for key in first)


def test_resuming_from_a_checkpoint_newer_than_last_refreshes_last(tmp_path, capsys):
    """A run killed after best.ckpt of its final epoch but before last.ckpt: `--ckpt_path last` resumes best.ckpt,
    which has nothing left to train, so last.ckpt would stay one epoch behind unless it is refreshed from it."""
    config = write_config(tmp_path, "behind", trainer={"max_epochs": 2}, data={"synthetic_images": 8, "val_images": 2})
    checkpoints = checkpoint_dir(tmp_path, "behind")
    main(["fit", "--config", str(config)])
    final = torch.load(checkpoints / "last.ckpt", weights_only=True)
    (checkpoints / "best.ckpt").write_bytes((checkpoints / "last.ckpt").read_bytes())
    write_checkpoint(checkpoints / "last.ckpt", final["global_step"] // 2)
    capsys.readouterr()
    main(["fit", "--config", str(config), "--ckpt_path", "last"])
    assert f"{checkpoints / 'best.ckpt'} is newer than last.ckpt" in capsys.readouterr().err
    assert (checkpoints / "last.ckpt").read_bytes() == (checkpoints / "best.ckpt").read_bytes()
    assert not list(checkpoints.glob("*.tmp"))
