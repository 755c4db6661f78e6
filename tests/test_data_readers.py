"""Readers of the four sources, image conversion, and the errors every kind of bad input gives."""

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from deepgaze_lit.data import DataError, read_csv_dataset, read_mit1003, read_pysaliency
from deepgaze_lit.data.images import load_rgb

# Origin: fixture written by pysaliency 0.2.22 itself (the shared fixtures folder pysaliency_mini), copied into tests/data.
FIXTURE = Path(__file__).parent / "data" / "pysaliency_mini"


@pytest.fixture(scope="module")
def expected():
    return json.loads((FIXTURE / "expected.json").read_text())


@pytest.fixture
def fixture_copy(tmp_path):
    target = tmp_path / "mini"
    shutil.copytree(FIXTURE, target)
    for file in target.rglob("*"):
        file.chmod(0o644 if file.is_file() else 0o755)
    target.chmod(0o755)
    return target


def test_fixture_counts_and_histories(expected):
    data = read_pysaliency(FIXTURE)
    assert data.n_images == expected["n_stimuli"]
    assert data.shapes.tolist() == expected["shapes"]
    assert data.n_fixations == expected["n_fixations"]
    assert int(data.is_target.sum()) == expected["n_fixations_after_initial"]
    assert len(np.unique(data.scanpath_index)) == expected["n_scanpaths"]
    assert data.dropped_fixations == 0
    first = expected["first_scanpath"]
    rows = np.flatnonzero(data.scanpath_index == 0)
    np.testing.assert_array_equal(data.x[rows], first["x"])
    np.testing.assert_array_equal(data.y[rows], first["y"])
    assert set(data.n[rows]) == {first["n"]} and set(data.subject[rows]) == {first["subject"]}
    np.testing.assert_array_equal(data.x_hist[3], np.array(expected["x_hist_of_fixation_3"], dtype=float))
    np.testing.assert_array_equal(data.y_hist[3, :3], first["y"][:3])
    assert data.is_initial[rows].tolist() == [True, False, False, False]
    assert data.has_history


def test_fixture_initial_fixation_can_be_declared_absent(expected):
    data = read_pysaliency(FIXTURE, initial_fixation=False)
    assert int(data.is_target.sum()) == expected["n_fixations"]


def test_greyscale_stimulus_loads_as_rgb():
    data = read_pysaliency(FIXTURE)
    image = data.load_image(4)
    assert image.shape == (72, 128, 3) and image.dtype == np.uint8
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()


def _rewrite_as_fixations_layout(folder: Path) -> None:
    """Store the fixture's fixations as pysaliency's per-fixation `Fixations` type (version 1.0)."""
    data = read_pysaliency(FIXTURE)
    (folder / "fixations.hdf5").unlink()
    with h5py.File(folder / "fixations.hdf5", "w") as handle:
        handle.attrs["type"] = np.bytes_("Fixations")
        handle.attrs["version"] = np.bytes_("1.0")
        handle.attrs["__attributes__"] = np.bytes_(json.dumps(["subjects", "scanpath_index"]))
        for key, value in {"x": data.x, "y": data.y, "t": data.t, "x_hist": data.x_hist, "y_hist": data.y_hist,
                           "t_hist": np.full_like(data.x_hist, np.nan), "n": data.n, "subjects": data.subject,
                           "scanpath_index": data.scanpath_index}.items():
            handle.create_dataset(key, data=value)


def test_fixations_layout_reads_like_fixation_trains(fixture_copy):
    _rewrite_as_fixations_layout(fixture_copy)
    trains, fixations = read_pysaliency(FIXTURE), read_pysaliency(fixture_copy)
    for key in ("x", "y", "n", "subject", "x_hist", "y_hist", "scanpath_index", "is_initial"):
        np.testing.assert_array_equal(getattr(fixations, key), getattr(trains, key))


