"""Crash safety: a SIGKILL in the middle of a checkpoint write or at a random moment leaves a loadable last.ckpt
that `--ckpt_path last` resumes (to the uninterrupted run's weights); a non-finite loss stops every rank at that
step with a message naming it and keeps the last good checkpoint."""

import random
import signal
import time

import pytest
import torch

from helpers_multiprocess import (MAX_EPOCHS, STEPS_PER_EPOCH, assert_same_weights, base_env, callback_args,
                                  checkpoint_dir, kill_group, launch, load_checkpoint, read_logs, reference_run, run,
                                  start, wait, write_config)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_kill_while_writing_last_then_at_a_random_moment_resumes_to_the_uninterrupted_weights(tmp_path):
    steps = STEPS_PER_EPOCH[1]
    env = base_env()
    config = write_config(tmp_path, "crash")
    command = ["fit", "--config", str(config), "--ckpt_path", "last"]
    folder = checkpoint_dir(tmp_path, "crash")
    last, partial = folder / "last.ckpt", folder / "last.ckpt.tmp"

    # 1. Killed half-way through writing last.ckpt at the end of epoch 1: the epoch-0 file stays intact.
    killer = callback_args("KillDuringCheckpointWrite", filename="last.ckpt", step=2 * steps)
    assert run([*command, *killer], env, tmp_path / "run1.log") == -signal.SIGKILL, (tmp_path / "run1.log").read_text()
    assert partial.stat().st_size > 0
    with pytest.raises(Exception):
        torch.load(partial, map_location="cpu", weights_only=True)
    assert load_checkpoint(last)["global_step"] == steps

    # 2. Resumed, then killed at a random moment after it has written a checkpoint of its own.
    process = start(command, env, tmp_path / "run2.log")
    written = last.stat().st_mtime_ns
    while last.stat().st_mtime_ns == written and process.poll() is None:
        time.sleep(0.02)
    assert process.poll() in (None, 0), (tmp_path / "run2.log").read_text()
    time.sleep(random.uniform(0.0, 1.5))
    kill_group(process)
    wait([process])
    assert load_checkpoint(last)["global_step"] > steps

    # 3. Resumed from whatever is newest and trained to the end.
    assert run(command, env, tmp_path / "run3.log") == 0, (tmp_path / "run3.log").read_text()
    assert load_checkpoint(last)["global_step"] == MAX_EPOCHS * steps
    assert not list(folder.glob("*.tmp")), "a resumed run removes the partial files of killed writes"
    assert_same_weights(checkpoint_dir(reference_run(1), "reference") / "last.ckpt", last)


def test_non_finite_loss_on_one_rank_stops_all_ranks_at_that_step_and_keeps_the_last_good_checkpoint(tmp_path):
    steps = STEPS_PER_EPOCH[2]
    bad_step = steps + 1
    config = write_config(tmp_path, "diverged")
    fault = callback_args("NonFiniteLossAtStep", step=bad_step, rank=1)
    processes = launch(["fit", "--config", str(config), *fault], base_env(), tmp_path / "logs", 2)
    assert wait(processes) == [1, 1], read_logs(tmp_path / "logs")
    rank0, rank1 = (tmp_path / "logs" / f"rank{rank}.log" for rank in (0, 1))
    assert f"deepgaze: error: the training loss is nan at global step {bad_step} (epoch 1, batch 1)" \
        in rank1.read_text()
    assert f"is not finite on another rank at global step {bad_step}" in rank0.read_text()
    last = load_checkpoint(checkpoint_dir(tmp_path, "diverged") / "last.ckpt")
    assert last["global_step"] == steps
    assert all(torch.isfinite(value).all() for value in last["state_dict"].values())
    assert sorted(path.name for path in checkpoint_dir(tmp_path, "diverged").iterdir()) == ["best.ckpt", "last.ckpt"]
