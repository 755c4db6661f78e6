"""Prediction outputs: names, streaming writers in every format, resume, refusals (deepgaze_lit.output)."""

import logging
import tracemalloc
from pathlib import Path, PurePosixPath

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.special import logsumexp

from deepgaze_lit.data.centerbias import TemplateCenterbias, UniformCenterbias
from deepgaze_lit.data.dataset import DataError
from deepgaze_lit.inference import DensityPredictor
from deepgaze_lit.model import DeepGazeIII
from deepgaze_lit.output import (
    OUTPUT_FORMATS,
    list_input_images,
    make_writers,
    minimal_unique_names,
    write_predictions,
)
from deepgaze_lit.output.writers import HDF5_FILE_NAME, SaliencyMapWriter, saliency_map_uint8

TREE = {  # relative path -> (height, width)
    "a/x.jpg": (100, 130),
    "b/x.jpg": (120, 90),
    "x.png": (96, 96),
}


@pytest.fixture(scope="module")
def predictor():
    torch.manual_seed(0)
    network = DeepGazeIII(num_components=1, scanpath=False, backbone_weights="none")
    torch.nn.init.normal_(network.finalizers[0].center_bias_weight, 1.0, 0.1)
    return DensityPredictor(network, UniformCenterbias(), resize="max_side", max_side=80)


