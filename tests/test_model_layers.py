"""Readout building blocks against their straightforward definitions (float64)."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from deepgaze_lit.model import fused as fused_module
from deepgaze_lit.model.fused import conv_softplus_layer_norm_conv, plain_conv_softplus_layer_norm_conv
from deepgaze_lit.model.layers import (
    LayerNorm,
    conv1x1,
    gaussian_blur,
    softplus,
    softplus_values,
)


def random_layer_norm(channels, generator):
    norm = LayerNorm(channels).double()
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(channels, generator=generator, dtype=torch.float64))
        norm.bias.copy_(torch.randn(channels, generator=generator, dtype=torch.float64))
    return norm


@pytest.mark.parametrize("chunk_positions", [None, 4])
def test_fused_conv_softplus_layer_norm_conv_equals_composition(chunk_positions, monkeypatch):
    """One chunk of positions, and chunks of 4, 4 and 3 positions (statistics merged across chunks)."""
    if chunk_positions is not None:
        monkeypatch.setattr(fused_module, "CPU_CHUNK_ELEMENTS", 6 * chunk_positions)
    generator = torch.Generator().manual_seed(0)
    norm = random_layer_norm(6, generator)
    x = torch.randn(3, 2, 11, generator=generator, dtype=torch.float64, requires_grad=True)
    in_weight = (2 * torch.randn(6, 2, generator=generator, dtype=torch.float64)).requires_grad_()
    in_bias = torch.randn(3, 6, generator=generator, dtype=torch.float64, requires_grad=True)  # per sample
    weight = torch.randn(4, 6, 1, 1, generator=generator, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, generator=generator, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(3, 4, 11, generator=generator, dtype=torch.float64)
    parameters = [x, in_weight, in_bias, norm.weight, norm.bias, weight, bias]

    fused = conv_softplus_layer_norm_conv(x, in_weight, in_bias, norm, weight, bias)
    fused_grads = torch.autograd.grad(fused, parameters, grad)
    hidden = F.softplus(conv1x1(in_weight, x, in_bias))
    plain = conv1x1(weight, F.group_norm(hidden, 1, norm.weight, norm.bias, 1e-12), bias)
    plain_grads = torch.autograd.grad(plain, parameters, grad)
    assert torch.allclose(fused, plain, atol=1e-12)
    for mine, expected in zip(fused_grads, plain_grads):
        assert torch.allclose(mine, expected, atol=1e-10)

    def with_sample_1_constant(x, in_weight, in_bias, gamma, beta, weight, bias):
        layer = SimpleNamespace(weight=gamma, bias=beta)
        constant = torch.tensor([False, True, False])
        return conv_softplus_layer_norm_conv(x, in_weight, in_bias, layer, weight, bias, constant)

    assert torch.autograd.gradcheck(with_sample_1_constant, parameters)
    constant_output = with_sample_1_constant(*parameters)[1]
    expected = weight.flatten(1) @ norm.bias + bias
    assert torch.allclose(constant_output, expected[:, None].expand(4, 11), atol=1e-12)
    shared_bias = in_bias[0].detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda b: conv_softplus_layer_norm_conv(x, in_weight, b, norm, weight, bias), [shared_bias]
    )


def test_plain_composition_taken_under_compile_equals_the_fused_layer(monkeypatch):
    """`plain_conv_softplus_layer_norm_conv` (what torch.compile traces) against the chunked autograd Function (3
    chunks): values and every gradient in float64 with one sample flagged constant; under bf16 autocast both are
    computed in float32 and returned in bfloat16."""
    monkeypatch.setattr(fused_module, "CPU_CHUNK_ELEMENTS", 6 * 4)
    generator = torch.Generator().manual_seed(1)
    norm = random_layer_norm(6, generator)
    x = torch.randn(3, 2, 11, generator=generator, dtype=torch.float64, requires_grad=True)
    in_weight = (2 * torch.randn(6, 2, generator=generator, dtype=torch.float64)).requires_grad_()
    in_bias = torch.randn(3, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 6, 1, 1, generator=generator, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, generator=generator, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(3, 4, 11, generator=generator, dtype=torch.float64)
    constant = torch.tensor([False, True, False])
    parameters = [x, in_weight, in_bias, norm.weight, norm.bias, weight, bias]

    fused = conv_softplus_layer_norm_conv(x, in_weight, in_bias, norm, weight, bias, constant)
    plain = plain_conv_softplus_layer_norm_conv(x, in_weight, in_bias, norm, weight, bias, constant)
    assert torch.allclose(plain, fused, atol=1e-12)
    plain_grads = torch.autograd.grad(plain, parameters, grad)
    for mine, expected in zip(plain_grads, torch.autograd.grad(fused, parameters, grad)):
        assert torch.allclose(mine, expected, atol=1e-10)
    expected_constant = weight.flatten(1) @ norm.bias + bias
    assert torch.allclose(plain[1], expected_constant[:, None].expand(4, 11), atol=1e-12)

    single = [tensor.detach().float() for tensor in (x, in_weight, in_bias, weight, bias)]
    norm = norm.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = conv_softplus_layer_norm_conv(*single[:3], norm, *single[3:], constant)
        plain = plain_conv_softplus_layer_norm_conv(*single[:3], norm, *single[3:], constant)
    assert plain.dtype == fused.dtype == torch.bfloat16
    assert torch.allclose(plain.float(), fused.float(), rtol=0, atol=1e-2 * fused.float().abs().max().item())


def test_float32_cpu_softplus_matches_float64_within_rounding():
    """The vectorised float32 formula against float64 F.softplus over the whole range, the threshold and the
    underflow clamp included; the gradient is F.softplus's."""
    x = torch.cat([torch.linspace(-100, 100, 20001), torch.tensor([0.0, -80.0, -80.5, 20.0, 20.001, 1e-6, -1e-6])])
    exact = F.softplus(x.double())
    values = softplus_values(x).double()
    above_clamp = x > -80
    assert ((values - exact).abs() / exact)[above_clamp].max() < 3e-7
    assert torch.all(values[~above_clamp] == torch.tensor(-80.0).exp())
    assert torch.equal(values[x > 20], x[x > 20].double())
    x.requires_grad_()
    (gradient,) = torch.autograd.grad(softplus(x).sum(), x)
    (expected,) = torch.autograd.grad(F.softplus(x).sum(), x)
    assert torch.equal(gradient, expected)


