"""Prediction at the training input size, returned at the image's own size (deepgaze_lit.inference)."""

import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

from deepgaze_lit.data.centerbias import TemplateCenterbias, UniformCenterbias
from deepgaze_lit.data.dataset import DataError
from deepgaze_lit.data.resize import resize_image, resize_log_density
from deepgaze_lit.inference import LOG_DENSITY_FLOOR, DensityPredictor, predict_log_density
from deepgaze_lit.model import MIN_IMAGE_SIDE, DeepGazeIII

HEIGHT, WIDTH = 100, 130


@pytest.fixture(scope="module")
def spatial_network():
    torch.manual_seed(0)
    network = DeepGazeIII(num_components=1, scanpath=False, backbone_weights="none").eval()
    torch.nn.init.normal_(network.finalizers[0].center_bias_weight, 1.0, 0.1)
    return network


@pytest.fixture(scope="module")
def scanpath_network():
    torch.manual_seed(1)
    return DeepGazeIII(num_components=1, scanpath=True, backbone_weights="none").eval()


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)


def network_log_density(network, image, log_centerbias, x_slots, y_slots):
    """The network's own output (H,W) float64 for one image, centre bias and history slots (most recent first)."""
    pixels = torch.from_numpy(image.transpose(2, 0, 1).copy())[None]
    with torch.no_grad():
        output = network(pixels, torch.from_numpy(log_centerbias.astype(np.float32))[None],
                         torch.tensor([x_slots], dtype=torch.float32), torch.tensor([y_slots], dtype=torch.float32))
    log_density = output[0, 0].double().numpy()
    return log_density - logsumexp(log_density)


def assert_normalised_at(log_density, shape):
    assert log_density.shape == shape and log_density.dtype == np.float64
    assert np.isfinite(log_density).all()
    assert abs(logsumexp(log_density)) < 1e-6


def test_native_size_gives_the_networks_output_with_a_central_dummy_fixation(scanpath_network, image):
    log_density = predict_log_density(scanpath_network, image, UniformCenterbias(), resize="native")
    assert_normalised_at(log_density, (HEIGHT, WIDTH))
    expected = network_log_density(scanpath_network, image, UniformCenterbias().log_density((HEIGHT, WIDTH)),
                                   [WIDTH / 2] + [math.nan] * 3, [HEIGHT / 2] + [math.nan] * 3)
    np.testing.assert_allclose(log_density, expected, rtol=0, atol=1e-6)
    no_history = network_log_density(scanpath_network, image, UniformCenterbias().log_density((HEIGHT, WIDTH)),
                                     [math.nan] * 4, [math.nan] * 4)
    assert np.abs(log_density - no_history).max() > 1e-4


def test_a_resized_input_is_predicted_at_its_size_and_the_density_resized_back(spatial_network, image):
    predictor = DensityPredictor(spatial_network, UniformCenterbias(), resize="max_side", max_side=80)
    shape = predictor.input_shape(image.shape[:2])
    assert shape == (62, 80)
    log_density = predictor.log_density(image)
    assert_normalised_at(log_density, (HEIGHT, WIDTH))
    at_input = network_log_density(spatial_network, resize_image(image, shape), UniformCenterbias().log_density(shape),
                                   [math.nan] * 4, [math.nan] * 4)
    np.testing.assert_allclose(log_density, resize_log_density(at_input, (HEIGHT, WIDTH)), rtol=0, atol=1e-6)
    native = predict_log_density(spatial_network, image, UniformCenterbias(), resize="native")
    assert np.abs(log_density - native).max() > 1e-4


def test_two_sizes_policy_feeds_mit1003_training_sizes(spatial_network):
    predictor = DensityPredictor(spatial_network, UniformCenterbias(), resize="two_sizes")
    assert predictor.input_shape((100, 130)) == (768, 1024)
    assert predictor.input_shape((130, 100)) == (1024, 768)
    assert predictor.input_shape((90, 90)) == (1024, 768)
    with pytest.raises(ValueError, match="max_side"):
        DensityPredictor(spatial_network, UniformCenterbias(), resize="max_side")