def test_stimuli_layout_with_pixels_in_hdf5(fixture_copy):
    files = read_pysaliency(FIXTURE).image_paths
    (fixture_copy / "stimuli.hdf5").unlink()
    with h5py.File(fixture_copy / "stimuli.hdf5", "w") as handle:
        handle.attrs["type"] = np.bytes_("Stimuli")
        handle.attrs["version"] = np.bytes_("1.1")
        handle.attrs["__attributes__"] = np.bytes_("[]")
        handle.attrs["size"] = len(files)
        for index, file in enumerate(files):
            handle.create_dataset(str(index), data=np.asarray(Image.open(file)))
    data = read_pysaliency(fixture_copy)
    assert data.images is not None and data.n_images == 12 and data.n_fixations == 145
    np.testing.assert_array_equal(data.load_image(4), read_pysaliency(FIXTURE).load_image(4))


def _set_attrs(path: Path, **attrs) -> None:
    with h5py.File(path, "a") as handle:
        for key, value in attrs.items():
            handle.attrs[key] = np.bytes_(value)


@pytest.mark.parametrize("file, attrs, message", [
    ("fixations.hdf5", {"type": "ScanpathFixations"}, "newer, unreleased pysaliency"),
    ("fixations.hdf5", {"type": "Scanpaths"}, "newer, unreleased pysaliency"),
    ("fixations.hdf5", {"type": "Something"}, "unknown hdf5 type 'Something'"),
    ("fixations.hdf5", {"version": "9.9"}, "version '9.9' is not supported"),
    ("stimuli.hdf5", {"version": "3.0"}, "FileStimuli version '3.0' is not supported"),
])
def test_unknown_hdf5_type_or_version(fixture_copy, file, attrs, message):
    _set_attrs(fixture_copy / file, **attrs)
    with pytest.raises(DataError, match=message) as error:
        read_pysaliency(fixture_copy)
    assert str(fixture_copy / file) in str(error.value)


def test_pysaliency_missing_folder_file_and_image(tmp_path, fixture_copy):
    with pytest.raises(DataError, match="dataset folder not found"):
        read_pysaliency(tmp_path / "nowhere")
    (fixture_copy / "stimuli" / "img007.jpeg").unlink()
    with pytest.raises(DataError, match="img007.jpeg"):
        read_pysaliency(fixture_copy)
    (fixture_copy / "fixations.hdf5").unlink()
    with pytest.raises(DataError, match="fixations.hdf5: file not found"):
        read_pysaliency(fixture_copy)


def test_pysaliency_empty_and_inconsistent_fixations(fixture_copy):
    path = fixture_copy / "fixations.hdf5"
    with h5py.File(path, "a") as handle:
        handle["train_ns"][0] = 12
    with pytest.raises(DataError, match="refer to image 12 but .* has 12 stimuli"):
        read_pysaliency(fixture_copy)
    with h5py.File(path, "a") as handle:
        for key in ("train_xs", "train_ys", "train_ts", "train_ns", "train_subjects"):
            shape = (0,) + handle[key].shape[1:]
            del handle[key]
            handle.create_dataset(key, shape=shape, dtype="f8" if "s" in key[-2:] and key != "train_ns" else "i8")
    with pytest.raises(DataError, match="no fixations"):
        read_pysaliency(fixture_copy)


def test_corrupt_image_names_the_file(fixture_copy):
    image = fixture_copy / "stimuli" / "img003.jpeg"
    image.write_bytes(image.read_bytes()[:300])
    data = read_pysaliency(fixture_copy)
    with pytest.raises(DataError, match="img003.jpeg: cannot decode image"):
        data.load_image(3)


def _save_point_map(path: Path, shape, points) -> None:
    points_map = np.zeros(shape, dtype=np.uint8)
    for x, y in points:
        points_map[y, x] = 255
    Image.fromarray(points_map).save(path, quality=75)


