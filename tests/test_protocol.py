"""`deepgaze protocol`: the DeepGaze III protocol end to end on synthetic data (3 folds, backbone none, 1-2 epochs
per stage): chaining, freezing, fold disjointness, the pooled report, assembly, resume after a kill, bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import REPOSITORY, run_cli, tiny_config, write_config
from deepgaze_lit import DeepGazeIII
from deepgaze_lit.cli import main
from deepgaze_lit.data import SaliencyDataModule, crossval_split
from deepgaze_lit.protocol_results import CENTERBIAS_PER_IMAGE_FILE, COLUMNS, PER_IMAGE_FILE, REPORT_FILE
from protocol_probes import START_WEIGHTS

FOLDS = 3
PROTOCOL_TIMEOUT_S = 3600
"""The whole protocol takes minutes on 2 CPU cores (much longer on a loaded machine)."""
IMAGES = 12
SALIENCY_LAYERS_0_1 = [f"saliency_networks.*.{layer}" for layer in
                       ("layernorm0", "conv0", "bias0", "layernorm1", "conv1", "bias1")]
DATA = {"source": "synthetic", "synthetic_images": IMAGES, "synthetic_sizes": [[64, 96], [96, 64]],
        "synthetic_subjects": 1, "image_cache_mb": 0, "initial_fixation": True,
        "eval_batch_size": 16}
RECORD = {"class_path": "protocol_probes.RecordStartWeights"}
STAGES = {
    # name: (per_fold, epochs, model, data)
    "salicon": (False, 1, {"scanpath": False, "downsample": 1.5},
                {"split": "holdout", "val_images": 3, "centerbias": "kde", "history": "none", "targets": "image"}),
    "spatial": (True, 1, {"scanpath": False}, {"centerbias": "kde_crossval", "history": "none", "targets": "image"}),
    "scanpath_frozen": (True, 2, {"scanpath": True, "freeze": SALIENCY_LAYERS_0_1},
                        {"centerbias": "kde_crossval", "history": "real", "targets": "fixation", "batch_size": 8}),
    "scanpath_full": (True, 1, {"scanpath": True}, {"centerbias": "kde_crossval", "history": "real",
                                                    "targets": "fixation", "batch_size": 8}),
}


def protocol_config(folder: Path, stage_settings: dict | None = None) -> Path:
    """A protocol config in `folder` over four tiny stage configs written there."""
    stages = []
    for name, (per_fold, epochs, model, data) in STAGES.items():
        config = tiny_config(trainer={"max_epochs": epochs}, model={"num_components": 1, **model},
                             data={**DATA, "split": "crossval", **data})
        config["model"]["optimizer"]["init_args"]["lr"] = 0.01
        stage = {"name": name, "config": str(write_config(folder / f"{name}.yaml", config)), "per_fold": per_fold}
        if stage_settings and name in stage_settings:
            stage["settings"] = stage_settings[name]
        stages.append(stage)
    protocol = {"name": "dg3", "experiments_root": str(folder / "experiments"), "folds": FOLDS,
                "common": {"trainer": {"callbacks": [RECORD]}}, "stages": stages}
    return write_config(folder / "protocol.yaml", protocol)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The whole protocol, run once in-process."""
    folder = tmp_path_factory.mktemp("protocol")
    config = protocol_config(folder)
    stdout = run_cli(["protocol", "--config", str(config)], folder)
    return folder / "experiments" / "dg3", stdout


def result(root: Path, experiment: str) -> dict:
    return torch.load(root / experiment / "result.pth", map_location="cpu", weights_only=True)


def readout(state: dict) -> dict:
    return {key: value for key, value in state.items() if not key.startswith("features.")}


