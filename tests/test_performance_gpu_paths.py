"""The GPU options of DeepGazeModule, exercised on the CPU where they can be (bf16 autocast, channels_last,
torch.compile of the head) and on a GPU when there is one (with pinned memory and non-blocking copies)."""

import math

import lightning as L
import pytest
import torch

from conftest import StepLosses, two_component_module
from deepgaze_lit.data.datamodule import SaliencyDataModule
from deepgaze_lit.module import DeepGazeModule


def datamodule(**options) -> SaliencyDataModule:
    settings = dict(source="synthetic", synthetic_images=6, synthetic_sizes=[(128, 160)], val_images=2, batch_size=2,
                    centerbias="uniform", history="dummy", image_cache_mb=0)
    settings.update(options)
    return SaliencyDataModule(**settings)


def fit(network: DeepGazeModule, accelerator: str = "cpu", precision: str = "32", steps: int = 2) -> list[float]:
    """Train `steps` steps; the step losses (bit/fix)."""
    losses = StepLosses()
    L.seed_everything(0)
    trainer = L.Trainer(accelerator=accelerator, devices=1, precision=precision, max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, use_distributed_sampler=False,
                        callbacks=[losses])
    trainer.fit(network, datamodule=datamodule())
    return losses.losses


@pytest.fixture(scope="module")
def float32_losses() -> list[float]:
    """The step losses of the default module in float32, eager, contiguous layout: what every option is compared
    with."""
    return fit(two_component_module())


@pytest.mark.timeout(300)
def test_bf16_mixed_precision_trains_close_to_float32(float32_losses):
    reference = float32_losses
    losses = fit(two_component_module(), precision="bf16-mixed")
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[0] == pytest.approx(reference[0], abs=0.02)


@pytest.mark.timeout(300)
def test_channels_last_trains_like_the_default_layout(float32_losses):
    network = two_component_module(channels_last=True)
    conv0 = network.model.features.features[1].features.conv0.weight
    assert conv0.is_contiguous(memory_format=torch.channels_last) and not conv0.is_contiguous()
    assert fit(network) == pytest.approx(float32_losses, rel=1e-5)


@pytest.mark.timeout(300)
def test_feature_cache_keeps_float32_and_bf16_features_apart():
    """Lightning's bf16 autocast is on when the module asks the cache: its features get their own namespace."""
    network = two_component_module(feature_cache_mb=64)
    fit(network, steps=2)
    assert network.feature_cache.stats.computed == 4
    fit(network, precision="bf16-mixed", steps=2)
    assert network.feature_cache.stats.computed == 8 and network.feature_cache.stats.memory_hits == 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_compiled_head_trains_like_the_eager_one(float32_losses, monkeypatch):
    """`compile_head` routes the head through torch.compile. The graph capture (dynamo + AOT autograd) is what is
    checked here: the `aot_eager` backend skips inductor's C++ code generation, which takes minutes on 2 cores."""
    compiled = []

    def compile_with_aot_eager(function, **options):
        compiled.append(function)
        return real_compile(function, backend="aot_eager", **options)

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", compile_with_aot_eager)
    network = two_component_module(compile_head=True)
    losses = fit(network)
    assert compiled == [network.model.head]
    assert losses == pytest.approx(float32_losses, rel=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.timeout(600)
def test_gpu_path_bf16_channels_last_pinned_memory_with_the_cache():
    network = two_component_module(channels_last=True, feature_cache_mb=64)
    data = datamodule()
    losses = StepLosses()
    trainer = L.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_epochs=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, use_distributed_sampler=False, callbacks=[losses])
    trainer.fit(network, datamodule=data)
    assert data.train_dataloader().pin_memory
    assert all(math.isfinite(loss) for loss in losses.losses) and len(losses.losses) == 4
    stats = network.feature_cache.stats
    assert stats.computed == 6 and stats.memory_hits == 6
    assert all(entry.is_pinned() for entries in network.feature_cache._memory.values() for entry in entries.values())
    assert torch.cuda.max_memory_allocated() > 0