@pytest.fixture
def mit_folder(tmp_path):
    root = tmp_path / "MIT1003"
    (root / "ALLSTIMULI").mkdir(parents=True)
    (root / "ALLFIXATIONMAPS").mkdir()
    rng = np.random.default_rng(0)
    layout = {"i10.jpeg": (60, 80), "i2.jpeg": (80, 60), "i1.jpeg": (50, 90)}
    points = {}
    for name, shape in layout.items():
        Image.fromarray(rng.integers(0, 255, shape + (3,), dtype=np.uint8)).save(root / "ALLSTIMULI" / name)
        xs = rng.choice(shape[1], size=12, replace=False)
        ys = rng.choice(shape[0], size=12, replace=False)
        points[name] = sorted(zip(xs.tolist(), ys.tolist()))
        _save_point_map(root / "ALLFIXATIONMAPS" / f"{Path(name).stem}_fixPts.jpg", shape, points[name])
        Image.fromarray(np.zeros(shape, np.uint8)).save(root / "ALLFIXATIONMAPS" / f"{Path(name).stem}_fixMap.jpg")
    (root / "ALLSTIMULI" / "Thumbs.db").write_bytes(b"junk")
    return root, points


def test_mit1003_layout_recovers_fixation_points(mit_folder):
    root, points = mit_folder
    data = read_mit1003(root)
    assert [Path(p).name for p in data.image_paths] == ["i1.jpeg", "i2.jpeg", "i10.jpeg"]
    assert data.shapes.tolist() == [[50, 90], [80, 60], [60, 80]]
    for index, name in enumerate(["i1.jpeg", "i2.jpeg", "i10.jpeg"]):
        found = sorted(zip(data.x[data.n == index].astype(int).tolist(), data.y[data.n == index].astype(int).tolist()))
        assert found == points[name]
    assert not data.has_history and (data.subject == -1).all() and not data.is_initial.any()


def test_mit1003_bad_layouts(mit_folder, tmp_path):
    root, _ = mit_folder
    with pytest.raises(DataError, match="nowhere: folder not found"):
        read_mit1003(tmp_path / "nowhere")
    (tmp_path / "only" / "ALLSTIMULI").mkdir(parents=True)
    with pytest.raises(DataError, match="ALLFIXATIONMAPS: folder not found"):
        read_mit1003(tmp_path / "only")
    (root / "ALLFIXATIONMAPS" / "i2_fixPts.jpg").unlink()
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "ALLFIXATIONMAPS" / "i1_fixPts.jpg")
    with pytest.raises(DataError, match="i1_fixPts.jpg: map is 10x10 but its stimulus"):
        read_mit1003(root)
    _save_point_map(root / "ALLFIXATIONMAPS" / "i1_fixPts.jpg", (50, 90), [(3, 4)])
    with pytest.raises(DataError, match="i2_fixPts.jpg: fixation-point map not found"):
        read_mit1003(root)
    for image in (root / "ALLSTIMULI").glob("*.jpeg"):
        image.unlink()
    with pytest.raises(DataError, match="ALLSTIMULI: no images"):
        read_mit1003(root)


def _write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header] + rows) + "\n")
    return path


