"""Readout building blocks against their straightforward definitions (float64)."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from deepgaze_lit.model.layers import LayerNorm, conv1x1, gaussian_blur, softplus_layer_norm_conv


def random_layer_norm(channels, generator):
    norm = LayerNorm(channels).double()
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(channels, generator=generator, dtype=torch.float64))
        norm.bias.copy_(torch.randn(channels, generator=generator, dtype=torch.float64))
    return norm


def test_fused_softplus_layer_norm_conv_equals_composition():
    generator = torch.Generator().manual_seed(0)
    norm = random_layer_norm(6, generator)
    weight = torch.randn(4, 6, 1, 1, generator=generator, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, generator=generator, dtype=torch.float64, requires_grad=True)
    e = (3 * torch.randn(3, 6, 11, generator=generator, dtype=torch.float64)).requires_grad_()
    grad = torch.randn(3, 4, 11, generator=generator, dtype=torch.float64)
    parameters = [e, norm.weight, norm.bias, weight, bias]

    fused = softplus_layer_norm_conv(e, norm, weight, bias)
    fused_grads = torch.autograd.grad(fused, parameters, grad)
    plain = conv1x1(weight, F.group_norm(F.softplus(e), 1, norm.weight, norm.bias, 1e-12), bias)
    plain_grads = torch.autograd.grad(plain, parameters, grad)
    assert torch.allclose(fused, plain, atol=1e-12)
    for mine, expected in zip(fused_grads, plain_grads):
        assert torch.allclose(mine, expected, atol=1e-10)

    def with_sample_1_constant(e, gamma, beta, weight, bias):
        layer = SimpleNamespace(weight=gamma, bias=beta)
        return softplus_layer_norm_conv(e, layer, weight, bias, torch.tensor([False, True, False]))

    assert torch.autograd.gradcheck(with_sample_1_constant, parameters)
    constant_output = with_sample_1_constant(*parameters)[1]
    expected = weight.flatten(1) @ norm.bias + bias
    assert torch.allclose(constant_output, expected[:, None].expand(4, 11), atol=1e-12)


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
