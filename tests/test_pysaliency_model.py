"""The pysaliency wrappers (deepgaze_lit.pysaliency_model): against a stand-in of pysaliency's model interface
always, and against pysaliency itself where it is installed (`pip install 'deepgaze-lit[pysaliency]'`)."""

import abc
import importlib
import sys
import types

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from deepgaze_lit.data.centerbias import UniformCenterbias
from deepgaze_lit.inference import DensityPredictor
from deepgaze_lit.metrics.functional import information_gain, log_likelihood
from deepgaze_lit.model import DeepGazeIII
from deepgaze_lit.output import make_writers, write_predictions
from deepgaze_lit.output.writers import HDF5_FILE_NAME

TREE = {"a/x.jpg": (100, 130), "b/x.jpg": (120, 90), "x.png": (96, 96)}


def make_predictor(scanpath: bool) -> DensityPredictor:
    torch.manual_seed(3)
    network = DeepGazeIII(num_components=1, scanpath=scanpath, backbone_weights="none")
    torch.nn.init.normal_(network.finalizers[0].center_bias_weight, 1.0, 0.1)
    return DensityPredictor(network, UniformCenterbias(), resize="max_side", max_side=80)


@pytest.fixture(scope="module")
def spatial_predictor():
    return make_predictor(scanpath=False)


@pytest.fixture(scope="module")
def scanpath_predictor():
    return make_predictor(scanpath=True)


def write_tree(root):
    rng = np.random.default_rng(5)
    for relative, (height, width) in TREE.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(root / relative)
    return root


def stand_in_pysaliency() -> types.ModuleType:
    """The part of pysaliency's model interface the wrappers use: `ScanpathModel` (abstract
    `conditional_log_density`) and `Model` (`log_density` caching `_log_density` per stimulus unless caching=False,
    `conditional_log_density` ignoring the history, `log_likelihoods` at (int(y), int(x)))."""

    class ScanpathModel(abc.ABC):
        @abc.abstractmethod
        def conditional_log_density(self, stimulus, x_hist, y_hist, t_hist, attributes=None, out=None):
            """Log density of the next fixation."""

    class Model(ScanpathModel):
        def __init__(self, cache_location=None, caching=True, memory_cache_size=None):
            self.caching = caching
            self._cache = {}

        def conditional_log_density(self, stimulus, x_hist, y_hist, t_hist, attributes=None, out=None):
            return self.log_density(stimulus)

        def log_density(self, stimulus):
            if not self.caching:
                return self._log_density(stimulus)
            key = stimulus.tobytes() + str(stimulus.shape).encode()
            if key not in self._cache:
                self._cache[key] = self._log_density(stimulus)
            return self._cache[key]

        @abc.abstractmethod
        def _log_density(self, stimulus):
            """Log density of one stimulus."""

        def log_likelihoods(self, stimuli, xs, ys, ns):
            return np.array([self.log_density(stimuli[n])[int(y), int(x)] for x, y, n in zip(xs, ys, ns)])

    module = types.ModuleType("pysaliency")
    module.Model, module.ScanpathModel = Model, ScanpathModel
    return module


@pytest.fixture
def wrappers_on_stand_in(monkeypatch):
    monkeypatch.setitem(sys.modules, "pysaliency", stand_in_pysaliency())
    monkeypatch.delitem(sys.modules, "deepgaze_lit.pysaliency_model", raising=False)
    yield importlib.import_module("deepgaze_lit.pysaliency_model")
    sys.modules.pop("deepgaze_lit.pysaliency_model", None)


def test_model_gives_the_predictors_log_density_for_colour_and_grey_stimuli(wrappers_on_stand_in,
                                                                             spatial_predictor):
    model = wrappers_on_stand_in.DeepGazeModel(spatial_predictor)
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, (90, 110, 3), dtype=np.uint8)
    np.testing.assert_array_equal(model.log_density(colour), spatial_predictor.log_density(colour))
    grey = colour[:, :, 1]
    np.testing.assert_array_equal(model.log_density(grey), spatial_predictor.log_density(np.dstack([grey] * 3)))
    xs, ys = np.array([3.5, 60.2, 100.9]), np.array([80.1, 40.0, 2.7])
    expected = log_likelihood(torch.from_numpy(spatial_predictor.log_density(colour)), torch.from_numpy(xs),
                              torch.from_numpy(ys))
    np.testing.assert_allclose(model.log_likelihoods([colour], xs, ys, [0, 0, 0]), expected.numpy(), atol=1e-12)


def test_scanpath_model_feeds_the_history_and_refuses_a_spatial_network(wrappers_on_stand_in, scanpath_predictor,
                                                                       spatial_predictor):
    model = wrappers_on_stand_in.DeepGazeScanpathModel(scanpath_predictor)
    stimulus = np.random.default_rng(1).integers(0, 256, (90, 110, 3), dtype=np.uint8)
    x_hist, y_hist = np.array([55.0, 10.0, 90.0]), np.array([45.0, 70.0, 20.0])
    conditional = model.conditional_log_density(stimulus, x_hist, y_hist, np.array([0.0, 0.2, 0.4]))
    np.testing.assert_array_equal(conditional, scanpath_predictor.log_density(stimulus, x_hist, y_hist))
    first = model.conditional_log_density(stimulus, np.array([]), np.array([]), np.array([]))
    assert np.abs(conditional - first).max() > 1e-4
    with pytest.raises(ValueError, match="scanpath=True"):
        wrappers_on_stand_in.DeepGazeScanpathModel(spatial_predictor)