def write_tree(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for relative, (height, width) in TREE.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(root / relative)
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    Image.fromarray(np.zeros((80, 80, 3), dtype=np.uint8)).save(root / ".hidden" / "y.png")
    return root


def npy_name(relative: str) -> str:
    """The npy output of an input of TREE, relative to the output folder."""
    return f"npy/{relative.rsplit('.', 1)[0]}.npy"


def output_files(folder: Path) -> dict[str, float]:
    """Relative path -> modification time of every file below `folder`."""
    return {path.relative_to(folder).as_posix(): path.stat().st_mtime_ns for path in folder.rglob("*")
            if path.is_file()}


def test_minimal_unique_names_follow_pysaliency():
    assert minimal_unique_names(["/data/imgs/a/x.jpg", "/data/imgs/b/x.jpg", "/data/imgs/x.png"]) == [
        "a/x.jpg", "b/x.jpg", "x.png"]
    assert minimal_unique_names(["/data/imgs/a/x.jpg", "/data/imgs/a/y.jpg"]) == ["x.jpg", "y.jpg"]
    assert minimal_unique_names(["/data/imgs/a/x.jpg"]) == ["x.jpg"]
    assert minimal_unique_names(["a/sub/x.jpg", "a/y.jpg"]) == ["sub/x.jpg", "y.jpg"]
    with pytest.raises(ValueError, match="distinct"):
        minimal_unique_names(["a/x.jpg", "a/x.jpg"])


def test_a_folder_is_walked_with_hidden_and_non_image_files_left_out(tmp_path):
    images = list_input_images(write_tree(tmp_path / "images"))
    assert [str(image.relative) for image in images] == ["a/x.jpg", "b/x.jpg", "x.png"]
    assert [image.key for image in images] == ["a/x.jpg", "b/x.jpg", "x.png"]
    assert images[0].mirrored(".npy") == PurePosixPath("a/x.npy")
    single = list_input_images(tmp_path / "images" / "a" / "x.jpg")
    assert [(str(image.relative), image.key) for image in single] == [("x.jpg", "x.jpg")]
    with pytest.raises(DataError, match="not an image file"):
        list_input_images(tmp_path / "images" / "notes.txt")


def test_same_stem_in_one_folder_is_refused_naming_both(tmp_path):
    root = write_tree(tmp_path / "images")
    Image.fromarray(np.zeros((80, 80, 3), dtype=np.uint8)).save(root / "a" / "x.png")
    with pytest.raises(DataError, match=r"a/x\.jpg and .*a/x\.png have the same name"):
        list_input_images(root)


def test_every_format_gives_distinct_mirrored_outputs_and_hdf5_equals_npy(predictor, tmp_path):
    source = write_tree(tmp_path / "images")
    out = tmp_path / "out"
    summary = write_predictions(predictor, source, make_writers(out, OUTPUT_FORMATS))
    assert (summary.written, summary.skipped, summary.failed) == (3, 0, [])
    assert sorted(output_files(out)) == sorted(
        [HDF5_FILE_NAME] + [f"{folder}/{relative.rsplit('.', 1)[0]}.{suffix}" for relative in TREE
                            for folder, suffix in (("npy", "npy"), ("saliency", "png"), ("overlay", "png"))])
    with h5py.File(out / HDF5_FILE_NAME, "r") as file:
        keys = []
        file.visititems(lambda name, item: keys.append(name) if isinstance(item, h5py.Dataset) else None)
        assert sorted(keys) == sorted(TREE)
        for relative, shape in TREE.items():
            stored = np.load(out / npy_name(relative))
            assert stored.dtype == np.float32 and stored.shape == shape
            assert abs(logsumexp(stored.astype(np.float64))) < 1e-6
            np.testing.assert_array_equal(file[relative][:], stored)
            assert file[relative].compression == "gzip"
            with Image.open(out / "saliency" / relative.replace(Path(relative).suffix, ".png")) as saliency:
                assert saliency.mode == "L" and saliency.size == shape[::-1]
                np.testing.assert_array_equal(np.asarray(saliency), saliency_map_uint8(stored.astype(np.float64)))
                assert np.asarray(saliency).max() == 255
            with Image.open(out / "overlay" / relative.replace(Path(relative).suffix, ".png")) as overlay:
                assert overlay.mode == "RGB" and overlay.size == shape[::-1]
    first, second = (np.load(out / "npy" / name) for name in ("a/x.npy", "b/x.npy"))
    assert first.shape != second.shape


def test_saliency_maps_can_keep_the_input_names_for_benchmark_submissions(predictor, tmp_path):
    source = write_tree(tmp_path / "images")
    write_predictions(predictor, source, make_writers(tmp_path / "out", ["saliency"], keep_extension=True))
    assert sorted(output_files(tmp_path / "out" / "saliency")) == sorted(TREE)
    with Image.open(tmp_path / "out" / "saliency" / "a" / "x.jpg") as saliency:
        assert saliency.format == "JPEG" and saliency.mode == "L" and saliency.size == (130, 100)


def test_a_rerun_skips_complete_outputs_and_continues_an_interrupted_one(predictor, tmp_path, monkeypatch):
    source = write_tree(tmp_path / "images")
    out = tmp_path / "out"
    write_predictions(predictor, source, make_writers(out, OUTPUT_FORMATS))
    before = output_files(out)
    reference = {name: np.load(out / name) for name in before if name.endswith(".npy")}

    calls = []
    monkeypatch.setattr(predictor, "log_density", lambda *args, **kwargs: calls.append(args))
    summary = write_predictions(predictor, source, make_writers(out, OUTPUT_FORMATS))
    assert (summary.written, summary.skipped, calls) == (0, 3, [])
    after = output_files(out)
    assert {name: time for name, time in after.items() if name != HDF5_FILE_NAME} == {
        name: time for name, time in before.items() if name != HDF5_FILE_NAME}
    monkeypatch.undo()

    (out / "npy" / "b" / "x.npy").unlink()
    (out / "npy" / "b" / ".x.npy.partial").write_bytes(b"half a file")
    with h5py.File(out / HDF5_FILE_NAME, "a") as file:
        del file["b/x.jpg"]
        file.create_dataset("b/x.jpg.partial", data=np.zeros(3))
    summary = write_predictions(predictor, source, make_writers(out, ["npy", "hdf5"]))
    assert (summary.written, summary.skipped) == (1, 2)
    assert not (out / "npy" / "b" / ".x.npy.partial").exists()
    with h5py.File(out / HDF5_FILE_NAME, "r") as file:
        assert "b/x.jpg.partial" not in file
        for relative in TREE:
            np.testing.assert_array_equal(file[relative][:], reference[npy_name(relative)])
    np.testing.assert_array_equal(np.load(out / "npy" / "b" / "x.npy"), reference["npy/b/x.npy"])
    assert output_files(out / "npy")["a/x.npy"] == before["npy/a/x.npy"]


def test_existing_outputs_are_replaced_only_with_overwrite(predictor, tmp_path):
    source = write_tree(tmp_path / "images")
    out = tmp_path / "out"
    write_predictions(predictor, source, make_writers(out, ["npy", "hdf5"]))
    first = np.load(out / "npy" / "x.npy")
    rows, cols = np.mgrid[0:32, 0:32]
    np.save(tmp_path / "template.npy", -((rows - 4.0) ** 2 + (cols - 4.0) ** 2) / 20.0)
    other = DensityPredictor(predictor.network, TemplateCenterbias(tmp_path / "template.npy"), "max_side", 80)
    write_predictions(other, source, make_writers(out, ["npy", "hdf5"]))
    np.testing.assert_array_equal(np.load(out / "npy" / "x.npy"), first)
    summary = write_predictions(other, source, make_writers(out, ["npy", "hdf5"]), overwrite=True)
    assert summary.written == 3
    replaced = np.load(out / "npy" / "x.npy")
    assert np.abs(replaced - first).max() > 0.5
    with h5py.File(out / HDF5_FILE_NAME, "r") as file:
        np.testing.assert_array_equal(file["x.png"][:], replaced)


def test_outputs_in_the_input_folder_or_onto_an_input_are_refused_before_any_work(predictor, tmp_path):
    source = write_tree(tmp_path / "images")
    for out in (source, source / "predictions"):
        with pytest.raises(DataError, match="inside the input folder"):
            write_predictions(predictor, source, make_writers(out, ["npy"]))
    assert not (source / "predictions").exists()
    single = source / "x.png"
    with pytest.raises(DataError, match=r"x\.png: the output would overwrite this input"):
        write_predictions(predictor, single, [SaliencyMapWriter(source, keep_extension=True)])
    summary = write_predictions(predictor, single, make_writers(tmp_path / "single", ["npy"]))
    assert summary.written == 1 and (tmp_path / "single" / "npy" / "x.npy").is_file()


def test_an_unwritable_output_folder_fails_before_any_work(predictor, tmp_path):
    source = write_tree(tmp_path / "images")
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the output folder should be")
    with pytest.raises(DataError, match="cannot write predictions there"):
        write_predictions(predictor, source, make_writers(blocked, ["npy"]))


def test_an_unreadable_image_is_skipped_with_one_warning_and_counted(predictor, tmp_path, caplog):
    source = write_tree(tmp_path / "images")
    (source / "b" / "x.jpg").write_bytes(b"not a jpeg")
    with caplog.at_level(logging.WARNING):
        summary = write_predictions(predictor, source, make_writers(tmp_path / "out", ["npy"]))
    assert summary.written == 2 and summary.failed == [str(source / "b" / "x.jpg")]
    assert [record.getMessage() for record in caplog.records if "b/x.jpg" in record.getMessage()] != []
    assert sorted(output_files(tmp_path / "out" / "npy")) == ["a/x.npy", "x.npy"]


def test_an_image_over_pillows_pixel_limit_is_skipped_naming_the_limit(predictor, tmp_path, monkeypatch, caplog):
    source = write_tree(tmp_path / "images")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 130 // 2 - 1)  # a/x.jpg is over twice the limit
    with caplog.at_level(logging.WARNING):
        summary = write_predictions(predictor, source, make_writers(tmp_path / "out", ["npy"]))
    assert summary.failed == [str(source / "a" / "x.jpg")] and summary.written == 2
    assert "MAX_IMAGE_PIXELS" in caplog.text and "downscale it" in caplog.text


def test_unknown_formats_are_refused(tmp_path):
    with pytest.raises(DataError, match="expected one or more of npy, hdf5, saliency, overlay"):
        make_writers(tmp_path, ["npy", "jpeg"])


class UniformPredictor:
    """Stand-in predictor: the uniform log density at the image's size."""

    def log_density(self, image, x_hist=None, y_hist=None, source="image"):
        height, width = image.shape[:2]
        return np.full((height, width), -np.log(height * width))


def test_memory_stays_flat_as_the_folder_grows(tmp_path):
    def peak_bytes(count):
        source = tmp_path / f"images{count}"
        source.mkdir()
        pixels = np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)
        for index in range(count):
            Image.fromarray(pixels).save(source / f"img{index}.png")
        tracemalloc.start()
        write_predictions(UniformPredictor(), source, make_writers(tmp_path / f"out{count}", OUTPUT_FORMATS))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak

    one_image = 200 * 300 * 8
    small, large = peak_bytes(10), peak_bytes(40)
    assert small > one_image and large < small + one_image


def test_hdf5_file_is_closed_and_complete_between_images(tmp_path):
    """Each image's dataset is on disk, readable by another reader, before the next image is predicted."""
    source = write_tree(tmp_path / "images")
    path = tmp_path / "out" / HDF5_FILE_NAME
    seen_by_reader = []

    class ReadingPredictor(UniformPredictor):
        def log_density(self, image, x_hist=None, y_hist=None, source="image"):
            with h5py.File(path, "r") as file:
                names: list[str] = []
                file.visititems(lambda name, item: names.append(name) if isinstance(item, h5py.Dataset) else None)
                seen_by_reader.append(sorted(names))
            return super().log_density(image)

    write_predictions(ReadingPredictor(), source, make_writers(tmp_path / "out", ["hdf5"]))
    assert seen_by_reader == [[], ["a/x.jpg"], ["a/x.jpg", "b/x.jpg"]]
