"""`deepgaze` end to end on CPU: fit writes the experiment's checkpoints, TensorBoard and CSV logs and learns;
validate/test report (metrics.json with provenance, per-image CSV); resume; every shipped config parses; user
errors are one clear line."""

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import (IG_LINE, REPOSITORY, TINY_BATCH_SIZE, TINY_EPOCHS, TINY_TRAIN_IMAGES, run_cli, tiny_config,
                      write_config)
from deepgaze_lit import __version__
from deepgaze_lit.cli import main
from deepgaze_lit.experiment import CheckpointFolder, checkpoint_global_step
from deepgaze_lit.metrics.provenance import file_sha256
from deepgaze_lit.model.checkpoint import CheckpointMismatchError
from deepgaze_lit.module import DeepGazeModule

SHIPPED_CONFIGS = sorted(path for path in (REPOSITORY / "configs").glob("*.yaml")
                         if path.name != "deepgaze3_protocol.yaml")  # `deepgaze protocol`'s, tested in test_protocol
STEPS_PER_EPOCH = TINY_TRAIN_IMAGES // TINY_BATCH_SIZE


def events(log_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def test_fit_writes_best_last_and_every_fifth_epoch_checkpoints(trained_experiment):
    names = sorted(path.name for path in trained_experiment.checkpoints.iterdir())
    assert names == ["best.ckpt", "epoch004.ckpt", "last.ckpt"]
    last = torch.load(trained_experiment.checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == TINY_EPOCHS - 1
    assert last["global_step"] == TINY_EPOCHS * STEPS_PER_EPOCH
    assert last["hyper_parameters"]["num_components"] == 2


def test_fit_logs_scalars_and_a_validation_panel_every_epoch(trained_experiment):
    log_dir = trained_experiment.directory / "logs" / "version_0"
    accumulator = events(log_dir)
    scalars = set(accumulator.Tags()["scalars"])
    expected = {
        "train/loss_step", "train/loss_epoch", "train/nll_epoch", "val/loss", "val/ig_uniform", "val/ig",
        "val/nss", "val/auc", "val/sauc", "val/centerbias_ig_uniform", "val/gold_ig", "val/ig_explained",
        "lr-Adam", "finalizer/sigma", "finalizer/center_bias_weight",
    }
    assert expected <= scalars
    panels = accumulator.Images("val/prediction")
    assert len(panels) == TINY_EPOCHS
    assert panels[0].height == 192 and panels[0].width > 192
    assert [event.value for event in accumulator.Scalars("lr-Adam")] == pytest.approx([0.02] * TINY_EPOCHS)


def test_fit_writes_its_history_as_csv_beside_tensorboard(trained_experiment):
    with open(trained_experiment.directory / "logs" / "version_0" / "csv" / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    epoch_losses = [float(row["train/loss_epoch"]) for row in rows if row["train/loss_epoch"]]
    accumulator = events(trained_experiment.directory / "logs" / "version_0")
    assert epoch_losses == pytest.approx([event.value for event in accumulator.Scalars("train/loss_epoch")])
    assert len([row for row in rows if row["val/ig"]]) == TINY_EPOCHS


def test_fit_lowers_the_loss_and_ends_with_the_information_gain_line(trained_experiment):
    accumulator = events(trained_experiment.directory / "logs" / "version_0")
    losses = [event.value for event in accumulator.Scalars("train/loss_epoch")]
    assert len(losses) == TINY_EPOCHS
    assert losses[-1] < losses[0] - 0.05
    line = trained_experiment.stdout.strip().splitlines()[-1]
    match = IG_LINE.fullmatch(line)
    assert match, line
    val_ig = [event.value for event in accumulator.Scalars("val/ig")][-1]
    assert float(match.group(1)) == pytest.approx(val_ig, abs=1e-4)


def test_checkpoint_loads_with_load_from_checkpoint_and_refuses_another_architecture(trained_experiment):
    checkpoint = trained_experiment.checkpoints / "best.ckpt"
    module = DeepGazeModule.load_from_checkpoint(checkpoint, map_location="cpu")
    assert module.model.num_components == 2
    assert module.configure_optimizers().param_groups[0]["lr"] == 0.02
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(module.state_dict()[key], value) for key, value in saved.items())
    with pytest.raises(CheckpointMismatchError, match="different architecture"):
        DeepGazeModule.load_from_checkpoint(checkpoint, map_location="cpu", num_components=1)


@pytest.mark.parametrize("subcommand", ["validate", "test"])
def test_validate_and_test_from_the_checkpoint_write_a_report(trained_experiment, tmp_path, subcommand):
    checkpoint = trained_experiment.checkpoints / "best.ckpt"
    run_cli(
        [subcommand, "--config", str(trained_experiment.config), "--ckpt_path", str(checkpoint),
         "--experiment", f"tiny-{subcommand}"] + (["--data.test_images", "4"] if subcommand == "test" else []),
        tmp_path,
    )
    run_dir = tmp_path / "experiments" / f"tiny-{subcommand}" / "logs" / "version_0"
    report = json.loads((run_dir / "metrics.json").read_text())
    assert set(report) == {"model", "centerbias", "gold", "explained_information_gain", "provenance"}
    assert report["model"]["n_images"] == 4 and report["gold"]["ig_centerbias_bits_image"] > 0
    provenance = report["provenance"]
    assert provenance["checkpoint"] == {"path": str(checkpoint.resolve()), "sha256": file_sha256(checkpoint)}
    assert provenance["package_version"] == __version__ and provenance["weights"] is None
    data = provenance["data"]
    assert data["source"] == "synthetic" and data["synthetic_images"] == 12
    assert data["split"] == {"name": "val" if subcommand == "validate" else "test", "kind": "holdout", "images": 4,
                             "seed": 42, "val_images": 4, "test_images": 4 if subcommand == "test" else 0}
    assert data["resize"] == {"policy": "native", "max_side": None, "sizes": [[128, 192]]}
    assert data["centerbias"]["kind"] == "kde" and data["centerbias"]["fitted_on"] == "train"
    with open(run_dir / "metrics_per_image.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 4 and sum(int(row["fixations"]) for row in rows) == report["model"]["n_fixations"]
    assert len({row["image"] for row in rows}) == 4
    for metric in ("ll_nats", "ig_uniform_bits", "ig_centerbias_bits", "nss", "auc", "sauc", "cc", "kldiv", "sim"):
        column = [float(row[metric]) for row in rows]
        assert sum(column) / len(column) == pytest.approx(report["model"][f"{metric}_image"], rel=1e-9, abs=1e-12)
    assert "centre bias" in (run_dir / "metrics.txt").read_text()
    scalars = set(events(run_dir).Tags()["scalars"])
    prefix = "val" if subcommand == "validate" else "test"
    assert {f"{prefix}/loss", f"{prefix}/ig", f"{prefix}/nss", f"{prefix}/auc", f"{prefix}/gold_ig"} <= scalars


def test_validate_named_best_checkpoint_of_the_experiment(trained_experiment, tmp_path):
    shutil.copytree(trained_experiment.directory / "checkpoints", tmp_path / "experiments" / "tiny" / "checkpoints")
    run_cli(["validate", "--config", str(trained_experiment.config), "--ckpt_path", "best"], tmp_path)
    assert (tmp_path / "experiments" / "tiny" / "logs" / "version_0" / "metrics.json").is_file()


def test_fit_resumes_from_last(trained_experiment, tmp_path):
    shutil.copytree(trained_experiment.directory / "checkpoints", tmp_path / "experiments" / "tiny" / "checkpoints")
    run_cli(["fit", "--config", str(trained_experiment.config), "--ckpt_path", "last",
             "--trainer.max_epochs", str(TINY_EPOCHS + 1)], tmp_path)
    last = torch.load(tmp_path / "experiments" / "tiny" / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=True)
    assert last["epoch"] == TINY_EPOCHS
    assert last["global_step"] == (TINY_EPOCHS + 1) * STEPS_PER_EPOCH


def test_fit_continues_from_best(trained_experiment, tmp_path):
    checkpoints = tmp_path / "experiments" / "tiny" / "checkpoints"
    shutil.copytree(trained_experiment.directory / "checkpoints", checkpoints)
    best_epoch = torch.load(checkpoints / "best.ckpt", map_location="cpu", weights_only=True)["epoch"]
    assert best_epoch < TINY_EPOCHS - 2  # else continuing from best and from last could not be told apart
    best_step = (best_epoch + 1) * STEPS_PER_EPOCH
    later = {path.name for path in checkpoints.glob("*.ckpt") if checkpoint_global_step(path) > best_step}
    run_cli(["fit", "--config", str(trained_experiment.config), "--ckpt_path", "best",
             "--trainer.max_epochs", str(best_epoch + 2)], tmp_path)
    last = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == (best_epoch + 2) * STEPS_PER_EPOCH
    assert CheckpointFolder(checkpoints).newest() == checkpoints / "last.ckpt"
    assert {path.name for path in (tmp_path / "experiments" / "tiny" / "checkpoints.1").iterdir()} == later


@pytest.mark.parametrize("config", SHIPPED_CONFIGS, ids=[path.name for path in SHIPPED_CONFIGS])
def test_every_shipped_config_passes_print_config(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert f"experiment: {config.stem}" in printed
    assert "use_distributed_sampler: false" in printed


def test_use_distributed_sampler_defaults_to_false_without_a_config(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--print_config"])
    assert "use_distributed_sampler: false" in capsys.readouterr().out


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--model.no_such_option", "1"], "no_such_option"),
        (["--model.num_components", "many"], "num_components"),
    ],
)
def test_unknown_keys_and_wrong_types_fail_with_the_parser_message(arguments, message, capsys):
    quickstart = REPOSITORY / "configs" / "quickstart.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(quickstart), *arguments])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_gpu_config_without_gpu_says_how_to_run_on_cpu(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPOSITORY / "configs" / "baseline.yaml")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == (
        "deepgaze: error: no GPU found: run with --trainer.accelerator cpu --trainer.precision 32 "
        "--trainer.devices 1 --trainer.strategy auto"
    )


def test_missing_data_directory_is_one_line(tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", tiny_config(data={"source": "pysaliency", "path": str(tmp_path / "nope")}))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", "--config", str(config)], tmp_path)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("deepgaze: error: ") and "nope" in error


def test_released_weights_given_as_ckpt_path_point_to_init_from(tmp_path, capsys):
    weights = tmp_path / "deepgaze3.pth"
    torch.save({"finalizers.0.center_bias_weight": torch.ones(1)}, weights)
    config = write_config(tmp_path / "c.yaml", tiny_config())
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["validate", "--config", str(config), "--ckpt_path", str(weights)], tmp_path)
    assert exit_info.value.code == 2
    assert f"--model.init_from {weights}" in capsys.readouterr().err


@pytest.mark.parametrize("subcommand", ["validate", "fit"])
def test_missing_named_checkpoint_is_one_line(subcommand, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", tiny_config())
    with pytest.raises(SystemExit) as exit_info:
        run_cli([subcommand, "--config", str(config), "--ckpt_path", "best"], tmp_path)
    assert exit_info.value.code == 2
    assert "no best checkpoint of experiment 'tiny'" in capsys.readouterr().err
