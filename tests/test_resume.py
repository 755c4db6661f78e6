"""Interrupted runs end bit-identical to an uninterrupted one (CPU, deterministic), 1 and 2 processes, resuming
from mid-epoch and from end-of-epoch checkpoints, with and without loader workers.

Each case is one SLURM job (emulated `srun`) launched five times with the same command, `fit --ckpt_path last`
(only the loader workers change, and the fault injected):
1. SIGUSR1 arrives in epoch 0: the state goes to last.ckpt after that step, the job is requeued and stops;
2. resumes mid-epoch (2 workers); SIGKILLed as epoch 1 starts, after the end-of-epoch checkpoints of epoch 0;
3. resumes from the end-of-epoch last.ckpt (0 workers); SIGUSR1 in epoch 1;
4. resumes mid-epoch (0 workers); SIGKILLed as epoch 2 starts;
5. resumes from the end-of-epoch last.ckpt (2 workers) and trains to the end.
"""

import signal

import pytest

from helpers_multiprocess import (MAX_EPOCHS, STEPS_PER_EPOCH, assert_same_weights, base_env, callback_args,
                                  checkpoint_dir, fake_scontrol, launch, load_checkpoint, read_logs, reference_run,
                                  wait, write_config)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def loader_position(checkpoint: dict) -> tuple[int, int]:
    """(epoch, batches done) of the training loader's saved position (of rank 0)."""
    position = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    return position["epoch"], position["batches_done"]


@pytest.mark.parametrize("processes", [1, 2])
def test_preempted_and_killed_runs_end_bit_identical_to_an_uninterrupted_run(tmp_path, processes):
    steps = STEPS_PER_EPOCH[processes]
    bin_dir, scontrol_log = fake_scontrol(tmp_path)
    env = base_env(bin_dir)
    last = checkpoint_dir(tmp_path, "resumed") / "last.ckpt"
    preempted, killed, finished = [128 + signal.SIGUSR1] * processes, [-signal.SIGKILL] * processes, [0] * processes
    plan = [  # workers, fault (signal, at global step), exit codes, saved (global step, loader epoch, batches done)
        (0, (signal.SIGUSR1, 1), preempted, (2, 0, 2)),
        (2, (signal.SIGKILL, steps), killed, (steps, 0, steps)),
        (0, (signal.SIGUSR1, steps + 1), preempted, (steps + 2, 1, 2)),
        (0, (signal.SIGKILL, 2 * steps), killed, (2 * steps, 1, steps)),
        (2, None, finished, (MAX_EPOCHS * steps, MAX_EPOCHS - 1, steps)),
    ]
    for launch_index, (workers, fault, codes, (step, epoch, batches_done)) in enumerate(plan, start=1):
        config = write_config(tmp_path, "resumed", data={"num_workers": workers})
        command = ["fit", "--config", str(config), "--ckpt_path", "last"]
        if fault is not None:
            command += callback_args("SignalAtStep", step=fault[1], signum=int(fault[0]))
        logs = tmp_path / f"launch{launch_index}"
        assert wait(launch(command, env, logs, processes)) == codes, read_logs(logs)
        saved = load_checkpoint(last)
        assert (saved["global_step"], *loader_position(saved)) == (step, epoch, batches_done), launch_index

    assert scontrol_log.read_text().split() == ["requeue", "4242"] * 2
    assert_same_weights(checkpoint_dir(reference_run(processes), "reference") / "last.ckpt", last)
    assert not list(tmp_path.rglob("hpc_ckpt_*"))
