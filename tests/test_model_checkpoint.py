"""Weight loading: torchvision backbone files, single-model (one fold) checkpoints, component extraction, reports."""

import re

import pytest
import torch
import torchvision

from deepgaze_lit import DeepGazeIII
from deepgaze_lit.model import extract_component, load_weights
from deepgaze_lit.model.checkpoint import ShapeMismatch


@pytest.fixture(scope="module")
def mixture():
    torch.manual_seed(0)
    return DeepGazeIII(num_components=3, scanpath=True, backbone_weights="none")


def single_model_state(seed, scanpath=True):
    """A reference-style single-model state dict: singular prefixes, random readout values, no backbone."""
    source = DeepGazeIII(num_components=1, scanpath=scanpath, backbone_weights="none")
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in source.state_dict().items():
        if key.startswith("features."):
            continue
        key = re.sub(r"^(saliency_network|scanpath_network|fixation_selection_network|finalizer)s\.0\.", r"\1.", key)
        state[key] = torch.randn(value.shape, generator=generator)
    return state


def test_backbone_from_local_pth_with_legacy_keys(tmp_path):
    torch.manual_seed(1)
    densenet = torchvision.models.densenet201()
    legacy = {  # the layout of torchvision's ImageNet file: "norm.1" keys, no num_batches_tracked
        re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v
        for k, v in densenet.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    path = tmp_path / "densenet201.pth"
    torch.save(legacy, path)
    model = DeepGazeIII(num_components=1, backbone_weights=str(path))
    loaded = model.features.features[1].state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in densenet.state_dict().items())
    torch.save({"not": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a torchvision densenet201 state dict"):
        DeepGazeIII(num_components=1, backbone_weights=str(tmp_path / "other.pth"))


def test_single_model_into_component(mixture, tmp_path):
    state = single_model_state(seed=2)
    path = tmp_path / "fold1.pth"
    torch.save(state, path)
    before = {k: v.clone() for k, v in mixture.state_dict().items()}
    report = mixture.load_weights(path, component=1)
    assert report.ok, str(report)
    after = mixture.state_dict()
    for key, value in state.items():
        plural = re.sub(r"^(\w*?)(network|finalizer)\.", r"\1\2s.1.", key)
        assert torch.equal(after[plural], value), key
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == {re.sub(r"^(\w*?)(network|finalizer)\.", r"\1\2s.1.", k) for k in state}
    with pytest.raises(ValueError, match="pass component=k"):
        mixture.load_weights(path)


def test_single_model_into_one_component_model_and_report():
    spatial_state = single_model_state(seed=3, scanpath=False)
    model = DeepGazeIII(num_components=1, scanpath=True, backbone_weights="none")
    with pytest.raises(ValueError, match=r"does not fit this model \(15 missing keys"):
        model.load_weights(spatial_state)
    report = model.load_weights(spatial_state, strict=False)
    assert len(report.missing) == 15 and not report.unexpected and not report.mismatched
    assert all(k.startswith("scanpath_networks.0.") or "part1" in k for k in report.missing)
    assert torch.equal(model.finalizers[0].gauss.sigma, spatial_state["finalizer.gauss.sigma"])
    state = single_model_state(seed=4)
    state["saliency_network.conv0.weight"] = torch.zeros(4, 2048, 1, 1)
    state["unknown.weight"] = torch.zeros(1)
    report = model.load_weights(state, strict=False)
    assert report.unexpected == ["unknown.weight"]
    assert report.mismatched == [ShapeMismatch("saliency_networks.0.conv0.weight", (4, 2048, 1, 1), (8, 2048, 1, 1))]
    assert "saliency_networks.0.conv0.weight (checkpoint (4, 2048, 1, 1), model (8, 2048, 1, 1))" in str(report)
    assert "1 unexpected keys: unknown.weight" in str(report)


def test_extract_component_of_mixture(mixture):
    state = mixture.state_dict()
    single = extract_component(state, 2)
    model = DeepGazeIII(num_components=1, scanpath=True, backbone_weights="none")
    model.load_state_dict(single, strict=True)
    assert torch.equal(model.saliency_networks[0].conv0.weight, mixture.saliency_networks[2].conv0.weight)
    assert torch.equal(model.features.features[1].classifier.weight, mixture.features.features[1].classifier.weight)
    other = DeepGazeIII(num_components=1, scanpath=True, backbone_weights="none")
    assert load_weights(other, state, component=2).ok
    assert torch.equal(other.finalizers[0].gauss.sigma, mixture.finalizers[2].gauss.sigma)
    with pytest.raises(ValueError, match=r"holds components \[0, 1, 2\]"):
        extract_component(state, 5)
    with pytest.raises(ValueError, match=r"12 missing keys.*52 unexpected keys"):
        DeepGazeIII(num_components=1, backbone_weights="none").load_weights(
            {k: v for k, v in state.items() if not k.startswith("scanpath")}
        )
