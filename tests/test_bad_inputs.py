"""Bad inputs and signals, as a new user gives them: every error ends with exactly one line `deepgaze: error: ...`
(no traceback) and its exit status (2 for the command, its settings and its files; 1 at run time; 128 + n for
signal n), and no file of the user's changes (hashed before and after)."""

import errno
import hashlib
import os
import pickle
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli
from deepgaze_lit import callbacks as checkpoint_io
from deepgaze_lit.callbacks import AtomicCheckpointIO
from deepgaze_lit.failures import UsageError, require_writable_folder
from deepgaze_lit.resilience import StopSignals, Stopped
from helpers_multiprocess import (base_env, callback_args, checkpoint_dir, load_checkpoint, run, start, wait,
                                  write_config)

ERROR_PREFIX = "deepgaze: error: "


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file below `folder`, by relative path."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def fails(args: list[str], cwd: Path, capsys, status: int = 2) -> str:
    """Run `deepgaze <args>` in `cwd`; assert it exits with `status`, its stderr has no traceback and ends with
    exactly one error line; that line without the prefix. Files in `cwd` other than experiment folders must not
    change."""
    before = file_hashes(cwd)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(args, cwd)
    err = capsys.readouterr().err
    assert exit_info.value.code == status, err
    assert "Traceback" not in err and "weights_only=False" not in err, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith(ERROR_PREFIX), err
    assert sum(line.startswith(ERROR_PREFIX) for line in lines) == 1, err
    after = file_hashes(cwd)
    assert {name: digest for name, digest in after.items() if name in before} == before, "a user file changed"
    return lines[-1][len(ERROR_PREFIX):]


def config(folder: Path, **sections: dict) -> str:
    return str(write_config(folder, "bad", **sections))


def lightning_like_checkpoint(path: Path) -> Path:
    """A small file with the entries of a Lightning checkpoint (not loadable into the model)."""
    torch.save({"state_dict": {"weight": torch.ones(3)}, "global_step": 3, "epoch": 0,
                "pytorch-lightning_version": "2.6.0"}, path)
    return path


def bad_weight_files(folder: Path) -> dict[str, Path]:
    """Files that are not weights: random bytes, text, a bare tensor, a truncated checkpoint, empty."""
    files = {"random": folder / "random.ckpt", "text": folder / "text.ckpt", "tensor": folder / "tensor.ckpt",
             "truncated": folder / "truncated.ckpt", "empty": folder / "empty.ckpt"}
    files["random"].write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    files["text"].write_text("these are not the weights you are looking for\n")
    torch.save(torch.ones(4, 4), files["tensor"])
    whole = lightning_like_checkpoint(folder / "whole.ckpt").read_bytes()
    files["truncated"].write_bytes(whole[: len(whole) // 2])
    files["empty"].write_bytes(b"")
    return files


# --- settings and data ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("option, value", [("batch_size", 0), ("batch_size", -3), ("eval_batch_size", 0),
                                           ("synthetic_images", 0)])
def test_non_positive_sizes_are_refused(tmp_path, capsys, option, value):
    message = fails(["fit", "--config", config(tmp_path), f"--data.{option}", str(value)], tmp_path, capsys)
    assert f"data.{option}" in message and str(value) in message


@pytest.mark.parametrize("overrides, words", [
    ({"val_images": 14}, ["14 validation", "data.val_images"]),
    ({"val_images": 10, "test_images": 4}, ["leaves no training", "data.test_images"]),
    ({"split": "crossval", "folds": 20}, ["too few", "data.folds"]),
    ({"split": "crossval", "folds": 5, "fold": 5}, ["data.fold"]),
])
def test_splits_larger_than_the_dataset_are_refused(tmp_path, capsys, overrides, words):
    message = fails(["fit", "--config", config(tmp_path, data=overrides)], tmp_path, capsys)
    assert all(word in message for word in words), message


def test_csv_source_without_csv_path(tmp_path, capsys):
    message = fails(["fit", "--config", config(tmp_path, data={"source": "csv", "path": str(tmp_path)})], tmp_path,
                    capsys)
    assert "data.csv_path" in message


def test_data_folder_that_does_not_exist(tmp_path, capsys):
    missing = tmp_path / "no_such_dataset"
    message = fails(["fit", "--config", config(tmp_path, data={"source": "pysaliency", "path": str(missing)})],
                    tmp_path, capsys)
    assert str(missing) in message


