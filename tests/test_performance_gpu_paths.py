"""The GPU options of DeepGazeModule, exercised on the CPU where they can be (bf16 autocast, channels_last,
torch.compile of the head) and on a GPU when there is one (with pinned memory and non-blocking copies)."""

import math

import lightning as L
import pytest
import torch

from conftest import StepLosses, two_component_module
from deepgaze_lit import DeepGazeIII
from deepgaze_lit.data.datamodule import SaliencyDataModule
from deepgaze_lit.model import fused
from deepgaze_lit.module import DeepGazeModule
from naive_deepgaze import randomise_readout


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


def head_step(model, inputs, autocast_dtype=None, head=None):
    """Loss (-mean log density at the fixations, nats) and the gradient of every readout parameter after one
    forward and backward pass of `head` (default: the model's own) under optional autocast on the inputs' device."""
    features, centerbias, x_hist, y_hist, fix_batch, fix_x, fix_y = inputs
    model.zero_grad(set_to_none=True)
    device = features.device.type
    with torch.autocast(device, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        density = (head or model.head)(features, centerbias, x_hist, y_hist)
        loss = -density.at(fix_batch, fix_x, fix_y).mean()
    loss.backward()
    return loss.detach().double(), {name: p.grad.double() for name, p in model.named_parameters() if p.grad is not None}


def tiny_head_setup(components, dtype=torch.float32, height=64, width=96, device="cpu"):
    """A scanpath model with random readout parameters and head inputs whose two samples share one history."""
    torch.manual_seed(0)
    model = DeepGazeIII(num_components=components, scanpath=True, backbone_weights="none")
    randomise_readout(model, seed=3)
    model = model.to(dtype)
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(2, 2048, 2, 3, generator=generator).to(dtype)
    centerbias = torch.randn(2, height * width, generator=generator).log_softmax(-1).view(2, height, width).to(dtype)
    x_hist = (torch.rand(1, 4, generator=generator) * width).expand(2, -1).clone().to(dtype)
    y_hist = (torch.rand(1, 4, generator=generator) * height).expand(2, -1).clone().to(dtype)
    x_hist[:, 3] = y_hist[:, 3] = float("nan")
    fix_batch = torch.arange(2).repeat_interleave(6)
    fix_x = torch.rand(12, generator=generator) * width
    fix_y = torch.rand(12, generator=generator) * height
    inputs = (features, centerbias, x_hist, y_hist, fix_batch, fix_x, fix_y)
    return model.to(device), tuple(tensor.to(device) for tensor in inputs)


def relative_gradient_error(gradients, expected):
    """|g - g_ref| / |g_ref| over all readout gradients together."""
    assert gradients.keys() == expected.keys()
    difference = sum((gradients[name] - expected[name]).square().sum() for name in expected)
    return float(difference.sqrt() / sum(value.square().sum() for value in expected.values()).sqrt())


def test_head_path_taken_under_compile_computes_the_same_in_eager_mode(monkeypatch):
    """Under torch.compile the head uses the plain layers (no fused autograd Function, F.softplus, one scanpath
    evaluation per sample); run eagerly with that selection, it gives the default path's loss and gradients
    (float64)."""
    model, inputs = tiny_head_setup(components=2, dtype=torch.float64)
    expected_loss, expected_gradients = head_step(model, inputs)
    fused_calls = []
    real_apply = fused._ConvSoftplusLayerNormConv.apply
    monkeypatch.setattr(fused._ConvSoftplusLayerNormConv, "apply", lambda *a: fused_calls.append(1) or real_apply(*a))
    head_step(model, inputs)
    assert len(fused_calls) == 4  # 2 components x (scanpath, fixation selection) on the default path
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    loss, gradients = head_step(model, inputs)
    assert len(fused_calls) == 4
    assert float(loss) == pytest.approx(float(expected_loss), rel=1e-12)
    assert relative_gradient_error(gradients, expected_gradients) < 1e-10


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16], ids=["float32", "bf16"])
def test_inductor_compiled_head_matches_the_eager_float32_head(autocast_dtype):
    """torch.compile (inductor, C++ code generation on the CPU) of the head, forward and backward, 1 component at
    64x96: float32 within 1e-4 of eager float32 (loss relative, gradients relative over all of them); under bf16
    autocast the loss within 0.02 nats and the gradients within 5 % (the bf16 tolerance of the training test)."""
    model, inputs = tiny_head_setup(components=1)
    expected_loss, expected_gradients = head_step(model, inputs)
    torch._dynamo.reset()
    compiled = torch.compile(model.head, dynamic=False)
    for _ in range(2):  # the second call runs the cached graphs
        loss, gradients = head_step(model, inputs, autocast_dtype, head=compiled)
    if autocast_dtype is None:
        assert float(loss) == pytest.approx(float(expected_loss), rel=1e-4)
        assert relative_gradient_error(gradients, expected_gradients) < 1e-4
    else:
        assert float(loss) == pytest.approx(float(expected_loss), abs=0.02)
        assert relative_gradient_error(gradients, expected_gradients) < 0.05


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.timeout(600)
def test_gpu_compiled_bf16_head_matches_the_eager_float32_head():
    """On the GPU: eager and compiled (inductor, Triton) head under bf16 autocast against eager float32, 2 components
    at 128x192, loss within 0.02 nats and gradients within 5 %; the compiled head is also run in float32 (1e-3:
    TF32 may be on)."""
    model, inputs = tiny_head_setup(components=2, height=128, width=192, device="cuda")
    expected_loss, expected_gradients = head_step(model, inputs)
    eager_loss, eager_gradients = head_step(model, inputs, torch.bfloat16)
    torch._dynamo.reset()
    compiled = torch.compile(model.head, dynamic=False)
    for _ in range(2):
        loss, gradients = head_step(model, inputs, torch.bfloat16, head=compiled)
    float32_loss, float32_gradients = head_step(model, inputs, head=compiled)
    for candidate, candidate_gradients in ((eager_loss, eager_gradients), (loss, gradients)):
        assert float(candidate) == pytest.approx(float(expected_loss), abs=0.02)
        assert relative_gradient_error(candidate_gradients, expected_gradients) < 0.05
    assert float(float32_loss) == pytest.approx(float(expected_loss), rel=1e-3)
    assert relative_gradient_error(float32_gradients, expected_gradients) < 1e-3


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
