"""SLURM: the sbatch scripts, `srun` emulated on this machine (2 nodes x 1 task here; 1 node x 2 tasks in the
preemption test below and in test_resume.py), and preemption by SIGUSR1 sent, as SLURM does, to every process of
the job (ranks and their loader workers)."""

import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from helpers_multiprocess import (MAX_EPOCHS, REPO, STEPS_PER_EPOCH, TIMEOUT_S, assert_same_weights, base_env,
                                  callback_args, checkpoint_dir, fake_scontrol, kill_group, load_checkpoint,
                                  read_logs, read_records, reference_run, start_srun, wait, write_config)


def sbatch_options(path: Path) -> dict[str, str]:
    """The `#SBATCH --key[=value]` lines of a script (value "" for flags)."""
    options = {}
    for match in re.finditer(r"^#SBATCH --([\w-]+)(?:=(\S+))?", path.read_text(), flags=re.MULTILINE):
        options[match.group(1)] = match.group(2) or ""
    return options


@pytest.mark.parametrize("name", ["baseline", "entropy"])
def test_sbatch_script_requests_one_task_per_gpu_and_runs_a_requeueable_fit(tmp_path, name):
    script = REPO / "slurm" / f"{name}.sbatch"
    options = sbatch_options(script)
    assert options["signal"] == "SIGUSR1@90"
    assert "requeue" in options and options["open-mode"] == "append" and "%j" in options["output"]
    assert options["ntasks-per-node"] == options["gpus-per-node"]
    config = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
    assert config["experiment"] == name and config["trainer"]["strategy"] == "ddp"

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    recorded = tmp_path / "srun.txt"
    (fake_bin / "srun").write_text(
        f'#!/bin/sh\n{{ pwd; echo "$SRUN_CPUS_PER_TASK"; printf "%s\\n" "$@"; }} > "{recorded}"\n')
    (fake_bin / "srun").chmod(0o755)
    env = {**base_env(fake_bin), "SLURM_SUBMIT_DIR": str(tmp_path), "SLURM_JOB_ID": "77",
           "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_JOB_NUM_NODES": options["nodes"],
           "SLURM_NTASKS_PER_NODE": options["ntasks-per-node"], "SLURM_CPUS_PER_TASK": options["cpus-per-task"]}
    result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    cwd, cpus, *srun_args = recorded.read_text().splitlines()
    assert Path(cwd) == tmp_path and cpus == options["cpus-per-task"]
    assert srun_args == ["deepgaze", "fit", "--config", f"configs/{name}.yaml",
                         "--trainer.num_nodes", options["nodes"], "--trainer.devices", options["ntasks-per-node"],
                         "--ckpt_path", "last"]


def assert_ranks_agree(records: Path) -> None:
    ranks = read_records(records, "fit")
    assert [rank["world_size"] for rank in ranks] == [2, 2]
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["train_batches"] == ranks[1]["train_batches"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_emulated_two_node_srun_trains_to_the_end_and_the_ranks_agree(tmp_path):
    config = write_config(tmp_path, "srun")
    processes = start_srun(["fit", "--config", str(config), *callback_args("RankRecorder", folder=tmp_path)],
                           base_env(), tmp_path / "logs", nodes=2, tasks_per_node=1)
    assert wait(processes) == [0, 0], read_logs(tmp_path / "logs")
    assert_ranks_agree(tmp_path)
    # The same training as `--trainer.strategy ddp --trainer.devices 2`, bit for bit.
    assert_same_weights(checkpoint_dir(reference_run(2), "reference") / "last.ckpt",
                        checkpoint_dir(tmp_path, "srun") / "last.ckpt")


def wait_for_file(path: Path, processes: list[subprocess.Popen], logs: Path, timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if any(process.poll() is not None for process in processes) or time.monotonic() > deadline:
            for process in processes:
                kill_group(process)
            pytest.fail(f"{path} was not written:\n{read_logs(logs)}")
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigusr1_to_every_process_of_a_one_node_two_task_job_checkpoints_requeues_and_the_relaunch_finishes(tmp_path):
    bin_dir, scontrol_log = fake_scontrol(tmp_path)
    env = base_env(bin_dir)
    command = ["fit", "--config", str(write_config(tmp_path, "preempted", data={"num_workers": 2})),
               "--ckpt_path", "last"]
    last = checkpoint_dir(tmp_path, "preempted") / "last.ckpt"
    processes = start_srun(command, env, tmp_path / "logs1", job_id=5151)
    wait_for_file(last, processes, tmp_path / "logs1")
    for process in processes:
        kill_group(process, signal.SIGUSR1)
    assert wait(processes) == [128 + signal.SIGUSR1] * 2, read_logs(tmp_path / "logs1")
    assert scontrol_log.read_text().split() == ["requeue", "5151"]
    stopped_at = load_checkpoint(last)["global_step"]
    assert STEPS_PER_EPOCH[2] <= stopped_at < MAX_EPOCHS * STEPS_PER_EPOCH[2]
    assert not list(tmp_path.rglob("hpc_ckpt_*")), "Lightning's own SLURM handler must not run"

    processes = start_srun([*command, *callback_args("RankRecorder", folder=tmp_path)], env, tmp_path / "logs2",
                           job_id=5151)
    assert wait(processes) == [0, 0], read_logs(tmp_path / "logs2")
    assert_ranks_agree(tmp_path)
    assert_same_weights(checkpoint_dir(reference_run(2), "reference") / "last.ckpt", last)
