"""Metrics on hand-made cases with known answers, the gold map against scipy, and the accumulator's guards."""

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from deepgaze_lit import metrics
from deepgaze_lit.metrics import SaliencyMetrics, ShufflePool


def uniform_log_density(height: int, width: int) -> torch.Tensor:
    return torch.full((height, width), -math.log(height * width), dtype=torch.float64)


def test_uniform_density_gives_zero_gain_half_auc_and_zero_nss():
    log_density = uniform_log_density(20, 30)
    xs, ys = torch.tensor([0.0, 29.9, 15.5, 15.5]), torch.tensor([0.0, 19.9, 7.2, 7.2])
    assert torch.allclose(metrics.information_gain(log_density, xs, ys), torch.zeros(4, dtype=torch.float64),
                          atol=1e-12)
    assert torch.equal(metrics.auc(log_density, xs, ys), torch.full((4,), 0.5, dtype=torch.float64))
    assert torch.equal(metrics.nss(log_density, xs, ys), torch.zeros(4, dtype=torch.float64))
    other_xs, other_ys = torch.tensor([3.0, 4.0, 5.0]), torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(metrics.sauc(log_density, xs, ys, other_xs, other_ys), torch.full((4,), 0.5,
                                                                                          dtype=torch.float64))
    gold_map = metrics.fixation_map(xs, ys, (20, 30), 2.0)
    assert float(metrics.cc(log_density.exp(), gold_map)) == 0.0


def test_nss_of_constant_map_is_zero_not_nan():
    # exp(-log(7 * 13)) is not exactly representable: a naive std would be rounding noise, not 0
    log_density = torch.full((7, 13), -math.log(7 * 13), dtype=torch.float64)
    values = metrics.nss(log_density, torch.tensor([0.0, 12.0]), torch.tensor([6.0, 3.0]))
    assert torch.equal(values, torch.zeros(2, dtype=torch.float64))


def test_perfect_density_gets_auc_near_one():
    height, width = 40, 50
    xs, ys = torch.tensor([3.0, 10.0, 44.0]), torch.tensor([5.0, 30.0, 12.0])
    density = torch.full((height, width), 1e-12, dtype=torch.float64)
    density[ys.long(), xs.long()] = 1.0
    log_density = (density / density.sum()).log()
    pixels = height * width
    # each fixation is above all unfixated pixels and ties with the three fixated ones (itself included)
    expected = (pixels - 3 + 0.5 * 3) / pixels
    assert torch.allclose(metrics.auc(log_density, xs, ys), torch.full((3,), expected, dtype=torch.float64),
                          rtol=0, atol=1e-15)
    assert float(metrics.information_gain(log_density, xs, ys).mean()) > math.log2(pixels / 3) - 1e-6


def test_auc_plateau_ties_count_one_half():
    log_density = torch.tensor([[1.0, 2.0, 2.0, 3.0]], dtype=torch.float64).log()
    # fixation on a value 2: one pixel below, two equal -> (1 + 0.5 * 2) / 4
    assert float(metrics.auc(log_density, torch.tensor([1.5]), torch.tensor([0.0]))) == 0.5
    assert float(metrics.auc(log_density, torch.tensor([3.0]), torch.tensor([0.0]))) == (3 + 0.5) / 4
    # shuffled: negatives at values 1, 2, 3, 3 (duplicates count) -> fixation on 2: (1 + 0.5) / 4
    value = metrics.sauc(log_density, torch.tensor([2.0]), torch.tensor([0.0]),
                         torch.tensor([0.0, 1.0, 3.0, 3.0]), torch.tensor([0.0, 0.0, 0.0, 0.0]))
    assert float(value) == 1.5 / 4


def test_nss_by_hand():
    density = torch.tensor([[1.0, 2.0], [3.0, 6.0]], dtype=torch.float64)
    log_density = (density / density.sum()).log()
    scaled = density / density.sum()
    expected = (scaled[1, 1] - scaled.mean()) / scaled.std(correction=0)
    assert float(metrics.nss(log_density, torch.tensor([1.9]), torch.tensor([1.2]))) == pytest.approx(
        float(expected), abs=1e-12)


@pytest.mark.parametrize("shape, sigma", [((6, 9), 5.0), ((25, 31), 1.5), ((12, 40), 3.7)])
def test_fixation_map_matches_scipy_reflect(shape, sigma):
    generator = np.random.default_rng(3)
    xs = np.concatenate([generator.uniform(0, shape[1], 12), [0.0, shape[1] - 0.01, 2.5, 2.5]])
    ys = np.concatenate([generator.uniform(0, shape[0], 12), [shape[0] - 0.01, 0.0, 1.0, 1.0]])
    counts = np.zeros(shape)
    np.add.at(counts, (ys.astype(int), xs.astype(int)), 1)
    expected = gaussian_filter(counts, sigma=sigma, mode="reflect")
    result = metrics.fixation_map(torch.from_numpy(xs), torch.from_numpy(ys), shape, sigma)
    np.testing.assert_allclose(result.numpy(), expected, rtol=0, atol=1e-12)
    assert float(result.sum()) == pytest.approx(len(xs), abs=1e-9)