@pytest.mark.slow
@pytest.mark.timeout(PROTOCOL_TIMEOUT_S)
def test_each_stage_starts_from_the_previous_result_and_frozen_layers_stay(finished):
    root, _ = finished
    salicon = result(root, "salicon")
    for fold in range(FOLDS):
        chain = [("salicon", salicon)] + [(f"{name}_fold{fold}", result(root, f"{name}_fold{fold}"))
                                          for name in ("spatial", "scanpath_frozen", "scanpath_full")]
        for (_, previous), (experiment, current) in zip(chain, chain[1:]):
            start = torch.load(root / experiment / START_WEIGHTS, map_location="cpu", weights_only=True)
            shared = [key for key in previous if key in start]
            assert len(shared) >= len(readout(previous)), experiment  # every weight of the previous stage fits
            assert all(torch.equal(start[key], previous[key]) for key in shared), experiment
            assert not all(torch.equal(current[key], previous[key]) for key in readout(previous)), experiment
        spatial, frozen = chain[1][1], chain[2][1]
        frozen_keys = [key for key in spatial if key.startswith("saliency_networks.0.") and key.split(".")[2] in
                       ("layernorm0", "conv0", "bias0", "layernorm1", "conv1", "bias1")]
        assert len(frozen_keys) == 8
        assert all(torch.equal(frozen[key], spatial[key]) for key in frozen_keys)


@pytest.mark.slow
@pytest.mark.timeout(PROTOCOL_TIMEOUT_S)
def test_each_fold_is_scored_on_its_test_chunk_and_the_report_pools_every_image_once(finished):
    root, stdout = finished
    data = SaliencyDataModule(**{**DATA, "split": "crossval", "folds": FOLDS})
    for fold in range(FOLDS):
        train, val, test = crossval_split(IMAGES, FOLDS, fold)
        scored = [int(line.split(",")[1]) for line in
                  (root / "evaluation" / f"fold{fold}" / PER_IMAGE_FILE).read_text().splitlines()[1:]]
        assert sorted(scored) == sorted(test.tolist())
        assert not set(scored) & (set(train.tolist()) | set(val.tolist()))
        provenance = json.loads((root / "evaluation" / f"fold{fold}" / "provenance.json").read_text())
        assert provenance["data"]["fold"] == fold and provenance["data"]["centerbias"] == "kde_crossval"
        assert provenance["checkpoint"].endswith(f"scanpath_full_fold{fold}/result.pth")
        assert len(provenance["checkpoint_sha256"]) == 64
    lines = (root / "evaluation" / PER_IMAGE_FILE).read_text().splitlines()
    assert lines[0].split(",") == list(COLUMNS)
    assert sorted(int(line.split(",")[1]) for line in lines[1:]) == list(range(IMAGES))
    report = json.loads((root / "evaluation" / REPORT_FILE).read_text())
    assert report["images"] == IMAGES and report["folds"] == list(range(FOLDS))
    data.setup("fit")
    assert report["fixations"] == int(data._dataset.is_target.sum())
    for source in ("model", "centerbias"):
        for metric in ("LL", "IG", "NSS", "AUC"):
            assert np.isfinite(report[source][metric]["per_image"]), (source, metric)
            assert report[source][metric]["fold_standard_error"] >= 0
    assert report["centerbias"]["IG"]["per_image"] == 0.0
    assert "cross-validated report of 3 folds" in stdout


@pytest.mark.slow
@pytest.mark.timeout(PROTOCOL_TIMEOUT_S)
def test_component_k_of_the_assembled_mixture_is_fold_k(finished, tmp_path):
    root, _ = finished
    assembled = root / "dg3.pth"
    mixture = DeepGazeIII(FOLDS, scanpath=True, backbone_weights="none")
    assert mixture.load_weights(assembled).ok  # the released layout, every key filled
    saved = torch.load(assembled, map_location="cpu", weights_only=True)
    trained_on = DeepGazeIII(1, scanpath=True, backbone_weights="none").state_dict()
    backbone = [key for key in trained_on if key.startswith("features.")]
    assert backbone and all(torch.equal(saved[key], trained_on[key]) for key in backbone), "the backbone is saved"
    torch.manual_seed(3)
    image = torch.randint(0, 255, (2, 3, 96, 128), dtype=torch.uint8)
    centerbias = torch.log_softmax(torch.randn(2, 96 * 128), dim=1).reshape(2, 96, 128)
    x_hist = torch.tensor([[60.0, 30.0, float("nan"), float("nan")], [10.0, 20.0, 30.0, 40.0]])
    y_hist = torch.tensor([[50.0, 20.0, float("nan"), float("nan")], [40.0, 30.0, 20.0, 10.0]])
    for fold in range(FOLDS):
        fold_model = DeepGazeIII(1, scanpath=True, backbone_weights="none")
        assert fold_model.load_weights(root / f"scanpath_full_fold{fold}" / "result.pth").ok
        component = DeepGazeIII.from_release(assembled, component=fold)
        with torch.no_grad():
            assert torch.equal(component(image, centerbias, x_hist, y_hist), fold_model(image, centerbias, x_hist, y_hist))


