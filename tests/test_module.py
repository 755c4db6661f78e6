"""DeepGazeModule and its loss (`deepgaze_lit.loss`): the loss against the reference head vectors, the entropy
regulariser's sign, the probes."""

import math
import re

import lightning as L
import numpy as np
import pytest
import torch

from conftest import load_head_case
from deepgaze_lit.loss import (
    NUM_PROBES,
    bias_map_entropy,
    fixation_log_likelihood_bits,
    probe_inputs,
    weighted_nll_bits,
)
from deepgaze_lit.model import DeepGazeIII
from deepgaze_lit.model.checkpoint import CheckpointMismatchError
from deepgaze_lit.module import DeepGazeModule


def test_loss_equals_direct_computation_from_head_vectors():
    net, features, inputs, expected, _ = load_head_case("head_scanpath", True, 2)
    block = net.head(features, *inputs)
    expected = expected[:, 0].double().numpy()
    batch_size, height, width = expected.shape
    rng = np.random.default_rng(3)
    counts = [5, 1, 12]
    fix_batch = np.repeat(np.arange(batch_size), counts)
    fix_x = rng.uniform(0, width, size=fix_batch.size).astype(np.float32)
    fix_y = rng.uniform(0, height, size=fix_batch.size).astype(np.float32)
    weight = np.array([1.0, 0.25, 2.0], dtype=np.float32)

    ll_bits, fixation_counts = fixation_log_likelihood_bits(
        block, torch.from_numpy(fix_batch), torch.from_numpy(fix_x), torch.from_numpy(fix_y), batch_size
    )
    loss = weighted_nll_bits(ll_bits, fixation_counts, torch.from_numpy(weight))

    per_image = np.array([
        expected[b, fix_y[fix_batch == b].astype(int), fix_x[fix_batch == b].astype(int)].mean()
        for b in range(batch_size)
    ])
    direct_ll_bits = (per_image + math.log(height * width)) / math.log(2)
    normalised = weight / weight.mean()
    direct_loss = -np.mean(normalised * direct_ll_bits)
    assert fixation_counts.tolist() == counts
    np.testing.assert_allclose(ll_bits.detach().numpy(), direct_ll_bits, atol=2e-4)
    assert abs(loss.item() - direct_loss) < 2e-4


def test_loss_weighs_images_not_fixations_and_skips_samples_without_fixations():
    ll_bits = torch.tensor([1.0, 3.0, 100.0])
    counts = torch.tensor([1.0, 50.0, 0.0])
    assert float(weighted_nll_bits(ll_bits, counts, torch.ones(3))) == pytest.approx(-2.0)


def test_probes_are_sixteen_uniform_colours_with_uniform_centre_bias_and_central_history():
    probes = probe_inputs(64, 96, torch.device("cpu"))
    image = probes["image"]
    assert image.shape == (NUM_PROBES, 3, 64, 96) and image.dtype == torch.uint8
    colours = image[:, :, 0, 0]
    assert torch.equal(image, colours[:, :, None, None].expand_as(image))
    assert len({tuple(colour.tolist()) for colour in colours}) == NUM_PROBES
    assert set(colours.flatten().tolist()) == {0, 128, 255}
    assert torch.allclose(torch.logsumexp(probes["centerbias"].flatten(1), dim=1), torch.zeros(NUM_PROBES), atol=1e-5)
    assert torch.equal(probes["x_hist"][:, 0], torch.full((NUM_PROBES,), 48.0))
    assert torch.equal(probes["y_hist"][:, 0], torch.full((NUM_PROBES,), 32.0))
    assert torch.isnan(probes["x_hist"][:, 1:]).all()


def tiny_batch(seed: int = 0, batch_size: int = 4, size: int = 64) -> dict:
    """One training batch of random images with a central dummy history fixation and target fixations clustered
    in the top-left quarter (which the scanpath network can learn from the history encoding at any image size)."""
    generator = torch.Generator().manual_seed(seed)
    fix_batch = torch.arange(batch_size).repeat_interleave(6)
    history = torch.full((batch_size, 4), math.nan)
    history[:, 0] = size / 2
    return {
        "image": torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, generator=generator),
        "centerbias": torch.full((batch_size, size, size), -math.log(size * size)),
        "x_hist": history,
        "y_hist": history.clone(),
        "fix_batch": fix_batch,
        "fix_x": torch.rand(fix_batch.numel(), generator=generator) * size / 4,
        "fix_y": torch.rand(fix_batch.numel(), generator=generator) * size / 4,
        "weight": torch.ones(batch_size),
        "image_index": torch.arange(batch_size),
    }


def train_tiny(entropy_weight: float, entropy_mode: str = "bias_map", steps: int = 4) -> DeepGazeModule:
    L.seed_everything(0)
    module = DeepGazeModule(
        num_components=1,
        scanpath=True,
        backbone_weights="none",
        optimizer=lambda params: torch.optim.Adam(params, lr=0.05),
        entropy_weight=entropy_weight,
        entropy_mode=entropy_mode,
        entropy_every=1,
    )
    batch = tiny_batch()
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([batch] * steps, batch_size=None))
    return module


