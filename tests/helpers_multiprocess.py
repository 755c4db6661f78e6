"""Shared helpers of the multi-process tests: run `deepgaze` in subprocesses (plain, Lightning DDP, emulated `srun`),
record what each rank saw, and inject faults (SIGUSR1 at a step, SIGKILL in the middle of a checkpoint write, a
non-finite loss) through callbacks added with `--trainer.callbacks+=`.

Every process is started in its own session so that a test can signal or kill a rank together with its loader
workers (as SLURM does) and never reaches the pytest process. Subprocesses run with one intra-op thread each.
"""

import atexit
import hashlib
import io
import json
import math
import os
import signal
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from lightning.pytorch.callbacks import Callback

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
DEEPGAZE = Path(sys.executable).with_name("deepgaze")
TIMEOUT_S = 300

TINY_CONFIG = {
    "seed_everything": 7,
    "trainer": {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 4,
        "deterministic": True,
        "log_every_n_steps": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    },
    "model": {"num_components": 1, "scanpath": False, "backbone_weights": "none"},
    "data": {
        "source": "synthetic",
        "synthetic_images": 14,
        "synthetic_sizes": [[64, 64], [64, 96]],
        "synthetic_subjects": 3,
        "val_images": 5,
        "history": "none",
        "batch_size": 2,
        "num_workers": 0,
        "image_cache_mb": 0,
    },
}
"""9 training images (5 + 4 of two sizes: 5 batches of 2, padded to 3 + 3 over two ranks), 5 validation images
(3 + 2 over two ranks); 64-pixel images, one component, random backbone: a few seconds per epoch."""

MAX_EPOCHS = TINY_CONFIG["trainer"]["max_epochs"]
STEPS_PER_EPOCH = {1: 5, 2: 3}
"""Optimizer steps per epoch of TINY_CONFIG with 1 and 2 processes."""


def write_config(folder: Path, experiment: str, **sections: dict) -> Path:
    """A YAML config: TINY_CONFIG with `sections` merged into its sections, experiments under `folder`."""
    config = {key: dict(value) if isinstance(value, dict) else value for key, value in TINY_CONFIG.items()}
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values}
    config["experiment"] = experiment
    config["experiments_root"] = str(folder / "experiments")
    path = folder / f"{experiment}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def fake_scontrol(folder: Path) -> tuple[Path, Path]:
    """A `scontrol` script in `folder`/bin that appends its arguments to `folder`/scontrol.log; (bin, log)."""
    bin_dir = folder / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    log = folder / "scontrol.log"
    script = bin_dir / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\n')
    script.chmod(0o755)
    return bin_dir, log


def base_env(bin_dir: Optional[Path] = None) -> dict[str, str]:
    """The environment of every subprocess: no inherited SLURM or torch.distributed variables, this folder on
    PYTHONPATH (for the callbacks below), one thread, `bin_dir` first on PATH."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("SLURM_") and key not in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK",
                                                           "WORLD_SIZE", "RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO)])
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    if bin_dir is not None:
        env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return env


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start `deepgaze <args>` in a new session, stdout and stderr to `log`."""
    stream = open(log, "w")
    try:
        return subprocess.Popen([str(DEEPGAZE), *args], cwd=REPO, env=env, stdout=stream, stderr=subprocess.STDOUT,
                                start_new_session=True)
    finally:
        stream.close()


def kill_group(process: subprocess.Popen, signum: int = signal.SIGKILL) -> None:
    """Send `signum` to the process and everything in its session (its DDP children, its loader workers)."""
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass


def wait(processes: list[subprocess.Popen], timeout: float = TIMEOUT_S) -> list[int]:
    """Exit codes of `processes`; kills all of them (and their sessions) if any runs past `timeout` seconds."""
    deadline = time.monotonic() + timeout
    try:
        return [process.wait(timeout=max(0.0, deadline - time.monotonic())) for process in processes]
    except subprocess.TimeoutExpired:
        for process in processes:
            kill_group(process)
            process.wait()
        raise
    finally:
        for process in processes:
            kill_group(process)