def test_import_without_pysaliency_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pysaliency", None)
    monkeypatch.delitem(sys.modules, "deepgaze_lit.pysaliency_model", raising=False)
    with pytest.raises(ImportError, match=r"deepgaze-lit\[pysaliency\]"):
        importlib.import_module("deepgaze_lit.pysaliency_model")
    sys.modules.pop("deepgaze_lit.pysaliency_model", None)


@pytest.fixture
def real_pysaliency():
    pysaliency = pytest.importorskip("pysaliency")
    sys.modules.pop("deepgaze_lit.pysaliency_model", None)
    return pysaliency, importlib.import_module("deepgaze_lit.pysaliency_model")


def test_pysaliency_reads_our_hdf5_and_npy_outputs_and_scores_the_wrapper_as_our_metrics(
        real_pysaliency, spatial_predictor, tmp_path):
    pysaliency, wrappers = real_pysaliency
    source = write_tree(tmp_path / "images")
    write_predictions(spatial_predictor, source, make_writers(tmp_path / "out", ["npy", "hdf5"]))
    stimuli = pysaliency.FileStimuli([str(source / relative) for relative in TREE])
    model = wrappers.DeepGazeModel(spatial_predictor)

    exported = tmp_path / "exported.hdf5"
    pysaliency.export_model_to_hdf5(model, stimuli, str(exported))
    with h5py.File(exported, "r") as theirs, h5py.File(tmp_path / "out" / HDF5_FILE_NAME, "r") as ours:
        for relative in TREE:
            np.testing.assert_array_equal(ours[relative][:], theirs[relative][:].astype(np.float32))

    from_hdf5 = pysaliency.HDF5Model(stimuli, str(tmp_path / "out" / HDF5_FILE_NAME))
    from_folder = pysaliency.ModelFromDirectory(stimuli, str(tmp_path / "out" / "npy"))
    for index, relative in enumerate(TREE):
        npy = np.load(tmp_path / "out" / "npy" / f"{relative.rsplit('.', 1)[0]}.npy")
        np.testing.assert_array_equal(from_hdf5.log_density(stimuli[index]), npy)
        np.testing.assert_array_equal(from_folder.log_density(stimuli[index]), npy.astype(float))

    rng = np.random.default_rng(2)
    ns = np.repeat(np.arange(len(TREE)), 5)
    shapes = np.array(list(TREE.values()))
    xs, ys = rng.uniform(0, shapes[ns, 1]), rng.uniform(0, shapes[ns, 0])
    fixations = pysaliency.Fixations.create_without_history(xs, ys, ns)
    ours = torch.cat([information_gain(torch.from_numpy(model.log_density(stimuli[n])), torch.from_numpy(xs[ns == n]),
                                       torch.from_numpy(ys[ns == n])) for n in range(len(TREE))])
    np.testing.assert_allclose(model.information_gain(stimuli, fixations, average="fixation"), ours.mean().item(),
                               rtol=0, atol=1e-9)
    np.testing.assert_allclose(from_hdf5.information_gain(stimuli, fixations, average="fixation"),
                               ours.mean().item(), rtol=0, atol=1e-5)


def test_pysaliency_scores_the_scanpath_wrapper_with_each_fixations_history(real_pysaliency, scanpath_predictor,
                                                                            tmp_path):
    pysaliency, wrappers = real_pysaliency
    source = write_tree(tmp_path / "images")
    stimuli = pysaliency.FileStimuli([str(source / relative) for relative in TREE])
    train_x = [np.array([65.0, 20.0, 100.0, 40.0, 80.0, 10.0]), np.array([45.0, 70.0, 30.0])]
    train_y = [np.array([50.0, 80.0, 10.0, 60.0, 30.0, 90.0]), np.array([60.0, 100.0, 20.0])]
    train_t = [np.arange(6) * 0.3, np.arange(3) * 0.3]
    fixations = pysaliency.FixationTrains.from_fixation_trains(train_x, train_y, train_t, [0, 1], [0, 0])
    model = wrappers.DeepGazeScanpathModel(scanpath_predictor)
    theirs = model.log_likelihoods(stimuli, fixations)
    expected = []
    for x, y, n in zip(train_x, train_y, [0, 1]):
        image = stimuli.stimuli[n]
        for k in range(len(x)):
            log_density = scanpath_predictor.log_density(image, x[:k], y[:k])
            expected.append(log_density[int(y[k]), int(x[k])])
    np.testing.assert_allclose(theirs, expected, rtol=0, atol=1e-12)