@pytest.fixture(scope="module")
def trained_without_entropy() -> DeepGazeModule:
    return train_tiny(0.0)


@pytest.mark.parametrize("mode", ["bias_map", "prediction"])
def test_positive_entropy_weight_raises_the_entropy(mode, trained_without_entropy):
    """NLL training on fixations clustered in one corner lowers the entropy; with entropy_weight 1 the
    regularised model's entropy (of the mode's kind) ends clearly higher."""

    def final_entropy(module: DeepGazeModule) -> float:
        with torch.no_grad():
            if mode == "bias_map":
                return float(bias_map_entropy(module.model, 64, 64))
            return float(module._block_log_density(tiny_batch(), "fit").entropy().mean())

    plain = final_entropy(trained_without_entropy)
    regularised = final_entropy(train_tiny(1.0, mode))
    uniform = math.log(64 * 64)
    assert plain < uniform - 0.5
    assert regularised > plain + 0.5 * (uniform - plain)


def test_bias_map_probing_restores_train_mode():
    module = DeepGazeModule(num_components=1, scanpath=True, backbone_weights="none")
    module.train()
    entropy = bias_map_entropy(module.model, 64, 64)
    assert module.model.training and module.training
    assert entropy.requires_grad and 0 < float(entropy) <= math.log(64 * 64) + 1e-4
    module.eval()
    bias_map_entropy(module.model, 64, 64)
    assert not module.model.training


def test_checkpoint_of_another_architecture_is_refused_in_one_sentence():
    module = DeepGazeModule(num_components=1, scanpath=False, backbone_weights="none")
    checkpoint = {"state_dict": DeepGazeModule(num_components=2, scanpath=False, backbone_weights="none").state_dict(),
                  "hyper_parameters": {"num_components": 2, "scanpath": False}}
    with pytest.raises(CheckpointMismatchError, match="different architecture.*num_components=2"):
        module.on_load_checkpoint(checkpoint)


def test_validate_then_fit_then_test_in_one_process():
    """Evaluation states are zeroed when an evaluation starts, so `validate` (inference mode) before `fit`
    (validation under no_grad) works."""
    from deepgaze_lit.data.datamodule import SaliencyDataModule

    data = SaliencyDataModule(synthetic_images=8, synthetic_sizes=[[64, 64]], val_images=2, test_images=2,
                              batch_size=2, image_cache_mb=0)
    module = DeepGazeModule(num_components=1, scanpath=False, backbone_weights="none")
    options = dict(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False)
    validated = L.Trainer(**options).validate(module, datamodule=data)[0]
    trainer = L.Trainer(**options)
    trainer.fit(module, datamodule=data)
    tested = trainer.test(module, datamodule=data)[0]
    assert set(validated) >= {"val/loss", "val/ig", "val/gold_ig"} and "test/ig" in tested
    assert tested["test/ig_uniform"] == pytest.approx(-tested["test/loss"], abs=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_validation_metrics_on_two_processes_equal_one_process():
    """5 validation images split unevenly over 2 gloo processes (ddp_spawn): loss and metrics are the same as
    in one process, because every accumulator sums and reduces by summation."""
    from deepgaze_lit.data.datamodule import SaliencyDataModule

    def validate(devices: int) -> dict:
        L.seed_everything(0)
        data = SaliencyDataModule(synthetic_images=8, synthetic_sizes=[[64, 64]], val_images=5, batch_size=2,
                                  image_cache_mb=0)
        module = DeepGazeModule(num_components=1, scanpath=False, backbone_weights="none")
        trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, use_distributed_sampler=False)
        trainer.validate(module, datamodule=data)
        return {name: float(value) for name, value in trainer.callback_metrics.items()}

    single, double = validate(1), validate(2)
    assert set(single) == set(double) and "val/sauc" in single
    for name, value in single.items():
        assert double[name] == pytest.approx(value, rel=1e-6, abs=1e-6), name


def test_component_loads_one_component_of_a_mixture(tmp_path):
    torch.manual_seed(1)
    mixture = DeepGazeIII(num_components=3, scanpath=True, backbone_weights="none")
    torch.save(mixture.state_dict(), tmp_path / "mixture.pth")
    module = DeepGazeModule(num_components=1, backbone_weights="none", init_from=str(tmp_path / "mixture.pth"),
                            component=2)
    loaded = module.model.state_dict()
    component_keys = [key for key in mixture.state_dict() if re.match(r"^\w+\.2\.", key)]
    assert len(component_keys) > 20
    for key in component_keys:
        assert torch.equal(loaded[re.sub(r"^(\w+)\.2\.", r"\1.0.", key)], mixture.state_dict()[key]), key
    with pytest.raises(ValueError, match="num_components 1"):
        DeepGazeModule(num_components=3, backbone_weights="none", component=2)


def test_init_from_weights_of_another_architecture_is_refused(tmp_path):
    torch.save({"unrelated.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointMismatchError, match="fits no readout parameter"):
        DeepGazeModule(num_components=1, backbone_weights="none", init_from=str(tmp_path / "other.pth"))
