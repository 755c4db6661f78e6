"""The protocol stage configs (configs/protocol/) state the published numbers and parse; the stage options
(downsample, freeze, the minimum-learning-rate stop) work through `deepgaze fit`."""

import math

import pytest
import torch
import yaml

from conftest import REPOSITORY, run_cli, tiny_config, write_config
from deepgaze_lit import DeepGazeIII
from deepgaze_lit.cli import main
from test_lr_stop import reference_epochs

PROTOCOL = REPOSITORY / "configs" / "protocol"
SALIENCY_LAYERS_0_1 = [f"saliency_networks.*.{layer}" for layer in
                       ("layernorm0", "conv0", "bias0", "layernorm1", "conv1", "bias1")]
EXPECTED = {
    # stage: (scanpath, downsample, lr, milestones, freeze, history, epochs until lr < 1e-7)
    "salicon_pretrain": (False, 1.5, 1e-3, [15, 30, 45, 60, 75, 90, 105, 120], None, "none", 75),
    "mit_spatial": (False, 2, 1e-3, [3, 6, 9, 12, 15, 18, 21, 24], None, "none", 15),
    "mit_scanpath_frozen": (True, 2, 1e-3, [10, 20, 30, 31, 32, 33, 34, 35], SALIENCY_LAYERS_0_1, "real", 32),
    "mit_scanpath_full": (True, 2, 1e-5, [3, 6, 9, 12, 15, 18, 21, 24], None, "real", 9),
}


def test_every_stage_has_one_config():
    assert sorted(path.stem for path in PROTOCOL.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("stage", list(EXPECTED))
def test_stage_config_states_the_protocol_and_parses(stage, capsys):
    scanpath, downsample, lr, milestones, freeze, history, epochs = EXPECTED[stage]
    config = yaml.safe_load((PROTOCOL / f"{stage}.yaml").read_text())
    model, data, trainer = config["model"], config["data"], config["trainer"]
    assert (model["num_components"], model["scanpath"], model["downsample"]) == (1, scanpath, downsample)
    assert model.get("freeze") == freeze
    assert model["optimizer"] == {"class_path": "torch.optim.Adam", "init_args": {"lr": lr}}
    assert model["lr_scheduler"]["init_args"] == {"milestones": milestones, "gamma": 0.1}
    assert trainer["callbacks"] == [{"class_path": "deepgaze_lit.lr_stop.StopAtMinimumLearningRate",
                                     "init_args": {"min_lr": 1e-7}}]
    assert reference_epochs(lr, milestones) == epochs <= trainer["max_epochs"]
    assert (data["batch_size"], data["history"], trainer["precision"]) == (4, history, 32)
    if stage == "salicon_pretrain":
        assert (data["centerbias_bandwidth"], data["centerbias_eps"]) == (0.0217, 2e-13)
    else:
        assert (data["split"], data["folds"], data["resize"], data["initial_fixation"]) == (
            "crossval", 10, "two_sizes", True)
        assert data["centerbias_bandwidth"] == 10 ** -1.6667673342543432
        assert data["centerbias_eps"] == 10 ** -14.884189168516073

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(PROTOCOL / f"{stage}.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert f"experiment: {stage}" in printed and f"downsample: {float(downsample)}" in printed


def test_fit_with_the_stage_options_stops_at_the_minimum_learning_rate(tmp_path):
    """`deepgaze fit` with downsample 1.5, a freeze list and the stop callback in YAML: 3 epochs (milestones 1, 2,
    3 bring 1e-5 below 1e-7) although max_epochs is 10; the frozen layers keep the values of `init_from`."""
    torch.manual_seed(1)
    start = {key: value for key, value in DeepGazeIII(1, scanpath=True, backbone_weights="none").state_dict().items()
             if not key.startswith("features.")}
    torch.save(start, tmp_path / "start.pth")
    config = tiny_config(
        trainer={"max_epochs": 10, "callbacks": [
            {"class_path": "deepgaze_lit.lr_stop.StopAtMinimumLearningRate", "init_args": {"min_lr": 1e-7}}]},
        model={"num_components": 1, "downsample": 1.5, "freeze": SALIENCY_LAYERS_0_1,
               "init_from": str(tmp_path / "start.pth"),
               "optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 1e-5}},
               "lr_scheduler": {"class_path": "torch.optim.lr_scheduler.MultiStepLR",
                                "init_args": {"milestones": [1, 2, 3], "gamma": 0.1}}},
    )
    run_cli(["fit", "--config", str(write_config(tmp_path / "stage.yaml", config))], tmp_path)
    checkpoints = tmp_path / "experiments" / "tiny" / "checkpoints"
    last = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 2  # epochs 0, 1, 2
    assert math.isclose(last["optimizer_states"][0]["param_groups"][0]["lr"], 1e-8)
    assert last["hyper_parameters"]["downsample"] == 1.5
    for name in ("layernorm0.weight", "conv0.weight", "bias0.bias", "layernorm1.bias", "conv1.weight", "bias1.bias"):
        key = f"saliency_networks.0.{name}"
        assert torch.equal(last["state_dict"][f"model.{key}"], start[key]), key
    key = "saliency_networks.0.conv2.weight"
    assert not torch.equal(last["state_dict"][f"model.{key}"], start[key])


def test_freeze_prefix_without_a_match_is_one_line(tmp_path, capsys):
    config = write_config(tmp_path / "bad.yaml", tiny_config(model={"freeze": ["saliency_network.0.conv0"]}))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", "--config", str(config)], tmp_path)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("deepgaze: error: model.freeze: 'saliency_network.0.conv0' matches no parameter")
