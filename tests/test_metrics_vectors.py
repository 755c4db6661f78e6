"""Parity with pysaliency 0.2.22 on the reference vectors, per image and through the dataset accumulator."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from deepgaze_lit import metrics
from deepgaze_lit.metrics import SaliencyMetrics, ShufflePool, information_gain_bits

# Origin: /work/shared/reference/vectors (pysaliency 0.2.22 outputs), copied to tests/data.
DATA = Path(__file__).parent / "data"
CASES = (0, 1, 2)
TOLERANCE = 1e-6
AUC_TOLERANCE = 1e-12


def load_case(case: int) -> dict:
    """Inputs and expected values of one case as torch tensors; `densities`/`baselines`/`gold_maps` are lists."""
    arrays = np.load(DATA / f"metrics_case{case}.npz")
    num_images = sum(key.startswith("log_density_") for key in arrays.files)
    data = {key: torch.from_numpy(arrays[key]) for key in arrays.files}
    data["densities"] = [data[f"log_density_{i}"] for i in range(num_images)]
    data["baselines"] = [data[f"baseline_log_density_{i}"] for i in range(num_images)]
    data["gold_maps"] = [data[f"gold_map_{i}"] for i in range(num_images)]
    data["shapes"] = torch.tensor([list(density.shape) for density in data["densities"]])
    data["kernel_size"] = float(arrays["gold_kernel_size"])
    return data


def test_expected_json_matches_npz():
    expected = json.loads((DATA / "metrics_expected.json").read_text())
    for case in CASES:
        data = load_case(case)
        for key, value in expected[str(case)].items():
            assert float(data[f"expected_{key}"]) == pytest.approx(value, abs=1e-15)


@pytest.mark.parametrize("case", CASES)
def test_per_fixation_functions_match_pysaliency(case):
    data = load_case(case)
    x, y, n = data["x"], data["y"], data["n"]
    pool = ShufflePool(x, y, n, data["shapes"])
    values = {name: torch.full_like(x, float("nan")) for name in ("nss", "auc", "sauc", "ll", "ig_base")}
    for image, log_density in enumerate(data["densities"]):
        mine = n == image
        if not mine.any():
            continue
        xs, ys = x[mine], y[mine]
        values["nss"][mine] = metrics.nss(log_density, xs, ys)
        values["auc"][mine] = metrics.auc(log_density, xs, ys)
        other_xs, other_ys = pool.nonfixations(image, log_density.shape)
        values["sauc"][mine] = metrics.sauc(log_density, xs, ys, other_xs, other_ys)
        values["ll"][mine] = metrics.log_likelihood(log_density, xs, ys)
        values["ig_base"][mine] = metrics.information_gain(log_density, xs, ys, data["baselines"][image])
    torch.testing.assert_close(values["nss"], data["expected_nss_per_fixation"], rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(values["auc"], data["expected_auc_per_fixation"], rtol=0, atol=AUC_TOLERANCE)
    torch.testing.assert_close(values["sauc"], data["expected_sauc_per_fixation"], rtol=0, atol=AUC_TOLERANCE)
    assert float(values["ll"].mean()) == pytest.approx(float(data["expected_ll_nats_fixation"]), abs=TOLERANCE)
    assert float(values["ig_base"].mean()) == pytest.approx(
        float(data["expected_ig_baseline_bits_fixation"]), abs=TOLERANCE
    )


@pytest.mark.parametrize("case", CASES)
def test_ig_uniform_function_both_averages(case):
    data = load_case(case)
    x, y, n = data["x"], data["y"], data["n"]
    gains, image_means = torch.zeros_like(x), []
    for image, log_density in enumerate(data["densities"]):
        mine = n == image
        if mine.any():
            gains[mine] = metrics.information_gain(log_density, x[mine], y[mine])
            image_means.append(float(gains[mine].mean()))
    assert float(gains.mean()) == pytest.approx(float(data["expected_ig_uniform_bits_fixation"]), abs=TOLERANCE)
    assert np.mean(image_means) == pytest.approx(float(data["expected_ig_uniform_bits_image"]), abs=TOLERANCE)


@pytest.mark.parametrize("case", CASES)
def test_map_functions_and_gold_map_match_pysaliency(case):
    data = load_case(case)
    x, y, n = data["x"], data["y"], data["n"]
    for row, image in enumerate(data["images_with_fixations"].tolist()):
        mine = n == image
        log_density = data["densities"][image]
        gold_map = metrics.fixation_map(x[mine], y[mine], log_density.shape, data["kernel_size"])
        torch.testing.assert_close(gold_map, data["gold_maps"][image], rtol=0, atol=1e-12)
        density = log_density.exp()
        for name, function in (("cc", metrics.cc), ("kldiv", metrics.kldiv), ("sim", metrics.sim),
                               ("mit_kldiv", metrics.mit_kldiv)):
            expected = float(data[f"expected_{name}_per_image"][row])
            assert float(function(density, gold_map)) == pytest.approx(expected, abs=TOLERANCE), name


def samples_per_image(data):
    """One sample per image (per-image mode, weight 1), images without fixations included."""
    for image, log_density in enumerate(data["densities"]):
        mine = data["n"] == image
        yield image, log_density, data["x"][mine], data["y"][mine], 1.0


def samples_per_fixation(data):
    """One sample per fixation (per-fixation mode, weight 1 / fixations of its image), in reverse order."""
    counts = torch.bincount(data["n"], minlength=len(data["densities"]))
    for index in reversed(range(data["n"].numel())):
        image = int(data["n"][index])
        yield image, data["densities"][image], data["x"][index : index + 1], data["y"][index : index + 1], (
            1.0 / float(counts[image])
        )


def accumulate(data, samples, densities_key="densities"):
    accumulator = SaliencyMetrics(
        ShufflePool(data["x"], data["y"], data["n"], data["shapes"]),
        gold_kernel_size=data["kernel_size"],
        num_images=len(data["densities"]),
    )
    for image, _, xs, ys, weight in samples(data):
        accumulator.update(
            data[densities_key][image][None, None],
            fix_batch=torch.zeros(xs.numel(), dtype=torch.int64),
            fix_x=xs.float(),
            fix_y=ys.float(),
            image_index=torch.tensor([image]),
            weight=torch.tensor([weight]),
        )
    return accumulator.compute()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("samples", [samples_per_image, samples_per_fixation])
def test_accumulator_matches_pysaliency_both_averages(case, samples):
    data = load_case(case)
    model = accumulate(data, samples)
    baseline = accumulate(data, samples, densities_key="baselines")
    assert model["n_fixations"] == data["n"].numel()
    assert model["n_images"] == len(data["images_with_fixations"])
    for key in ("ll_nats_fixation", "ig_uniform_bits_fixation", "ig_uniform_bits_image", "nss_fixation",
                "nss_image", "auc_fixation", "auc_image", "sauc_fixation", "sauc_image"):
        tolerance = AUC_TOLERANCE if "auc" in key else TOLERANCE
        assert model[key] == pytest.approx(float(data[f"expected_{key}"]), abs=tolerance), key
    gain = information_gain_bits(model, baseline)
    assert gain["ig_bits_fixation"] == pytest.approx(float(data["expected_ig_baseline_bits_fixation"]), abs=TOLERANCE)
    assert gain["ig_bits_image"] == pytest.approx(float(data["expected_ig_baseline_bits_image"]), abs=TOLERANCE)


@pytest.mark.parametrize("case", CASES)
def test_accumulator_map_metrics_per_image_mode(case):
    data = load_case(case)
    result = accumulate(data, samples_per_image)
    assert result["n_map_images"] == len(data["images_with_fixations"])
    for name in ("cc", "kldiv", "mit_kldiv", "sim"):
        expected = float(data[f"expected_{name}_per_image"].mean())
        assert result[f"{name}_image"] == pytest.approx(expected, abs=TOLERANCE), name


def test_accumulator_skips_map_metrics_of_partial_samples():
    data = load_case(0)
    counts = torch.bincount(data["n"])
    result = accumulate(data, samples_per_fixation)
    assert result["n_map_images"] == int((counts == 1).sum())


def test_relative_pool_tuple_gives_the_same_sauc_here():
    data = load_case(2)
    shapes = data["shapes"].double()
    relative = (data["x"] / shapes[data["n"], 1], data["y"] / shapes[data["n"], 0], data["n"])
    accumulator = SaliencyMetrics(relative, num_images=len(data["densities"]))
    for image, log_density, xs, ys, _ in samples_per_image(data):
        accumulator.update(log_density[None], torch.zeros(xs.numel(), dtype=torch.int64), xs, ys,
                           torch.tensor([image]))
    result = accumulator.compute()
    assert result["sauc_fixation"] == pytest.approx(float(data["expected_sauc_fixation"]), abs=AUC_TOLERANCE)
    assert "cc_image" not in result