def test_map_metrics_by_hand():
    first = torch.tensor([[1.0, 3.0], [0.0, 4.0]], dtype=torch.float64)
    second = torch.tensor([[2.0, 2.0], [2.0, 2.0]], dtype=torch.float64)
    assert float(metrics.sim(first, second)) == pytest.approx(0.125 + 0.25 + 0.0 + 0.25)
    assert float(metrics.cc(first, first * 3 + 1)) == pytest.approx(1.0)
    assert float(metrics.kldiv(first, first)) == pytest.approx(0.0, abs=1e-15)
    p, q = first / 8, second / 8
    assert float(metrics.kldiv(second, first)) == pytest.approx(float((p[p > 0] * (p[p > 0] / q[p > 0]).log()).sum()),
                                                                abs=1e-12)


def test_information_gain_over_baseline():
    log_density = torch.log(torch.tensor([[0.1, 0.2], [0.3, 0.4]], dtype=torch.float64))
    baseline = torch.log(torch.full((2, 2), 0.25, dtype=torch.float64))
    gain = metrics.information_gain(log_density, torch.tensor([1.0]), torch.tensor([1.0]), baseline)
    assert float(gain) == pytest.approx(math.log2(0.4 / 0.25))
    assert torch.allclose(gain, metrics.information_gain(log_density, torch.tensor([1.0]), torch.tensor([1.0])))


def test_fixation_outside_image_is_a_clear_error():
    with pytest.raises(ValueError, match="outside the 4x5 image"):
        metrics.auc(uniform_log_density(4, 5), torch.tensor([5.0]), torch.tensor([0.0]))


def test_shuffle_pool_rescales_as_pysaliency():
    pool = ShufflePool(x=[10.0, 3.0, 7.9], y=[5.0, 2.0, 1.0], n=[0, 1, 1], shapes=[[20, 30], [10, 15], [1, 1]])
    xs, ys = pool.nonfixations(0, (40, 45))
    # 3 * (45 / 15) = 9, 7.9 * 3 = 23.7 -> 23; 2 * (40 / 10) = 8, 1 * 4 = 4
    assert xs.tolist() == [9, 23] and ys.tolist() == [8, 4]
    with pytest.raises(TypeError, match="shuffle_pool"):
        SaliencyMetrics(shuffle_pool=[1.0, 2.0], num_images=2)


def random_batch(generator: torch.Generator, batch_size=3, height=12, width=16, fixations=9):
    log_density = torch.randn(batch_size, 1, height, width, generator=generator)
    log_density = log_density - log_density.flatten(1).logsumexp(1)[:, None, None, None]
    return {
        "log_density": log_density,
        "fix_batch": torch.randint(0, batch_size, (fixations,), generator=generator),
        "fix_x": torch.rand(fixations, generator=generator) * width,
        "fix_y": torch.rand(fixations, generator=generator) * height,
        "image_index": torch.randperm(5, generator=generator)[:batch_size],
        "weight": torch.ones(batch_size),
    }


def make_accumulator() -> SaliencyMetrics:
    pool = (torch.rand(30, generator=torch.Generator().manual_seed(1)),
            torch.rand(30, generator=torch.Generator().manual_seed(2)), torch.arange(30) % 5)
    return SaliencyMetrics(pool, gold_kernel_size=1.5, num_images=5)


def test_accumulator_works_under_inference_mode_and_after_it():
    generator = torch.Generator().manual_seed(0)
    batches = [random_batch(generator) for _ in range(3)]
    reference = make_accumulator()
    for batch in batches:
        reference.update(**batch)
    expected = reference.compute()

    accumulator = make_accumulator()
    with torch.inference_mode():  # trainer.validate before fit
        accumulator.update(**batches[0])
        accumulator.reset()
    accumulator.update(**batches[0])  # training-time states after an inference-mode reset
    with torch.inference_mode():
        for batch in batches[1:]:
            accumulator.update(**batch)
        result = accumulator.compute()
    assert result == expected
    assert all(not math.isnan(value) for value in result.values())


def test_accumulator_rejects_bad_input():
    accumulator = make_accumulator()
    batch = random_batch(torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="num_images"):
        accumulator.update(**{**batch, "image_index": torch.tensor([0, 1, 5])})
    with pytest.raises(ValueError, match=r"\(B,H,W\) or \(B,1,H,W\)"):
        accumulator.update(**{**batch, "log_density": batch["log_density"][0, 0]})


def test_accumulator_counts_and_empty_samples():
    accumulator = make_accumulator()
    log_density = torch.full((2, 8, 8), -math.log(64.0))
    accumulator.update(log_density, torch.tensor([1, 1, 1]), torch.tensor([1.0, 2.0, 2.0]),
                       torch.tensor([3.0, 3.0, 3.0]), torch.tensor([4, 2]))
    result = accumulator.compute()
    assert result["n_fixations"] == 3 and result["n_images"] == 1 and result["n_map_images"] == 1
    assert result["auc_image"] == 0.5 and result["nss_image"] == 0.0
    assert result["ig_uniform_bits_fixation"] == pytest.approx(0.0, abs=1e-6)
