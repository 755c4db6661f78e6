"""`model.freeze`: parameters under the given name prefixes stay bit-identical through training and are not given to
the optimiser; a prefix that matches nothing is a one-line error."""

import lightning as L
import pytest
import torch

from deepgaze_lit import DeepGazeIII
from deepgaze_lit.data import SaliencyDataModule
from deepgaze_lit.model.errors import ModelConfigError
from deepgaze_lit.model.freeze import freeze_parameters, prefix_matches
from deepgaze_lit.module import DeepGazeModule

STAGE3_FREEZE = [f"saliency_networks.*.{layer}" for layer in
                 ("layernorm0", "conv0", "bias0", "layernorm1", "conv1", "bias1")]
"""The reference's stage 3: the first two saliency layers of every component."""


def test_prefixes_match_whole_segments_and_wildcards():
    assert prefix_matches("saliency_networks.0.conv1", "saliency_networks.0.conv1.weight")
    assert not prefix_matches("saliency_networks.0.conv1", "saliency_networks.0.conv10.weight")
    assert not prefix_matches("saliency_networks.0.conv", "saliency_networks.0.conv1.weight")
    assert prefix_matches("saliency_networks.*.bias0", "saliency_networks.7.bias0.bias")
    assert prefix_matches("finalizers.1.gauss.sigma", "finalizers.1.gauss.sigma")
    assert not prefix_matches("finalizers.1.gauss.sigma.x", "finalizers.1.gauss.sigma")


def test_stage3_prefixes_freeze_the_first_two_saliency_layers_of_every_component():
    model = DeepGazeIII(num_components=2, scanpath=True, backbone_weights="none")
    frozen = freeze_parameters(model, STAGE3_FREEZE)
    expected = [f"saliency_networks.{k}.{name}" for k in (0, 1) for name in (
        "layernorm0.weight", "layernorm0.bias", "conv0.weight", "bias0.bias",
        "layernorm1.weight", "layernorm1.bias", "conv1.weight", "bias1.bias")]
    assert frozen == expected
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert not set(trainable) & set(expected)
    assert "saliency_networks.1.conv2.weight" in trainable and len(trainable) == 2 * 38 - len(expected)


def test_a_prefix_that_matches_nothing_is_one_line_naming_valid_ones():
    model = DeepGazeIII(num_components=1, scanpath=True, backbone_weights="none")
    with pytest.raises(ModelConfigError) as error:
        freeze_parameters(model, ["saliency_networks.0.conv0", "saliency_network.0.conv0"])
    message = str(error.value)
    assert "\n" not in message
    assert "'saliency_network.0.conv0' matches no parameter" in message
    assert "saliency_networks.0.layernorm0" in message and "scanpath_networks.0.encoding0" in message
    assert all(parameter.requires_grad for name, parameter in model.named_parameters()
               if not name.startswith("features."))  # nothing frozen when one prefix is wrong
    with pytest.raises(ModelConfigError, match="'saliency_networks.1' matches no parameter"):
        DeepGazeModule(num_components=1, backbone_weights="none", freeze=["saliency_networks.1"])


def test_training_leaves_frozen_parameters_bit_identical_and_outside_the_optimiser():
    L.seed_everything(0)
    module = DeepGazeModule(
        num_components=1, scanpath=True, backbone_weights="none", freeze=STAGE3_FREEZE,
        optimizer=lambda parameters: torch.optim.Adam(parameters, lr=1e-2, weight_decay=0.1),
    )
    before = {name: value.clone() for name, value in module.model.state_dict().items()}
    data = SaliencyDataModule(synthetic_images=6, synthetic_sizes=[[64, 64]], val_images=2, batch_size=2,
                              history="dummy", image_cache_mb=0)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        use_distributed_sampler=False)
    trainer.fit(module, datamodule=data)

    after = module.model.state_dict()
    frozen = [name for name in before if any(prefix_matches(prefix, name) for prefix in STAGE3_FREEZE)]
    assert len(frozen) == 8
    for name in frozen:
        assert torch.equal(after[name], before[name]), name
    for name in ("saliency_networks.0.conv2.weight", "saliency_networks.0.layernorm2.weight",
                 "fixation_selection_networks.0.conv0.conv_part0.weight", "scanpath_networks.0.conv1.weight",
                 "finalizers.0.gauss.sigma"):
        assert not torch.equal(after[name], before[name]), name

    optimised = {id(parameter) for group in trainer.optimizers[0].param_groups for parameter in group["params"]}
    parameters = dict(module.model.named_parameters())
    assert optimised == {id(parameter) for name, parameter in parameters.items() if name not in frozen}
    assert not optimised & {id(parameters[name]) for name in frozen}