@pytest.fixture
def csv_folder(tmp_path):
    """Images in several modes: greyscale JPEG, CMYK JPEG, RGBA PNG, palette PNG, 16-bit greyscale PNG."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(rgb[..., 0]).save(images / "grey.jpg")
    Image.fromarray(rgb).convert("CMYK").save(images / "cmyk.jpg")
    Image.fromarray(np.dstack([rgb, np.full((40, 50), 128, np.uint8)])).save(images / "rgba.png")
    Image.fromarray(rgb).convert("P").save(images / "palette.png")
    Image.fromarray((rgb[..., 1].astype(np.uint16) * 257)).save(images / "deep.png")
    Image.fromarray(rgb).save(images / "unused.png")
    return images, rgb


def test_csv_image_modes_become_rgb(csv_folder, tmp_path):
    images, rgb = csv_folder
    names = ["grey.jpg", "cmyk.jpg", "rgba.png", "palette.png", "deep.png"]
    csv_path = _write_csv(tmp_path / "fix.csv", "image,x,y", [f"{name},10,20" for name in names])
    data = read_csv_dataset(images, csv_path)
    for index, path in enumerate(data.image_paths):
        image = data.load_image(index)
        assert image.shape == (40, 50, 3) and image.dtype == np.uint8, path
    np.testing.assert_array_equal(load_rgb(images / "rgba.png"), rgb)
    np.testing.assert_array_equal(load_rgb(images / "deep.png")[..., 0], rgb[..., 1])
    assert not data.has_history


def test_csv_scanpaths_order_by_time_and_drop_outside(csv_folder, tmp_path):
    images, _ = csv_folder
    rows = ["rgba.png,25,20,s1,0.9,a", "rgba.png,25,20,s1,0.0,a", "rgba.png,5,6,s1,0.4,a",
            "rgba.png,60,6,s1,1.2,a", "grey.jpg,24,21,s2,0.0,a", "grey.jpg,3,4,s2,0.5,a"]
    csv_path = _write_csv(tmp_path / "fix.csv", "image,x,y,subject,t,scanpath", rows)
    data = read_csv_dataset(images, csv_path)
    names = [Path(p).name for p in data.image_paths]
    assert names == ["cmyk.jpg", "deep.png", "grey.jpg", "palette.png", "rgba.png", "unused.png"]
    assert data.dropped_fixations == 1
    assert data.targets_per_image().tolist() == [0, 0, 1, 0, 2, 0]
    last = np.flatnonzero((data.n == 4) & (data.t == 0.9))[0]
    np.testing.assert_array_equal(data.x_hist[last, :2], [25, 5])
    assert data.is_initial[(data.n == 4) & (data.t == 0.0)].all()
    assert sorted(set(data.subject.tolist())) == [0, 1]


@pytest.mark.parametrize("header, rows, message", [
    ("image,x", ["rgba.png,1"], "missing column"),
    ("image,x,y", [], "no fixation rows"),
    ("image,x,y", ["rgba.png,one,2"], "line 2: column 'x' is 'one'; expected a finite number"),
    ("image,x,y", ["gone.png,1,2"], "missing from .*images, e.g. gone.png"),
    ("image,x,y,subject,scanpath", ["rgba.png,1,2,a,s", "rgba.png,1,2,b,s"], "mixes subjects"),
])
def test_csv_bad_rows(csv_folder, tmp_path, header, rows, message):
    images, _ = csv_folder
    csv_path = _write_csv(tmp_path / "fix.csv", header, rows)
    with pytest.raises(DataError, match=message) as error:
        read_csv_dataset(images, csv_path)
    assert str(csv_path) in str(error.value)


def test_csv_missing_paths_and_unreadable_image(csv_folder, tmp_path):
    images, _ = csv_folder
    csv_path = _write_csv(tmp_path / "fix.csv", "image,x,y", ["broken.png,1,2"])
    with pytest.raises(DataError, match="image folder not found"):
        read_csv_dataset(tmp_path / "nowhere", csv_path)
    with pytest.raises(DataError, match="CSV file not found"):
        read_csv_dataset(images, tmp_path / "none.csv")
    (images / "broken.png").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="broken.png: not a readable image"):
        read_csv_dataset(images, csv_path)


def test_mit1003_without_any_fixated_pixel(mit_folder):
    root, _ = mit_folder
    for point_map in (root / "ALLFIXATIONMAPS").glob("*_fixPts.jpg"):
        shape = np.asarray(Image.open(point_map)).shape
        Image.fromarray(np.zeros(shape, np.uint8)).save(point_map)
    with pytest.raises(DataError, match="no fixated pixel"):
        read_mit1003(root)