def reference_blur(x, sigma, truncate=3.0):
    """Padding with F.pad(replicate) and two 1-D convolutions, one component at a time."""
    outputs = []
    for k, s in enumerate(sigma):
        radius = math.ceil(truncate * s.item())
        t = torch.arange(-radius, radius + 1, dtype=x.dtype)
        kernel = torch.exp(-0.5 * (t / s) ** 2)
        kernel = kernel / kernel.sum()
        y = F.conv2d(F.pad(x[:, k:k + 1], (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
        outputs.append(F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1)))
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("height, width", [(16, 16), (25, 34), (1, 7), (48, 5)])
def test_gaussian_blur_equals_padded_convolution(height, width):
    """Kernel radii 2, 9 and 24 (larger than some of the maps: the replicate padding then repeats the border)."""
    generator = torch.Generator().manual_seed(height)
    x = torch.randn(2, 3, height, width, generator=generator, dtype=torch.float64)
    sigma = torch.tensor([0.4, 2.7, 7.9], dtype=torch.float64, requires_grad=True)
    blurred = gaussian_blur(x, sigma, 3.0)
    assert torch.allclose(blurred, reference_blur(x, sigma.detach()), atol=1e-12)
    weights = torch.randn(blurred.shape, generator=generator, dtype=torch.float64)
    (gradient,) = torch.autograd.grad((blurred * weights).sum(), sigma)
    (expected,) = torch.autograd.grad((reference_blur(x, sigma) * weights).sum(), sigma)
    assert torch.allclose(gradient, expected, atol=1e-10)


def test_fused_layer_in_float32_is_as_accurate_as_the_plain_composition_for_a_large_mean(monkeypatch):
    """Hidden map ~30 +- 0.01 (mean 3000x its spread), 6 chunks: folding the normalisation into the output
    convolution must not cancel large terms, so the float32 error stays that of float32 group_norm."""
    monkeypatch.setattr(fused_module, "CPU_CHUNK_ELEMENTS", 16 * 500)
    generator = torch.Generator().manual_seed(0)
    x = 0.01 * torch.randn(2, 3, 3000, generator=generator, dtype=torch.float64)
    in_weight = torch.randn(16, 3, generator=generator, dtype=torch.float64)
    in_bias = 30 + 0.01 * torch.randn(16, generator=generator, dtype=torch.float64)
    weight = torch.randn(4, 16, generator=generator, dtype=torch.float64)
    bias = torch.randn(4, generator=generator, dtype=torch.float64)
    norm = LayerNorm(16)

    def plain(x, in_weight, in_bias, weight, bias):
        hidden = F.softplus(conv1x1(in_weight, x, in_bias))
        return conv1x1(weight, F.group_norm(hidden, 1, norm.weight.to(x.dtype), norm.bias.to(x.dtype), 1e-12), bias)

    exact = plain(x, in_weight, in_bias, weight, bias)
    single = [tensor.float() for tensor in (x, in_weight, in_bias, weight, bias)]
    fused = conv_softplus_layer_norm_conv(single[0], single[1], single[2], norm, single[3], single[4])
    fused_error = (fused.double() - exact).abs().max() / exact.abs().max()
    plain_error = (plain(*single).double() - exact).abs().max() / exact.abs().max()
    assert fused_error < 1.5 * plain_error