def test_hdf5_file_that_is_not_hdf5_is_named(tmp_path, capsys):
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    for name in ("stimuli.hdf5", "fixations.hdf5"):
        (dataset / name).write_text("not hdf5")
    message = fails(["fit", "--config", config(tmp_path, data={"source": "pysaliency", "path": str(dataset)})],
                    tmp_path, capsys)
    assert "stimuli.hdf5" in message and "not a readable HDF5 file" in message


def csv_dataset(folder: Path, sizes: dict[str, tuple[int, int]]) -> tuple[Path, Path]:
    """Random images of `sizes` (name -> (H, W)) in `folder`/images and a CSV with three fixations on each."""
    images = folder / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name, (height, width) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(images / name)
    csv = folder / "fixations.csv"
    csv.write_text("image,x,y\n" + "".join(f"{name},{x},{y}\n" for name in sizes
                                           for x, y in ((10, 12), (30, 20), (20, 30))))
    return images, csv


def test_image_below_the_network_minimum_names_the_file_before_training(tmp_path, capsys):
    images, csv = csv_dataset(tmp_path, {"a.png": (96, 96), "tiny.png": (40, 90), "b.png": (80, 64)})
    args = ["fit", "--config", config(tmp_path, data={"source": "csv", "path": str(images), "csv_path": str(csv),
                                                     "val_images": 1})]
    message = fails(args, tmp_path, capsys)
    assert "tiny.png" in message and "40x90" in message and "58" in message
    assert not list(tmp_path.rglob("*.ckpt")), "nothing was trained"