def test_template_centre_bias_is_zoomed_to_the_input_size_and_changes_the_output(spatial_network, image, tmp_path):
    rows, cols = np.mgrid[0:40, 0:40]
    template = -((rows - 8.0) ** 2 + (cols - 30.0) ** 2) / 60.0
    np.save(tmp_path / "template.npy", template - logsumexp(template))
    centerbias = TemplateCenterbias(tmp_path / "template.npy")
    with_template = predict_log_density(spatial_network, image, centerbias, resize="native")
    uniform = predict_log_density(spatial_network, image, UniformCenterbias(), resize="native")
    assert_normalised_at(with_template, (HEIGHT, WIDTH))
    assert np.abs(with_template - uniform).max() > 1.0
    expected = network_log_density(spatial_network, image, centerbias.log_density((HEIGHT, WIDTH)),
                                   [math.nan] * 4, [math.nan] * 4)
    np.testing.assert_allclose(with_template, expected, rtol=0, atol=1e-6)
    top_left = with_template[: HEIGHT // 2, WIDTH // 2:].sum()
    bottom_left = with_template[HEIGHT // 2:, : WIDTH // 2].sum()
    assert top_left > bottom_left


def test_history_is_given_in_pixels_of_the_original_image(scanpath_network, image):
    predictor = DensityPredictor(scanpath_network, UniformCenterbias(), resize="max_side", max_side=80)
    height, width = predictor.input_shape(image.shape[:2])
    central = predictor.log_density(image, [WIDTH / 2], [HEIGHT / 2])
    np.testing.assert_allclose(central, predictor.log_density(image), rtol=0, atol=1e-12)
    x_hist, y_hist = [5.0, 20.0, 40.0, 60.0, 100.0, 120.0], [10.0, 90.0, 50.0, 30.0, 70.0, 20.0]
    with_history = predict_log_density(scanpath_network, image, UniformCenterbias(), "max_side", 80, x_hist, y_hist)
    scale_x, scale_y = width / WIDTH, height / HEIGHT
    at_input = network_log_density(
        scanpath_network, resize_image(image, (height, width)), UniformCenterbias().log_density((height, width)),
        [x * scale_x for x in x_hist[::-1][:4]], [y * scale_y for y in y_hist[::-1][:4]],
    )
    np.testing.assert_allclose(with_history, resize_log_density(at_input, (HEIGHT, WIDTH)), rtol=0, atol=1e-6)
    assert np.abs(with_history - central).max() > 1e-4
    empty = predictor.log_density(image, [], [])
    assert_normalised_at(empty, (HEIGHT, WIDTH))


def test_greyscale_images_are_predicted_as_rgb(spatial_network, image):
    grey = image[:, :, 0]
    from_grey = predict_log_density(spatial_network, grey, UniformCenterbias(), resize="native")
    from_rgb = predict_log_density(spatial_network, np.repeat(grey[:, :, None], 3, axis=2), UniformCenterbias(),
                                   resize="native")
    np.testing.assert_array_equal(from_grey, from_rgb)


def test_too_small_input_is_a_data_error_naming_the_source(spatial_network):
    small = np.zeros((40, 90, 3), dtype=np.uint8)
    with pytest.raises(DataError, match=r"photo\.jpg: image is 40x90"):
        predict_log_density(spatial_network, small, UniformCenterbias(), resize="native", source="photo.jpg")


def test_prediction_accepts_the_sizes_the_network_accepts(spatial_network):
    """58 px (the network's minimum, see test_model) is predicted; 57 px is refused with the file named."""
    assert MIN_IMAGE_SIDE == 58
    smallest = predict_log_density(spatial_network, np.zeros((58, 90, 3), np.uint8), UniformCenterbias(), "native")
    assert smallest.shape == (58, 90) and abs(logsumexp(smallest)) < 1e-9
    with pytest.raises(DataError, match=r"b.png: image is 90x57 pixels .* expected both sides >= 58"):
        predict_log_density(spatial_network, np.zeros((90, 57, 3), np.uint8), UniformCenterbias(), "native",
                            source="b.png")


class ZeroMassNetwork(torch.nn.Module):
    """Stand-in network whose output puts no mass (-inf) on the left half and NaN in one pixel."""

    scanpath = False

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def forward(self, image, centerbias, x_hist=None, y_hist=None):
        height, width = centerbias.shape[-2:]
        output = torch.full((1, 1, height, width), -math.log(height * (width - width // 2)))
        output[..., : width // 2] = -math.inf
        output[..., 0, -1] = math.nan
        return output


def test_zero_density_and_nan_become_a_finite_floor(image):
    for resize in ("native", "max_side"):
        log_density = predict_log_density(ZeroMassNetwork(), image, UniformCenterbias(), resize, 80)
        assert_normalised_at(log_density, (HEIGHT, WIDTH))
        assert log_density.min() >= LOG_DENSITY_FLOOR - 20
        assert log_density[:, : WIDTH // 2 - 2].max() < -600