@pytest.mark.slow
@pytest.mark.timeout(PROTOCOL_TIMEOUT_S)
def test_released_weights_are_scored_component_k_on_fold_k(finished):
    """Scoring the assembled file with --weights gives, fold by fold, the numbers of the fold models themselves."""
    root, _ = finished
    config = root.parents[1] / "protocol.yaml"
    run_cli(["protocol", "--config", str(config), "--weights", str(root / "dg3.pth")], root.parents[1])
    for fold in range(FOLDS):
        own = (root / "evaluation" / f"fold{fold}" / PER_IMAGE_FILE).read_text()
        release = (root / "evaluation_release" / f"fold{fold}" / PER_IMAGE_FILE).read_text()
        assert release == own
    assert (root / "evaluation_release" / REPORT_FILE).is_file()


@pytest.mark.slow
@pytest.mark.timeout(PROTOCOL_TIMEOUT_S)
def test_a_protocol_killed_in_stage_3_of_fold_1_resumes_to_the_same_weights(finished, tmp_path):
    """The finished run's stages other than fold 1's last two are copied in (and skipped: they are finished); the
    protocol is killed (SIGKILL) in epoch 1 of stage 3 of fold 1, and the same command run again resumes it from
    its last checkpoint and ends with the uninterrupted run's weights and mixture."""
    root, _ = finished
    again = tmp_path / "experiments" / "dg3"
    for experiment in ["salicon", "evaluation/fold0", "evaluation/fold2"] + [
            f"{name}_fold{fold}" for name in ("spatial", "scanpath_frozen", "scanpath_full") for fold in range(FOLDS)
            if name == "spatial" or fold != 1]:
        shutil.copytree(root / experiment, again / experiment)
    kill = {"class_path": "protocol_probes.KillOnce", "init_args": {"experiment": "scanpath_frozen_fold1", "epoch": 1}}
    config = protocol_config(tmp_path, {"scanpath_frozen": {"trainer": {"callbacks": [RECORD, kill]}}})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPOSITORY), str(REPOSITORY / "tests")])}
    command = [sys.executable, "-m", "deepgaze_lit.cli", "protocol", "--config", str(config)]
    killed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (again / "scanpath_frozen_fold1" / "killed_once").is_file()
    assert not (again / "scanpath_frozen_fold1" / "result.pth").exists()
    resumed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "spatial fold 1 is finished" in resumed.stdout
    assert "resuming from" in resumed.stderr + resumed.stdout
    for experiment in ("scanpath_frozen_fold1", "scanpath_full_fold1"):
        expected, got = result(root, experiment), result(again, experiment)
        assert expected.keys() == got.keys()
        assert all(torch.equal(got[key], expected[key]) for key in expected), experiment
    expected, got = (torch.load(path / "dg3.pth", map_location="cpu", weights_only=True) for path in (root, again))
    assert expected.keys() == got.keys() and all(torch.equal(got[key], expected[key]) for key in expected)
    assert (again / "evaluation" / PER_IMAGE_FILE).read_text() == (root / "evaluation" / PER_IMAGE_FILE).read_text()


def protocol_error(args: list[str], cwd: Path, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["protocol"] + args, cwd)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    return lines[-1]


def test_bad_fold_unknown_stage_and_missing_previous_stage_are_one_line_errors(tmp_path, capsys):
    config = str(protocol_config(tmp_path))
    error = protocol_error(["--config", config, "--fold", "3"], tmp_path, capsys)
    assert error == "deepgaze: error: protocol: fold 3 is outside 0..2 (folds: 3)"
    error = protocol_error(["--config", config, "--stage", "finetune"], tmp_path, capsys)
    assert error == ("deepgaze: error: protocol: no stage 'finetune'; the stages are salicon, spatial, "
                     "scanpath_frozen, scanpath_full, evaluate, assemble")
    error = protocol_error(["--config", config, "--fold", "1"], tmp_path, capsys)
    assert error.startswith("deepgaze: error: protocol: spatial fold 1 starts from stage salicon's result")
    assert error.endswith("which does not exist: run stage salicon first")
    error = protocol_error(["--config", config, "--stage", "assemble"], tmp_path, capsys)
    assert "run the protocol with --fold 0 first" in error
    assert not (tmp_path / "experiments" / "dg3" / "spatial_fold1" / "checkpoints").exists()


