"""Checkpoint formats: training checkpoints without the frozen backbone (rebuilt and checked on load), the plain
network of a checkpoint (`DeepGazeIII.from_checkpoint`), `deepgaze export` to the release layout, and `init_from`
with this project's own files (stage chaining)."""

import shutil

import lightning as L
import pytest
import torch
import torchvision

from conftest import DATA, TINY_EPOCHS, run_cli, tiny_config, write_config
from deepgaze_lit import DeepGazeIII
from deepgaze_lit.cli import main
from deepgaze_lit.export import export_checkpoint
from deepgaze_lit.model.backbone import DenseNetFeatures
from deepgaze_lit.model.checkpoint import (BACKBONE_RECORD, CheckpointMismatchError, backbone_fingerprint,
                                           network_state)
from deepgaze_lit.module import DeepGazeModule

BACKBONE_KEY = "model.features."
HEIGHT, WIDTH = 128, 192


def network_inputs(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """One image (1,3,128,192) uint8, a uniform centre bias (1,128,192) and a history of two fixations (1,4)."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (1, 3, HEIGHT, WIDTH), dtype=torch.uint8, generator=generator)
    centerbias = torch.full((1, HEIGHT, WIDTH), -torch.log(torch.tensor(HEIGHT * WIDTH * 1.0)).item())
    x_hist = torch.tensor([[100.0, 40.0, float("nan"), float("nan")]])
    y_hist = torch.tensor([[60.0, 90.0, float("nan"), float("nan")]])
    return image, centerbias, x_hist, y_hist


def load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def full_checkpoint(lean: dict) -> dict:
    """The checkpoint as written before backbones were left out: backbone tensors included, no record."""
    full = dict(lean)
    full.pop(BACKBONE_RECORD)
    backbone = DeepGazeIII(1, scanpath=False, backbone_weights="none").state_dict()
    full["state_dict"] = {**lean["state_dict"], **{f"model.{key}": value for key, value in backbone.items()
                                                   if key.startswith("features.")}}
    return full


def test_checkpoints_leave_the_backbone_out_and_record_it(trained_experiment):
    checkpoint = load(trained_experiment.checkpoints / "last.ckpt")
    assert not any(key.startswith(BACKBONE_KEY) for key in checkpoint["state_dict"])
    assert len(checkpoint["state_dict"]) == 2 * 38  # the readout tensors of 2 scanpath components
    record = checkpoint[BACKBONE_RECORD]
    random_backbone = DeepGazeIII(1, scanpath=False, backbone_weights="none").state_dict()
    assert record == {"backbone_weights": "none", "fingerprint": backbone_fingerprint(random_backbone),
                      "from_weights": True}
    assert (trained_experiment.checkpoints / "last.ckpt").stat().st_size < 2**20  # a full one: about 80 MB


def test_random_backbone_is_the_same_whenever_it_is_built_and_draws_as_torchvision_does():
    torch.manual_seed(5)
    first = DenseNetFeatures("none")
    after_first = torch.rand(3)
    torch.manual_seed(5)
    torchvision.models.densenet201()
    assert torch.equal(torch.rand(3), after_first)  # the global random state moves as it did before seeding
    second = DenseNetFeatures("none")
    conv = "features.1.features.denseblock2.denselayer3.conv1.weight"
    assert torch.equal(first.state_dict()[conv], second.state_dict()[conv])
    assert first.state_dict()[conv].std() > 0.01


def test_option_keeps_the_backbone_in_checkpoints():
    module = DeepGazeModule(num_components=1, scanpath=False, backbone_weights="none", checkpoint_backbone=True)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert sum(key.startswith(BACKBONE_KEY) for key in checkpoint["state_dict"]) == 1207
    assert checkpoint[BACKBONE_RECORD]["from_weights"]


def test_lean_and_old_full_checkpoints_load_to_the_same_module(trained_experiment, tmp_path):
    lean = trained_experiment.checkpoints / "best.ckpt"
    torch.save(full_checkpoint(load(lean)), tmp_path / "full.ckpt")
    from_lean = DeepGazeModule.load_from_checkpoint(lean, map_location="cpu")
    from_full = DeepGazeModule.load_from_checkpoint(tmp_path / "full.ckpt", map_location="cpu")
    full_state = load(tmp_path / "full.ckpt")["state_dict"]
    assert set(from_lean.state_dict()) == set(full_state)
    for key, value in from_lean.state_dict().items():
        assert torch.equal(value, full_state[key]) and torch.equal(from_full.state_dict()[key], value), key


def test_resuming_from_a_lean_or_an_old_full_checkpoint_ends_with_identical_weights(trained_experiment, tmp_path):
    final = {}
    for kind in ("lean", "full"):
        checkpoints = tmp_path / kind / "experiments" / "tiny" / "checkpoints"
        shutil.copytree(trained_experiment.checkpoints, checkpoints)
        if kind == "full":
            torch.save(full_checkpoint(load(checkpoints / "last.ckpt")), checkpoints / "last.ckpt")
        run_cli(["fit", "--config", str(trained_experiment.config), "--ckpt_path", "last",
                 "--trainer.max_epochs", str(TINY_EPOCHS + 1)], tmp_path / kind)
        final[kind] = load(checkpoints / "last.ckpt")
    assert final["lean"]["epoch"] == TINY_EPOCHS
    assert not any(key.startswith(BACKBONE_KEY) for key in final["full"]["state_dict"])  # written lean again
    assert final["lean"]["state_dict"].keys() == final["full"]["state_dict"].keys()
    for key, value in final["lean"]["state_dict"].items():
        assert torch.equal(value, final["full"]["state_dict"][key]), key


def test_another_backbone_than_the_trained_one_is_refused(trained_experiment, tmp_path):
    torch.save(torchvision.models.densenet201().state_dict(), tmp_path / "other_densenet.pth")
    with pytest.raises(CheckpointMismatchError, match="another frozen backbone"):
        DeepGazeModule.load_from_checkpoint(trained_experiment.checkpoints / "best.ckpt", map_location="cpu",
                                            backbone_weights=str(tmp_path / "other_densenet.pth"))
    with pytest.raises(CheckpointMismatchError, match="another frozen backbone.*set model.backbone_weights"):
        DeepGazeIII.from_checkpoint(trained_experiment.checkpoints / "best.ckpt",
                                    backbone_weights=tmp_path / "other_densenet.pth")


def test_missing_backbone_weights_file_is_one_line_naming_it(trained_experiment, tmp_path, capsys):
    checkpoint = load(trained_experiment.checkpoints / "best.ckpt")
    checkpoint[BACKBONE_RECORD]["backbone_weights"] = str(tmp_path / "moved" / "densenet201.pth")
    torch.save(checkpoint, tmp_path / "moved.ckpt")
    with pytest.raises(FileNotFoundError, match=r"moved/densenet201.pth does not exist.*model.backbone_weights"):
        DeepGazeIII.from_checkpoint(tmp_path / "moved.ckpt")
    shutil.copytree(trained_experiment.checkpoints, tmp_path / "experiments" / "tiny" / "checkpoints")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["validate", "--config", str(trained_experiment.config), "--ckpt_path", "best",
                 "--model.backbone_weights", str(tmp_path / "missing.pth")], tmp_path)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("deepgaze: error: ") and "saved without its frozen backbone" in error
    assert f"{tmp_path / 'missing.pth'} does not exist" in error


def test_from_checkpoint_is_the_modules_network(trained_experiment):
    checkpoint = trained_experiment.checkpoints / "best.ckpt"
    network = DeepGazeIII.from_checkpoint(checkpoint)
    module = DeepGazeModule.load_from_checkpoint(checkpoint, map_location="cpu")
    assert network.num_components == 2 and network.scanpath
    with torch.no_grad():
        expected = module(*network_inputs())
        assert torch.equal(network(*network_inputs()), expected)
    assert torch.logsumexp(expected.flatten(), 0).abs() < 1e-5


def test_export_round_trips_through_from_release(trained_experiment, tmp_path, capsys):
    checkpoint = trained_experiment.checkpoints / "best.ckpt"
    output = tmp_path / "model.pth"
    main(["export", "--ckpt_path", "best", "--output", str(output),
          "--experiment", "tiny", "--experiments_root", str(trained_experiment.directory.parent)])
    printed = capsys.readouterr().out
    assert f"wrote {output} (" in printed and "1283 keys loaded, 0 initialised fresh, 0 ignored" in printed
    released = DeepGazeIII.from_release(output)
    with torch.no_grad():
        expected = DeepGazeIII.from_checkpoint(checkpoint)(*network_inputs(1))
        assert torch.allclose(released(*network_inputs(1)), expected, rtol=0, atol=1e-6)
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--ckpt_path", str(checkpoint), "--output", str(output)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"deepgaze: error: {output} exists: choose another --output or pass --overwrite")
    with pytest.raises(SystemExit):
        main(["export", "--ckpt_path", "last", "--output", str(tmp_path / "x.pth"), "--experiment", "nothing"])
    assert "no last checkpoint of experiment 'nothing'" in capsys.readouterr().err


def test_export_of_a_ten_component_model_has_the_release_layout(tmp_path):
    """Keys, shapes and dtypes of the exported file equal the released deepgaze3.pth's (tests/data/*.tsv)."""
    module = DeepGazeModule(num_components=10, scanpath=True, backbone_weights="none")
    checkpoint = {"state_dict": module.state_dict(), "global_step": 0,
                  "hyper_parameters": {"num_components": 10, "scanpath": True, "backbone_weights": "none",
                                       "downsample": 2.0}}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "ten.ckpt")
    export_checkpoint(tmp_path / "ten.ckpt", tmp_path / "ten.pth")
    exported = load(tmp_path / "ten.pth")
    release = [line.split("\t") for line in (DATA / "deepgaze3_state_dict.tsv").read_text().splitlines()[1:]]
    assert list(exported) == [key for key, _, _ in release]
    for key, shape, dtype in release:
        assert ("x".join(map(str, exported[key].shape)) or "scalar") == shape, key
        assert str(exported[key].dtype) == dtype, key