def run(args: list[str], env: dict[str, str], log: Path, timeout: float = TIMEOUT_S) -> int:
    """Run `deepgaze <args>` to the end; its exit code."""
    return wait([start(args, env, log)], timeout)[0]


def srun_env(env: dict[str, str], rank: int, nodes: int, tasks_per_node: int, job_id: int) -> dict[str, str]:
    """The SLURM variables `srun` gives task `rank` of a `nodes` x `tasks_per_node` job on this one machine."""
    return {
        **env,
        "SLURM_JOB_ID": str(job_id),
        "SLURM_JOB_NAME": "deepgaze-test",
        "SLURM_NTASKS": str(nodes * tasks_per_node),
        "SLURM_NTASKS_PER_NODE": str(tasks_per_node),
        "SLURM_NNODES": str(nodes),
        "SLURM_JOB_NUM_NODES": str(nodes),
        "SLURM_NODELIST": "localhost",
        "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": str(rank % tasks_per_node),
        "SLURM_NODEID": str(rank // tasks_per_node),
        "MASTER_PORT": env["MASTER_PORT"],
    }


def start_srun(args: list[str], env: dict[str, str], logs: Path, nodes: int = 1, tasks_per_node: int = 2,
               job_id: int = 4242) -> list[subprocess.Popen]:
    """Emulate `srun deepgaze <args>` of a `nodes` x `tasks_per_node` job: one process per task, each in its own
    session, logs in `logs`/rank<r>.log. Adds the matching `--trainer.num_nodes` / `--trainer.devices`."""
    env = {**env, "MASTER_PORT": str(free_port())}
    args = [*args, "--trainer.num_nodes", str(nodes), "--trainer.devices", str(tasks_per_node)]
    logs.mkdir(parents=True, exist_ok=True)
    return [start(args, srun_env(env, rank, nodes, tasks_per_node, job_id), logs / f"rank{rank}.log")
            for rank in range(nodes * tasks_per_node)]


def launch(args: list[str], env: dict[str, str], logs: Path, processes: int) -> list[subprocess.Popen]:
    """`deepgaze <args>` as a 1-task SLURM job (processes 1) or an emulated 1 node x 2 tasks `srun` (processes 2);
    SLURM is what makes SIGUSR1 a requeue signal."""
    return start_srun(args, env, logs, nodes=1, tasks_per_node=processes)


def checkpoint_dir(folder: Path, experiment: str) -> Path:
    """The checkpoint folder of `experiment` configured by `write_config(folder, experiment)`."""
    return folder / "experiments" / experiment / "checkpoints"


_REFERENCES: dict[int, Path] = {}


def reference_run(processes: int) -> Path:
    """The folder of an uninterrupted `deepgaze fit` of TINY_CONFIG (experiment "reference") with 1 process or
    with `--trainer.strategy ddp --trainer.devices 2`, with RankRecorder files in <folder>/records; run once per
    pytest session (the other tests compare their final weights with it), deleted at exit."""
    if processes not in _REFERENCES:
        folder = Path(tempfile.mkdtemp(prefix=f"deepgaze-reference{processes}-"))
        atexit.register(shutil.rmtree, folder, True)
        args = ["fit", "--config", str(write_config(folder, "reference")),
                *callback_args("RankRecorder", folder=folder / "records")]
        if processes == 2:
            args += ["--trainer.strategy", "ddp", "--trainer.devices", "2"]
        code = run(args, base_env(), folder / "fit.log")
        assert code == 0, (folder / "fit.log").read_text()
        _REFERENCES[processes] = folder
    return _REFERENCES[processes]


def read_records(folder: Path, stage: str) -> list[dict]:
    """RankRecorder records of `stage` ("fit", "validate") in `folder`, by rank."""
    paths = sorted(folder.glob(f"{stage}_rank*.json"))
    return [json.loads(path.read_text()) for path in paths]


def read_logs(logs: Path) -> str:
    return "\n".join(f"--- {path.name}\n{path.read_text()}" for path in sorted(logs.glob("*.log")))


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(first: Path, second: Path) -> None:
    """Both checkpoints hold bit-identical weights at the same global step."""
    a, b = load_checkpoint(first), load_checkpoint(second)
    assert a["global_step"] == b["global_step"], (first, a["global_step"], second, b["global_step"])
    assert a["state_dict"].keys() == b["state_dict"].keys()
    different = [key for key in a["state_dict"] if not torch.equal(a["state_dict"][key], b["state_dict"][key])]
    assert not different, f"{first} and {second} differ in {different}"


def weights_digest(state_dict: dict) -> str:
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        digest.update(key.encode())
        digest.update(state_dict[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# ---- callbacks injected into the CLI runs ---------------------------------------------------------------------


class RankRecorder(Callback):
    """Writes `<folder>/<stage>_rank<r>.json` per rank: training batches per epoch, the `image_index` of every
    validation sample of the last validation, the logged validation metrics and a digest of the final weights."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self.record: dict[str, Any] = {"train_batches": {}, "val_images": [], "val_metrics": {}}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        counts = self.record["train_batches"]
        counts[str(trainer.current_epoch)] = counts.get(str(trainer.current_epoch), 0) + 1

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.record["val_images"] = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.record["val_images"] += batch["image_index"].tolist()

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.record["val_metrics"] = {key: float(value) for key, value in trainer.callback_metrics.items()
                                          if key.startswith("val/")}

    def teardown(self, trainer, pl_module, stage) -> None:
        self.record["world_size"] = trainer.world_size
        self.record["weights"] = weights_digest(pl_module.state_dict())
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{getattr(stage, 'value', stage)}_rank{trainer.global_rank}.json"
        path.write_text(json.dumps(self.record, indent=1))


class SignalAtStep(Callback):
    """Sends `signum` to its own process when the training step with global step `step` is about to run (on
    every rank at the same step): SIGUSR1 then lets that step finish, SIGKILL ends the process before it."""

    def __init__(self, step: int, signum: int = int(signal.SIGUSR1)) -> None:
        self.step = step
        self.signum = signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class KillDuringCheckpointWrite(Callback):
    """SIGKILLs its process half-way through writing the checkpoint file `filename` at global step `step`: the
    first half of the serialized checkpoint reaches the disk (flushed, fsynced), the rest never does."""

    def __init__(self, filename: str, step: int) -> None:
        self.filename = filename
        self.step = step

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.global_step != self.step or not trainer.is_global_zero:
            return
        original_save = torch.save

        def save_half_then_die(obj, stream, *args, **kwargs):
            name = Path(getattr(stream, "name", str(stream))).name
            if not name.startswith(self.filename):
                return original_save(obj, stream, *args, **kwargs)
            buffer = io.BytesIO()
            original_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            stream.write(data[: len(data) // 2])
            stream.flush()
            os.fsync(stream.fileno())
            os.kill(os.getpid(), signal.SIGKILL)

        torch.save = save_half_then_die


class NonFiniteLossAtStep(Callback):
    """Makes the loss of global step `step` on rank `rank` NaN by filling the batch's centre bias with NaN."""

    def __init__(self, step: int, rank: int = 0) -> None:
        self.step = step
        self.rank = rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            batch["centerbias"].fill_(math.nan)


def callback_args(class_name: str, **init_args) -> list[str]:
    """`--trainer.callbacks+=` arguments adding `helpers_multiprocess.<class_name>(**init_args)`."""
    args = ["--trainer.callbacks+=" + f"helpers_multiprocess.{class_name}"]
    for key, value in init_args.items():
        args += [f"--trainer.callbacks.init_args.{key}", str(value)]
    return args


class SignalAtSetup(Callback):
    """Sends `signum` to its own process in its `setup` hook: after the data is set up, before training starts."""

    def __init__(self, signum: int = int(signal.SIGUSR1)) -> None:
        self.signum = signum

    def setup(self, trainer, pl_module, stage) -> None:
        os.kill(os.getpid(), self.signum)
