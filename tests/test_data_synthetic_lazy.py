"""Synthetic images and true densities are made on access (LazySequence over SyntheticStimuli): the same data as
the former in-memory lists, lazy through subset and resize, O(1) images in memory, and usable by loader workers."""

import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from deepgaze_lit.data import make_synthetic
from deepgaze_lit.data.centerbias import UniformCenterbias
from deepgaze_lit.data.lazy import LazySequence
from deepgaze_lit.data.synthetic import CACHE_ITEMS
from deepgaze_lit.data.torch_dataset import CenterbiasTensors, ImageSamples, collate_samples

SMALL = dict(n_images=7, seed=5, sizes=((64, 96), (96, 64), (80, 80)), subjects=3)
# Recorded from the eager make_synthetic (images and densities held in lists) at commit 1efc73c for SMALL.
EAGER_IMAGE_SUMS = [2373000, 2333623, 2407251, 2291646, 2300952, 2421812, 2239521]
EAGER_DENSITY_SUMS = [-58728.63454311543, -59082.30885381445, -60874.18891193687, -58157.51101386244,
                      -59914.035409127, -61125.15045753197, -59969.07240523077]
EAGER_DENSITY_AT_10_20 = [-10.298004411416585, -10.231175438796024, -10.341910917430488, -8.472954710440145,
                          -10.231045632282909, -10.341910981133744, -10.298004493948804]
EAGER_FIXATION_SUMS = {"x": 6256.212905259438, "y": 5953.941415367931, "t": 136.9833215479283,
                       "x_hist": 18615.82670339194, "y_hist": 18235.990632565667}


def _materialised(dataset):
    """The same dataset with its images and densities as in-memory lists."""
    return replace(dataset, images=list(dataset.images), true_log_densities=list(dataset.true_log_densities))


def test_lazy_synthetic_data_equals_the_former_eager_data():
    data = make_synthetic(**SMALL)
    assert isinstance(data.images, LazySequence) and isinstance(data.true_log_densities, LazySequence)
    assert (data.n_fixations, int(data.is_initial.sum())) == (143, 21)
    assert [int(image.sum(dtype=np.int64)) for image in data.images] == EAGER_IMAGE_SUMS
    assert [float(d.sum()) for d in data.true_log_densities] == pytest.approx(EAGER_DENSITY_SUMS, rel=1e-13)
    assert [float(d[10, 20]) for d in data.true_log_densities] == pytest.approx(EAGER_DENSITY_AT_10_20, rel=1e-13)
    for key, total in EAGER_FIXATION_SUMS.items():
        assert float(np.nansum(getattr(data, key))) == pytest.approx(total, rel=1e-13)
    for index, shape in enumerate(data.shapes.tolist()):
        assert data.images[index].shape == (*shape, 3) and data.images[index].dtype == np.uint8
        assert data.true_log_densities[index].dtype == np.float64


def test_subset_and_resize_stay_lazy_and_equal_the_materialised_lists():
    lazy = make_synthetic(**SMALL)
    eager = _materialised(lazy)
    picks = [5, 0, 3]
    results = [data.resized(data.shapes // 2 + 3).subset(picks) for data in (lazy, eager)]
    assert isinstance(results[0].images, LazySequence) and isinstance(results[0].true_log_densities, LazySequence)
    assert isinstance(results[1].true_log_densities, list)
    np.testing.assert_array_equal(results[0].x, results[1].x)
    for index in range(len(picks)):
        np.testing.assert_array_equal(results[0].load_image(index), results[1].load_image(index))
        np.testing.assert_array_equal(results[0].true_log_densities[index], results[1].true_log_densities[index])
        assert results[0].image_digest(index) == results[1].image_digest(index)
    assert results[0].true_log_densities[0].shape == tuple(lazy.shapes[5] // 2 + 3)
    reversed_subset = lazy.subset([6, 2]).subset([1, 0])
    np.testing.assert_array_equal(reversed_subset.images[0], eager.images[2])
    np.testing.assert_array_equal(reversed_subset.true_log_densities[1], eager.true_log_densities[6])


def test_lazy_sequence_indexing():
    images = make_synthetic(**SMALL).images
    reference = list(images)
    assert len(images) == 7 and len(images[2:6:2]) == 2
    np.testing.assert_array_equal(images[-1], reference[6])
    np.testing.assert_array_equal(images[np.int64(3)], reference[3])
    np.testing.assert_array_equal(images[2:6:2][1], reference[4])
    with pytest.raises(IndexError):
        images[7]
    with pytest.raises(ValueError, match="2 step arguments for 7 items"):
        images.map(lambda item, argument: item, np.zeros(2))


def test_items_are_fresh_copies_and_only_a_few_are_kept():
    data = make_synthetic(**SMALL)
    first = data.true_log_densities[1]
    first[:] = 0.0
    assert float(data.true_log_densities[1].sum()) == pytest.approx(EAGER_DENSITY_SUMS[1], rel=1e-13)
    for _ in data.images:
        pass
    stimuli = data.images.load.__self__
    assert len(stimuli._images.items) == CACHE_ITEMS and len(stimuli._densities.items) == 1


def test_pickled_synthetic_dataset_holds_no_images():
    data = make_synthetic(n_images=40, seed=1)
    eager_bytes = sum(image.nbytes + density.nbytes for image, density in zip(data.images, data.true_log_densities))
    pickled = pickle.dumps(data.subset(np.arange(0, 40, 2)))
    assert eager_bytes > 30e6 and len(pickled) < 0.5e6
    restored = pickle.loads(pickled)
    np.testing.assert_array_equal(restored.images[3], data.images[6])
    np.testing.assert_array_equal(restored.true_log_densities[3], data.true_log_densities[6])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_loader_workers_make_the_lazy_images(context):
    data = make_synthetic(n_images=4, seed=2, sizes=((64, 64),), subjects=2)
    samples = ImageSamples(data, CenterbiasTensors(UniformCenterbias()), "dummy")
    loader = DataLoader(samples, batch_size=2, collate_fn=collate_samples, num_workers=1,
                        multiprocessing_context=context)
    batches = list(loader)
    assert sum(len(batch["image_index"]) for batch in batches) == 4
    for batch in batches:
        for sample, index in enumerate(batch["image_index"].tolist()):
            expected = torch.from_numpy(data.images[index]).permute(2, 0, 1)
            assert torch.equal(batch["image"][sample], expected)