class FirstStepWeights(L.Callback):
    """Saves the network's state dict at the start of the first training step to `path`."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 0:
            torch.save(pl_module.model.state_dict(), self.path)


def test_stage_chaining_starts_from_the_previous_stages_weights(tmp_path, caplog):
    """A spatial stage's last.ckpt as init_from of a scanpath stage: its first training step starts from the
    spatial weights (saliency network, finalizer, fixation selection's saliency input); the scanpath network keeps
    its fresh initialisation, and the key report says so. A mixture of another size is refused with the fix."""
    spatial = tiny_config(experiment="spatial", trainer={"max_epochs": 1},
                          model={"num_components": 1, "scanpath": False})
    run_cli(["fit", "--config", str(write_config(tmp_path / "spatial.yaml", spatial))], tmp_path)
    previous = tmp_path / "experiments" / "spatial" / "checkpoints" / "last.ckpt"
    probe = {"class_path": "test_checkpoint_format.FirstStepWeights", "init_args": {"path": str(tmp_path / "w.pt")}}
    scanpath = tiny_config(experiment="scanpath", trainer={"max_epochs": 1, "callbacks": [probe]},
                           model={"num_components": 1, "scanpath": True, "init_from": str(previous)})
    run_cli(["fit", "--config", str(write_config(tmp_path / "scanpath.yaml", scanpath))], tmp_path)
    report = [record.message for record in caplog.records if record.message.startswith("init_from")]
    assert len(report) == 1 and "23 keys loaded, 15 initialised fresh (scanpath_networks.0." in report[0]
    assert report[0].endswith("0 ignored")
    trained = network_state(load(previous)["state_dict"])
    first_step = torch.load(tmp_path / "w.pt", weights_only=True)
    assert len(trained) == 23
    for key, value in trained.items():
        assert torch.equal(first_step[key], value), key
    scanpath_keys = [key for key in first_step if key.startswith("scanpath_networks.0.")]
    assert len(scanpath_keys) == 12
    with pytest.raises(CheckpointMismatchError, match="holds 1 mixture components, this model 2: set "
                                                      "model.num_components 1"):
        DeepGazeModule(num_components=2, backbone_weights="none", init_from=str(previous))
