"""Splits equal pysaliency's, the centre bias equals pysaliency's BaselineModel, resized fixations follow the image."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from scipy.special import logsumexp

from deepgaze_lit.data import (BaselineCenterbias, CrossvalidatedBaselineCenterbias, DataError, FixationDataset,
                               TemplateCenterbias, UniformCenterbias, centerbias_log_density, crossval_split,
                               holdout_split, make_synthetic, target_shape)
from deepgaze_lit.data.centerbias import SHAPE_CACHE_SIZE
from deepgaze_lit.data.resize import resize_image

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def pysaliency_splits():
    # Origin: the shared reference vectors crossval_splits.json (pysaliency crossval_split), copied into tests/data.
    return json.loads((DATA / "crossval_splits.json").read_text())["splits"]


@pytest.mark.parametrize("n_images", [1003, 37])
def test_crossval_split_equals_pysaliency(pysaliency_splits, n_images):
    for fold, expected in enumerate(pysaliency_splits[str(n_images)]):
        train, val, test = crossval_split(n_images, folds=10, fold=fold)
        assert train.tolist() == expected["train"]
        assert val.tolist() == expected["val"]
        assert test.tolist() == expected["test"]
        assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(n_images))


def test_crossval_fold_sizes_and_errors():
    assert [len(part) for part in crossval_split(1003, 10, 0)] == [808, 94, 101]
    with pytest.raises(ValueError, match="fold must be in 0..9"):
        crossval_split(1003, 10, 10)
    with pytest.raises(ValueError, match="too few"):
        crossval_split(9, 10, 0)


def test_holdout_split():
    train, val, test = holdout_split(1003, val_images=101, seed=42)
    assert (len(train), len(val)) == (902, 101) and test is val
    assert not set(train) & set(val) and sorted(np.concatenate([train, val]).tolist()) == list(range(1003))
    again = holdout_split(1003, val_images=101, seed=42)
    assert all(np.array_equal(a, b) for a, b in zip((train, val), again[:2]))
    assert not np.array_equal(val, holdout_split(1003, val_images=101, seed=1)[1])
    train, val, test = holdout_split(100, val_images=10, test_images=15, seed=0)
    assert (len(train), len(val), len(test)) == (75, 10, 15)
    assert len(set(train) | set(val) | set(test)) == 100
    with pytest.raises(ValueError, match="leaves no training images"):
        holdout_split(10, val_images=5, test_images=5)


@pytest.fixture(scope="module")
def centerbias_case():
    # Origin: the shared reference vectors centerbias_case.npz (pysaliency BaselineModel and
    # CrossvalidatedBaselineModel outputs), copied into tests/data.
    case = dict(np.load(DATA / "centerbias_case.npz"))
    shapes = case["shapes"]
    dataset = FixationDataset(shapes=shapes, x=case["x"], y=case["y"], n=case["n"],
                              images=[np.zeros((h, w, 3), np.uint8) for h, w in shapes])
    return case, dataset


def test_baseline_centerbias_matches_pysaliency(centerbias_case):
    case, dataset = centerbias_case
    bandwidth, eps = float(case["bandwidth"]), float(case["eps"])
    model = BaselineCenterbias(dataset, bandwidth, eps)
    for j, shape in enumerate(dataset.shapes):
        expected = case[f"baseline_log_density_{j}"]
        np.testing.assert_allclose(model.log_density(tuple(shape)), expected, rtol=0, atol=1e-6)
        np.testing.assert_allclose(centerbias_log_density(dataset, tuple(shape), bandwidth, eps), expected,
                                   rtol=0, atol=1e-6)
    np.testing.assert_allclose(model.log_density((50, 70)), case["baseline_log_density_target_50x70"],
                               rtol=0, atol=1e-6)
    log_likelihoods = []
    for j in range(len(dataset.shapes)):
        density = model.log_density(tuple(dataset.shapes[j]))
        rows = dataset.n == j
        log_likelihoods.append(density[dataset.y[rows].astype(int), dataset.x[rows].astype(int)] + np.log(density.size))
    information_gain = np.concatenate(log_likelihoods).mean() / np.log(2)
    assert information_gain == pytest.approx(float(case["expected_baseline_ig_bits_fixation"]), abs=1e-9)


def test_crossvalidated_centerbias_matches_pysaliency(centerbias_case):
    case, dataset = centerbias_case
    model = CrossvalidatedBaselineCenterbias(dataset, float(case["cv_bandwidth"]), float(case["cv_eps"]))
    for j in range(len(dataset.shapes)):
        np.testing.assert_allclose(model.log_density_for_image(j), case[f"crossval_log_density_{j}"],
                                   rtol=0, atol=1e-6)


def test_centerbias_ignores_forced_initial_fixations(centerbias_case):
    case, dataset = centerbias_case
    count = len(dataset.x)
    with_initial = FixationDataset(
        shapes=dataset.shapes, images=dataset.images,
        x=np.concatenate([dataset.x, dataset.shapes[dataset.n[:5], 1] / 2]),
        y=np.concatenate([dataset.y, dataset.shapes[dataset.n[:5], 0] / 2]),
        n=np.concatenate([dataset.n, dataset.n[:5]]),
        is_initial=np.arange(count + 5) >= count)
    np.testing.assert_array_equal(centerbias_log_density(with_initial, (30, 40)),
                                  centerbias_log_density(dataset, (30, 40)))


def test_uniform_and_template_centerbias(tmp_path):
    np.testing.assert_allclose(UniformCenterbias().log_density((3, 4)), np.full((3, 4), -np.log(12)))
    template = np.log(np.array([[1.0, 2.0], [3.0, 4.0]]) / 10)
    np.save(tmp_path / "cb.npy", template)
    zoomed = TemplateCenterbias(tmp_path / "cb.npy").log_density((4, 6))
    assert logsumexp(zoomed) == pytest.approx(0, abs=1e-12)
    expected = np.kron(np.array([[1.0, 2.0], [3.0, 4.0]]), np.ones((2, 3)))
    np.testing.assert_allclose(np.exp(zoomed), expected / expected.sum())


def test_centerbias_models_keep_only_the_last_shapes_asked_for(tmp_path, centerbias_case):
    """Prediction over a folder of many sizes: the per-shape results are bounded, and a shape asked for again after
    it was dropped gives the same values."""
    np.save(tmp_path / "cb.npy", np.log(np.array([[1.0, 2.0], [3.0, 4.0]]) / 10))
    _, dataset = centerbias_case
    for model in (TemplateCenterbias(tmp_path / "cb.npy"), BaselineCenterbias(dataset)):
        first = model.log_density((20, 30)).copy()
        for height in range(21, 21 + 2 * SHAPE_CACHE_SIZE):
            model.log_density((height, 30))
            assert len(model.cache) <= SHAPE_CACHE_SIZE
        assert len(model.cache) == SHAPE_CACHE_SIZE
        np.testing.assert_array_equal(model.log_density((20, 30)), first)
        assert pickle.loads(pickle.dumps(model)).log_density((20, 30)).shape == (20, 30)


def test_template_errors(tmp_path):
    with pytest.raises(DataError, match="cb.npy: centre-bias template not found"):
        TemplateCenterbias(tmp_path / "cb.npy")
    np.save(tmp_path / "cb.npy", np.zeros((2, 2, 2)))
    with pytest.raises(DataError, match="expected a 2-D float array"):
        TemplateCenterbias(tmp_path / "cb.npy")


def test_resize_policies():
    assert target_shape((405, 1024), "two_sizes") == (768, 1024)
    assert target_shape((1024, 768), "two_sizes") == (1024, 768)
    assert target_shape((500, 500), "two_sizes") == (1024, 768)
    assert target_shape((768, 1024), "max_side", 512) == (384, 512)
    assert target_shape((405, 1024), "max_side", 512) == (202, 512)
    assert target_shape((100, 80), "max_side", 512) == (100, 80)
    assert target_shape((100, 80), "native") == (100, 80)
    assert resize_image(np.zeros((10, 20, 3), np.uint8), (5, 7)).shape == (5, 7, 3)


def test_resized_dataset_scales_fixations_histories_and_density():
    data = make_synthetic(n_images=3, seed=1, sizes=[(64, 96)], subjects=2)
    shapes = np.array([[128, 96]] * 3)
    resized = data.resized(shapes)
    np.testing.assert_allclose(resized.x, data.x)
    np.testing.assert_allclose(resized.y, data.y * 2)
    np.testing.assert_allclose(resized.y_hist, data.y_hist * 2)
    assert resized.load_image(0).shape == (128, 96, 3)
    assert resized.native_shapes.tolist() == data.shapes.tolist()
    for density in resized.true_log_densities:
        assert density.shape == (128, 96) and np.exp(density).sum() == pytest.approx(1, abs=1e-9)
    inside = (resized.x < 96) & (resized.y < 128) & (resized.x >= 0) & (resized.y >= 0)
    assert inside.all()