def test_image_that_cannot_be_decoded_in_a_loader_worker_is_one_line(tmp_path, capsys):
    images, csv = csv_dataset(tmp_path, {"a.png": (96, 96), "b.png": (96, 96), "c.png": (96, 96)})
    whole = (images / "b.png").read_bytes()
    (images / "b.png").write_bytes(whole[: len(whole) // 2])
    args = ["fit", "--config", config(tmp_path, data={"source": "csv", "path": str(images), "csv_path": str(csv),
                                                     "val_images": 1, "num_workers": 1})]
    message = fails(args, tmp_path, capsys)
    assert message.startswith(str(images / "b.png")) and "Caught" not in message


@pytest.mark.parametrize("content", ["text", "pickle", "npz"])
def test_centre_bias_template_that_is_not_an_array(tmp_path, capsys, content):
    template = tmp_path / f"template.{'npz' if content == 'npz' else 'npy'}"
    if content == "text":
        template.write_text("0 0 0\n")
    elif content == "pickle":
        np.save(template, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    else:
        np.savez(template, density=np.zeros((4, 4)))
    args = ["fit", "--config", config(tmp_path, data={"centerbias": "template", "centerbias_template": str(template)})]
    message = fails(args, tmp_path, capsys)
    assert template.name in message and "allow_pickle" not in message


# --- checkpoints and weights ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["random", "text", "tensor", "truncated", "empty"])
def test_ckpt_path_that_is_not_a_training_checkpoint(tmp_path, capsys, kind):
    path = bad_weight_files(tmp_path)[kind]
    message = fails(["validate", "--config", config(tmp_path), "--ckpt_path", str(path)], tmp_path, capsys)
    assert str(path) in message and "training checkpoint" in message


@pytest.mark.parametrize("kind", ["random", "text", "tensor", "truncated"])
def test_init_from_that_is_not_weights(tmp_path, capsys, kind):
    path = bad_weight_files(tmp_path)[kind]
    message = fails(["fit", "--config", config(tmp_path), "--model.init_from", str(path)], tmp_path, capsys)
    assert str(path) in message and "state dict" in message


@pytest.mark.parametrize("kind", ["random", "text", "tensor", "wrong_state_dict"])
def test_backbone_weights_that_are_not_densenet_weights(tmp_path, capsys, kind):
    if kind == "wrong_state_dict":
        path = tmp_path / "other.pth"
        torch.save({"finalizers.0.center_bias_weight": torch.ones(1)}, path)
    else:
        path = bad_weight_files(tmp_path)[kind]
    message = fails(["fit", "--config", config(tmp_path), "--model.backbone_weights", str(path)], tmp_path, capsys)
    assert str(path) in message and "densenet" in message.lower().replace("-", "")


def test_a_pickled_object_is_never_unpickled_and_no_unsafe_advice_is_given(tmp_path, capsys):
    marker = tmp_path / "was_executed"
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as stream:
        pickle.dump(Executes(str(marker)), stream)
    fails(["validate", "--config", config(tmp_path), "--ckpt_path", str(path)], tmp_path, capsys)
    fails(["fit", "--config", config(tmp_path), "--model.init_from", str(path)], tmp_path, capsys)
    assert not marker.exists()


class Executes:
    """Unpickling it would create the file `marker`."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("subcommand", ["validate", "fit"])
def test_truncated_best_checkpoint_is_the_same_clean_error_in_fit_and_validate(tmp_path, capsys, subcommand):
    folder = checkpoint_dir(tmp_path, "bad")
    folder.mkdir(parents=True)
    whole = lightning_like_checkpoint(tmp_path / "whole.ckpt").read_bytes()
    (folder / "best.ckpt").write_bytes(whole[: len(whole) // 3])
    message = fails([subcommand, "--config", config(tmp_path), "--ckpt_path", "best"], tmp_path, capsys)
    assert message == (f"{folder / 'best.ckpt'} cannot be read (truncated or not a PyTorch file); expected a "
                       "deepgaze-lit training checkpoint (a .ckpt file written by `deepgaze fit`)")


# --- folders that cannot be written -----------------------------------------------------------------------------

def test_experiments_folder_under_a_regular_file(tmp_path, capsys):
    (tmp_path / "afile").write_text("user data")
    message = fails(["fit", "--config", config(tmp_path), "--experiments_root", str(tmp_path / "afile" / "runs")],
                    tmp_path, capsys)
    assert "under a regular file" in message and "afile" in message


def test_experiments_folder_that_cannot_be_written(tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", kwargs.get("dir"))

    monkeypatch.setattr("deepgaze_lit.failures.tempfile.mkstemp", refuse)
    message = fails(["fit", "--config", config(tmp_path)], tmp_path, capsys)
    assert message == f"--experiments_root/--experiment: cannot write {tmp_path / 'experiments' / 'bad'}: " \
                      "permission denied; choose a folder you can write to"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_experiments_folder(tmp_path, capsys):
    root = tmp_path / "readonly"
    root.mkdir()
    root.chmod(0o555)
    try:
        message = fails(["fit", "--config", config(tmp_path), "--experiments_root", str(root)], tmp_path, capsys)
    finally:
        root.chmod(0o755)
    assert "permission denied" in message


def test_writable_folder_probe_leaves_nothing_behind(tmp_path):
    assert require_writable_folder(tmp_path / "a" / "b", "--x") == tmp_path / "a" / "b"
    assert list((tmp_path / "a" / "b").iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is a file, not a folder"):
        require_writable_folder(tmp_path / "file", "--x")


# --- predict: outputs never land on inputs ----------------------------------------------------------------------

def photos(folder: Path, names=("one.png", "two.jpg")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(folder / name)
    return folder


@pytest.mark.parametrize("output", [".", "overlays"])
def test_predict_output_in_the_input_folder_is_refused(tmp_path, capsys, output):
    inputs = photos(tmp_path / "photos")
    output_dir = inputs / output
    message = fails(["predict", "--config", config(tmp_path), "--input", str(inputs),
                     "--output_dir", str(output_dir)], tmp_path, capsys)
    assert "output inside the input folder" in message
    assert sorted(path.name for path in inputs.iterdir()) == ["one.png", "two.jpg"], "nothing was created there"


def test_predict_output_folder_under_a_file(tmp_path, capsys):
    inputs = photos(tmp_path / "photos")
    (tmp_path / "notes.txt").write_text("user data")
    message = fails(["predict", "--config", config(tmp_path), "--input", str(inputs),
                     "--output_dir", str(tmp_path / "notes.txt" / "out")], tmp_path, capsys)
    assert "under a regular file" in message


def test_predict_inputs_whose_outputs_would_share_a_name_are_refused_before_writing(tmp_path, capsys):
    inputs = photos(tmp_path / "photos", names=("x.png", "x.jpg", "y.png"))
    output_dir = tmp_path / "out"
    message = fails(["predict", "--config", config(tmp_path), "--input", str(inputs),
                     "--output_dir", str(output_dir)], tmp_path, capsys)
    assert "x.png" in message and "x.jpg" in message
    assert not output_dir.exists() or not list(output_dir.iterdir())


# --- failures while running -------------------------------------------------------------------------------------

def test_full_disk_while_writing_a_checkpoint_keeps_the_previous_one_and_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 1}, target)
    previous = target.read_bytes()
    real_save = torch.save

    def save_until_full(obj, stream, *args, **kwargs):
        class Full:
            written = 0

            def write(self, data):
                Full.written += len(data)
                if Full.written > 300:
                    raise OSError(errno.ENOSPC, "No space left on device")
                return stream.write(data)

            def flush(self):
                stream.flush()

        real_save(obj, Full(), *args, **kwargs)

    monkeypatch.setattr(checkpoint_io.torch, "save", save_until_full)
    with pytest.raises(OSError) as raised:
        AtomicCheckpointIO().save_checkpoint({"global_step": 2, "weights": torch.ones(1000)}, target)
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(target)
    assert target.read_bytes() == previous
    assert sorted(path.name for path in tmp_path.iterdir()) == ["last.ckpt"]


@pytest.mark.slow
def test_full_disk_during_fit_is_reported_as_such(tmp_path, capsys, monkeypatch):
    def no_space(obj, stream, *args, **kwargs):
        stream.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos") from OSError(
            errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_io.torch, "save", no_space)
    message = fails(["fit", "--config", config(tmp_path, trainer={"max_epochs": 1})], tmp_path, capsys, status=1)
    folder = checkpoint_dir(tmp_path, "bad")
    assert message.startswith("no space left on device writing ") and str(folder) in message
    assert not list(folder.glob("*.tmp"))


def test_an_unexpected_error_is_one_line_asking_for_debug_which_shows_the_traceback(tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero\nsecond line")

    monkeypatch.setattr("deepgaze_lit.cli.gpu_settings_without_gpu", broken)
    message = fails(["fit", "--config", config(tmp_path)], tmp_path, capsys, status=1)
    assert message == ("unexpected ZeroDivisionError: division by zero second line. This is a bug in deepgaze: rerun "
                       "with --debug (or DEEPGAZE_DEBUG=1) for the traceback and report it")
    for args, environment in ((["--debug"], "0"), ([], "1")):
        monkeypatch.setenv("DEEPGAZE_DEBUG", environment)
        with pytest.raises(SystemExit) as exit_info:
            run_cli(["fit", "--config", config(tmp_path), *args], tmp_path)
        err = capsys.readouterr().err
        assert exit_info.value.code == 1 and "Traceback" in err and "broken" in err
        assert err.strip().splitlines()[-1].startswith(ERROR_PREFIX + "unexpected ZeroDivisionError")


# --- signals ----------------------------------------------------------------------------------------------------

def test_stop_signals_record_sigusr1_and_stop_at_sigterm_outside_training():
    signals = StopSignals().install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert signals.requeue_requested and signals.stop_requested
        with pytest.raises(Stopped) as stopped:
            os.kill(os.getpid(), signal.SIGTERM)
        assert stopped.value.code == 128 + signal.SIGTERM
        signals.training = True
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.received == [signal.SIGUSR1, signal.SIGTERM, signal.SIGTERM]
        assert signals.terminating_signal() == signal.SIGTERM
    finally:
        signals.restore()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigterm_during_fit_saves_last_after_the_step_and_exits_143(tmp_path):
    command = ["fit", "--config", str(write_config(tmp_path, "term")),
               *callback_args("SignalAtStep", step=3, signum=int(signal.SIGTERM))]
    log = tmp_path / "fit.log"
    assert run(command, base_env(), log) == 128 + signal.SIGTERM, log.read_text()
    assert load_checkpoint(checkpoint_dir(tmp_path, "term") / "last.ckpt")["global_step"] == 4
    text = log.read_text()
    assert "Traceback" not in text and "SIGTERM received: training state at global step 4 saved" in text
    assert text.strip().splitlines()[-1].startswith(ERROR_PREFIX + "stopped by SIGTERM")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigusr1_during_setup_is_not_lost_and_sigint_exits_130(tmp_path):
    command = ["fit", "--config", str(write_config(tmp_path, "early")), *callback_args("SignalAtSetup")]
    log = tmp_path / "fit.log"
    assert run(command, base_env(), log) == 128 + signal.SIGUSR1, log.read_text()
    assert load_checkpoint(checkpoint_dir(tmp_path, "early") / "last.ckpt")["global_step"] == 1
    interrupted = start(["fit", "--config", str(write_config(tmp_path, "interrupted")),
                         *callback_args("SignalAtStep", step=2, signum=int(signal.SIGINT))], base_env(),
                        tmp_path / "int.log")
    assert wait([interrupted]) == [128 + signal.SIGINT], (tmp_path / "int.log").read_text()
    assert (tmp_path / "int.log").read_text().strip().splitlines()[-1].startswith(ERROR_PREFIX + "stopped by SIGINT")