def test_the_shipped_protocol_config_prints_and_names_the_stage_configs(capsys):
    path = REPOSITORY / "configs" / "deepgaze3_protocol.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(["protocol", "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["folds"] == 10 and printed["handoff"] == "final"
    assert [stage["name"] for stage in printed["stages"]] == ["salicon", "spatial", "scanpath_frozen", "scanpath_full"]
    assert [stage["per_fold"] for stage in printed["stages"]] == [False, True, True, True]
    for stage in printed["stages"]:
        assert (REPOSITORY / stage["config"]).is_file()
        if stage["per_fold"]:
            assert stage["settings"]["data"]["centerbias"] == "kde_crossval"


def test_pooled_report_weights_fixations_and_gives_the_standard_error_over_folds(tmp_path):
    """Two folds of hand-made per-image rows: per-fixation means weight images by fixations, per-image means do
    not, and the standard error is that of the two fold means."""
    from deepgaze_lit.protocol_results import pooled_report, write_rows

    def row(image_id, fold, fixations, value):
        metrics = {metric: value for metric in ("LL", "IG", "NSS", "AUC", "sAUC", "CC", "KLDiv", "SIM")}
        metrics["CC"] = float("nan")
        return {"image": f"i{image_id}.jpg", "image_id": image_id, "fold": fold, "fixations": fixations, **metrics}

    folders = {}
    for fold, rows in {0: [row(0, 0, 1, 1.0), row(1, 0, 3, 2.0)], 1: [row(2, 1, 4, 4.0)]}.items():
        folders[fold] = tmp_path / f"fold{fold}"
        write_rows(folders[fold] / PER_IMAGE_FILE, rows)
        write_rows(folders[fold] / CENTERBIAS_PER_IMAGE_FILE, [{**r, "IG": 0.0} for r in rows])
        (folders[fold] / "provenance.json").write_text("{}")
    report = pooled_report(folders, tmp_path / "pooled")
    nss = report["model"]["NSS"]
    assert nss["per_fixation"] == pytest.approx((1 * 1 + 3 * 2 + 4 * 4) / 8)
    assert nss["per_image"] == pytest.approx(7 / 3)
    assert nss["fold_mean"] == pytest.approx((1.5 + 4.0) / 2)
    assert nss["fold_standard_error"] == pytest.approx(np.std([1.5, 4.0], ddof=1) / np.sqrt(2))
    assert report["model"]["SIM"]["per_fixation"] is None and report["model"]["CC"]["per_image"] is None
    assert report["images"] == 3 and report["fixations"] == 8
    write_rows(folders[1] / PER_IMAGE_FILE, [row(1, 1, 4, 4.0)])
    with pytest.raises(ValueError, match=r"images \[1\] were scored by more than one fold"):
        pooled_report(folders, tmp_path / "pooled")


@pytest.mark.parametrize("extra, expected", [([], ["--fold", "3"]), (["--stage", "salicon"], ["--stage", "salicon"])])
def test_protocol_sbatch_runs_one_fold_per_array_task(tmp_path, extra, expected):
    script = REPOSITORY / "slurm" / "protocol.sbatch"
    text = script.read_text()
    for option in ("#SBATCH --array=0-9", "#SBATCH --signal=SIGUSR1@90", "#SBATCH --requeue"):
        assert option in text
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    recorded = tmp_path / "srun.txt"
    (fake_bin / "srun").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{recorded}"\n')
    (fake_bin / "srun").chmod(0o755)
    env = {"PATH": f"{fake_bin}:/usr/bin:/bin", "SLURM_SUBMIT_DIR": str(tmp_path), "SLURM_JOB_ID": "77",
           "SLURM_ARRAY_TASK_ID": "3", "SLURM_JOB_NODELIST": "gpu01", "SLURM_CPUS_PER_TASK": "10"}
    completed = subprocess.run(["bash", str(script)] + extra, env=env, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    assert recorded.read_text().splitlines() == ["deepgaze", "protocol", "--config",
                                                 "configs/deepgaze3_protocol.yaml"] + expected
