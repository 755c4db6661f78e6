"""read_pysaliency: the pysaliency 0.2.22 cache layout (stimuli.hdf5 + fixations.hdf5 + image files), via h5py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import h5py
import numpy as np
from PIL import Image

from .dataset import FixationDataset, detect_initial_fixations
from .errors import DataError
from .images import pil_to_rgb

STIMULI_VERSIONS = {"FileStimuli": ("1.0", "2.0", "2.1"), "Stimuli": ("1.0", "1.1")}
FIXATIONS_VERSIONS = {"FixationTrains": ("1.0", "1.1", "1.2"), "Fixations": ("1.0",)}
NEWER_LAYOUTS = ("ScanpathFixations", "Scanpaths")


def _text(value) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def _type_and_version(handle: h5py.File, path: Path, known: dict[str, tuple[str, ...]]) -> tuple[str, str]:
    if "type" not in handle.attrs or "version" not in handle.attrs:
        raise DataError(f"{path}: no 'type'/'version' attributes; expected an hdf5 file written by pysaliency 0.2.22")
    data_type = _text(handle.attrs["type"])
    version = _text(handle.attrs["version"])
    if data_type in NEWER_LAYOUTS:
        raise DataError(f"{path}: type '{data_type}' is the layout of a newer, unreleased pysaliency; expected "
                        f"{' or '.join(known)} as written by pysaliency 0.2.22 (re-export the data with "
                        "pysaliency 0.2.22, or convert it to the CSV layout)")
    if data_type not in known:
        raise DataError(f"{path}: unknown hdf5 type '{data_type}'; expected one of {', '.join(known)}")
    if version not in known[data_type]:
        raise DataError(f"{path}: {data_type} version '{version}' is not supported; "
                        f"expected one of {', '.join(known[data_type])}")
    return data_type, version


def _open_hdf5(path: Path) -> h5py.File:
    """`path` opened read-only; DataError naming the file when it is not HDF5 (or truncated, or unreadable)."""
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise DataError(f"{path}: not a readable HDF5 file ({err}); expected the {path.name} that pysaliency "
                        "0.2.22 writes") from err


def _read_stimuli(path: Path) -> dict:
    """Shapes and image paths (FileStimuli) or pixels (Stimuli) from stimuli.hdf5."""
    with _open_hdf5(path) as handle:
        data_type, version = _type_and_version(handle, path, STIMULI_VERSIONS)
        if data_type == "Stimuli":
            count = int(handle.attrs["size"])
            missing = [str(i) for i in range(count) if str(i) not in handle]
            if missing:
                raise DataError(f"{path}: Stimuli datasets {', '.join(missing[:5])} are missing; "
                                f"expected '0'..'{count - 1}'")
            images = [_stimulus_to_rgb(handle[str(i)][...], path, i) for i in range(count)]
            shapes = np.array([image.shape[:2] for image in images], dtype=np.int64).reshape(-1, 2)
            return {"shapes": shapes, "images": images}
        for key in ("filenames", "shapes"):
            if key not in handle:
                raise DataError(f"{path}: FileStimuli without a '{key}' dataset")
        names = [_text(name) for name in handle["filenames"][...]]
        shapes = np.array([list(shape)[:2] for shape in handle["shapes"][...]], dtype=np.int64).reshape(-1, 2)
    if version >= "2.0":
        files = [path.parent / name for name in names]
    else:
        files = [Path(name) for name in names]
    missing = [str(file) for file in files if not file.is_file()]
    if missing:
        raise DataError(f"{path} lists {len(missing)} image file(s) that do not exist, e.g. {missing[0]}; "
                        "expected the images next to the hdf5 file at the listed relative paths")
    return {"shapes": shapes, "image_paths": [str(file) for file in files]}


def _stimulus_to_rgb(array: np.ndarray, path: Path, index: int) -> np.ndarray:
    if array.ndim == 2:
        return np.repeat(array.astype(np.uint8)[:, :, None], 3, axis=2)
    if array.ndim == 3 and array.shape[2] in (3, 4):
        return pil_to_rgb(Image.fromarray(array.astype(np.uint8)))
    raise DataError(f"{path}: stimulus '{index}' has shape {array.shape}; expected (H,W), (H,W,3) or (H,W,4)")


def _read_fixation_trains(handle: h5py.File, path: Path) -> dict:
    keys = ("train_xs", "train_ys", "train_ts", "train_ns", "train_subjects")
    missing = [key for key in keys if key not in handle]
    if missing:
        raise DataError(f"{path}: FixationTrains without {', '.join(missing)}")
    return {key: handle[key][...] for key in keys}


def _read_fixations(handle: h5py.File, path: Path) -> dict:
    keys = ("x", "y", "t", "x_hist", "y_hist", "n", "subjects")
    missing = [key for key in keys if key not in handle]
    if missing:
        raise DataError(f"{path}: Fixations without {', '.join(missing)}")
    data = {key: handle[key][...] for key in keys}
    attributes = json.loads(_text(handle.attrs.get("__attributes__", "[]")))
    if "scanpath_index" in attributes and "scanpath_index" in handle:
        data["scanpath_index"] = handle["scanpath_index"][...]
    return data


def read_pysaliency(path: str | Path, initial_fixation: Optional[bool] = None) -> FixationDataset:
    """Read a dataset cached by pysaliency 0.2.22: `<path>/stimuli.hdf5`, `<path>/fixations.hdf5` and the images.

    Supported: stimuli of type FileStimuli (images as files; version 2.x paths relative to the hdf5 file) or
    Stimuli (pixels inside the hdf5); fixations of type FixationTrains (scanpaths, rebuilt into fixations with
    histories exactly as pysaliency does) or Fixations (per-fixation arrays). Coordinates are pixels of the native
    images. `initial_fixation`: whether scanpaths start with the forced central fixation (history only, never a
    target); None detects it. Fixations outside their image are dropped and counted.
    Raises DataError naming the file for a missing folder/file, an unknown type or version (including the
    newer `ScanpathFixations` layout) or an empty dataset.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found; expected a folder with stimuli.hdf5 and fixations.hdf5")
    stimuli_path, fixations_path = root / "stimuli.hdf5", root / "fixations.hdf5"
    for file in (stimuli_path, fixations_path):
        if not file.is_file():
            raise DataError(f"{file}: file not found; expected pysaliency's stimuli.hdf5 and fixations.hdf5 in {root}")
    stimuli = _read_stimuli(stimuli_path)
    if len(stimuli["shapes"]) == 0:
        raise DataError(f"{stimuli_path}: no stimuli; expected at least one image")
    with _open_hdf5(fixations_path) as handle:
        data_type, _ = _type_and_version(handle, fixations_path, FIXATIONS_VERSIONS)
        read = _read_fixation_trains if data_type == "FixationTrains" else _read_fixations
        fixations = read(handle, fixations_path)
    n_images = len(stimuli["shapes"])
    image_index = fixations["train_ns"] if data_type == "FixationTrains" else fixations["n"]
    if len(image_index) == 0:
        raise DataError(f"{fixations_path}: no fixations; expected at least one")
    if image_index.min() < 0 or image_index.max() >= n_images:
        raise DataError(f"{fixations_path}: fixations refer to image {image_index.max()} but {stimuli_path} has "
                        f"{n_images} stimuli")
    common = dict(source=str(root), **stimuli)
    if data_type == "FixationTrains":
        dataset = FixationDataset.from_scanpaths(
            xs=fixations["train_xs"], ys=fixations["train_ys"], ts=fixations["train_ts"],
            ns=fixations["train_ns"], subjects=fixations["train_subjects"],
            initial_fixation=initial_fixation, **common)
    else:
        dataset = FixationDataset(
            x=fixations["x"], y=fixations["y"], t=fixations["t"], n=fixations["n"],
            subject=fixations["subjects"], x_hist=fixations["x_hist"], y_hist=fixations["y_hist"],
            scanpath_index=fixations.get("scanpath_index"), has_history=True, **common)
        dataset.is_initial = detect_initial_fixations(dataset, initial_fixation)
    return dataset.without_fixations_outside()
