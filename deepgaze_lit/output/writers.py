"""Streaming writers of per-image predictions: one image's output at a time, resumable, never a partial file.

Every writer has `destination` (its folder or file), `output_path(image)`, `open(overwrite)`, `is_done(image)`,
`write(image, pixels, log_density)` and `close()`. Files are written to a hidden `.<name>.partial` beside the
target and renamed into place, so an existing output is complete; `open` removes partials an interrupted run left.
HDF5 datasets are written under a `.partial` name and renamed once written, with the file closed after each, so a
dataset that exists under its own name is complete and an interrupted file is continued in append mode.

Formats (`make_writers` lays them out under one output folder):
- `npy`: `npy/<relative folder>/<stem>.npy`, float32 (H,W) log density in nats at the image's size.
- `hdf5`: `log_densities.hdf5`, pysaliency's `export_model_to_hdf5` layout: one gzip (level 9) dataset per image
  named by its minimal unique file name (folders become HDF5 groups), holding the same float32 log density as the
  npy file; readable by pysaliency's `HDF5Model`.
- `saliency`: `saliency/<relative folder>/<stem>.png`, 8-bit greyscale saliency map: the density scaled so that
  its maximum is 255, rounded. `keep_extension=True` keeps the input's file name and format instead (JPEG at
  quality 100 for `.jpg`), as the MIT300 / CAT2000 submission pages ask ("same size and name as the original
  images", category folders kept).
- `overlay`: `overlay/<relative folder>/<stem>.png`, the heat-map overlay of `density_overlay` (RGB).
"""

from __future__ import annotations

import os
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import BinaryIO, Callable, Optional, Sequence

import h5py
import numpy as np
from PIL import Image

from deepgaze_lit.data.errors import DataError
from deepgaze_lit.output.names import InputImage
from deepgaze_lit.rendering import density_overlay

PARTIAL_SUFFIX = ".partial"
"""Suffix of an output being written (hidden files `.<name>.partial`, HDF5 datasets `<name>.partial`)."""
OUTPUT_FORMATS = ("npy", "hdf5", "saliency", "overlay")
"""Output formats, in the order `make_writers` accepts them."""
HDF5_FILE_NAME = "log_densities.hdf5"
"""Name of the HDF5 output file inside the output folder."""
HDF5_COMPRESSION_LEVEL = 9
"""gzip level of the HDF5 datasets (pysaliency's default)."""


def _unwritable(destination: Path, err: OSError) -> DataError:
    return DataError(f"{destination}: cannot write predictions there ({err.strerror or err}); "
                     "choose a writable output folder")


def ensure_writable_folder(folder: Path) -> None:
    """Create `folder` and check that a file can be written in it; DataError naming it otherwise."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise _unwritable(folder, err) from err


def write_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write `path` through `write(file)` into a hidden partial file beside it, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}{PARTIAL_SUFFIX}")
    try:
        with open(partial, "wb") as file:
            write(file)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def saliency_map_uint8(log_density: np.ndarray) -> np.ndarray:
    """(H,W) uint8 saliency map of an (H,W) log density (nats): the density scaled to maximum 255, rounded."""
    relative = np.exp(log_density.astype(np.float64) - log_density.max())
    return np.clip(np.rint(relative * 255.0), 0, 255).astype(np.uint8)


class _FileWriter(ABC):
    """One file per image, at `output_path(image)` below `destination`."""

    suffix = ""

    def __init__(self, folder: str | Path):
        self.destination = Path(folder)

    def output_path(self, image: InputImage) -> Path:
        return self.destination / image.mirrored(self.suffix)

    def open(self, overwrite: bool) -> None:
        """Create the folder (DataError when it cannot be written) and remove partial files of earlier runs."""
        ensure_writable_folder(self.destination)
        for partial in self.destination.rglob(f".*{PARTIAL_SUFFIX}"):
            partial.unlink()

    def is_done(self, image: InputImage) -> bool:
        return self.output_path(image).is_file()

    def write(self, image: InputImage, pixels: np.ndarray, log_density: np.ndarray) -> None:
        """Write the output of `image` (pixels (H,W,3) uint8, log density (H,W) nats at the same size)."""
        path = self.output_path(image)
        try:
            write_atomically(path, lambda file: self._encode(file, path, pixels, log_density))
        except OSError as err:
            raise _unwritable(path.parent, err) from err

    def close(self) -> None:
        pass

    @abstractmethod
    def _encode(self, file: BinaryIO, path: Path, pixels: np.ndarray, log_density: np.ndarray) -> None:
        """Write the encoded output for the target `path` into the open binary `file`."""


class NpyWriter(_FileWriter):
    """`<stem>.npy`: float32 (H,W) log density in nats."""

    suffix = ".npy"

    def _encode(self, file: BinaryIO, path: Path, pixels: np.ndarray, log_density: np.ndarray) -> None:
        np.save(file, log_density.astype(np.float32))


class SaliencyMapWriter(_FileWriter):
    """8-bit greyscale saliency maps (`saliency_map_uint8`): `<stem>.png`, or the input's own file name and format
    with `keep_extension=True` (JPEG quality 100, WebP lossless)."""

    suffix = ".png"

    def __init__(self, folder: str | Path, keep_extension: bool = False):
        super().__init__(folder)
        self.keep_extension = keep_extension

    def output_path(self, image: InputImage) -> Path:
        return self.destination / (image.relative if self.keep_extension else image.mirrored(self.suffix))

    def _encode(self, file: BinaryIO, path: Path, pixels: np.ndarray, log_density: np.ndarray) -> None:
        image_format = Image.registered_extensions()[path.suffix.lower()]
        options = {"JPEG": {"quality": 100}, "WEBP": {"lossless": True}}.get(image_format, {})
        Image.fromarray(saliency_map_uint8(log_density), "L").save(file, format=image_format, **options)


class OverlayWriter(_FileWriter):
    """`<stem>.png`: RGB heat-map overlay of the density on the image (`density_overlay`)."""

    suffix = ".png"

    def _encode(self, file: BinaryIO, path: Path, pixels: np.ndarray, log_density: np.ndarray) -> None:
        Image.fromarray(density_overlay(pixels, log_density)).save(file, format="PNG")


class HDF5Writer:
    """All log densities in one HDF5 file in pysaliency's `export_model_to_hdf5` layout (see the module doc).

    `open(overwrite=True)` starts a new file (as pysaliency's export with overwrite); otherwise an existing file
    is continued and its complete datasets count as done. The file is open only while one dataset is written:
    between images it is closed, so it is complete on disk, and HDF5's caches of it are freed. (Held open for a
    whole folder, those small, long-lived allocations landed in the holes that each image's large arrays left,
    and the resident memory of a prediction run grew by about one image's arrays per image.)
    """

    def __init__(self, path: str | Path, compression_level: int = HDF5_COMPRESSION_LEVEL):
        self.destination = Path(path)
        self.compression_level = compression_level
        self._done: Optional[set[str]] = None

    def output_path(self, image: InputImage) -> Path:
        return self.destination

    def open(self, overwrite: bool) -> None:
        """Create or continue the file (DataError when it cannot be written or read), remove datasets an
        interrupted run left partial, and note the complete ones."""
        ensure_writable_folder(self.destination.parent)
        partials: list[str] = []
        done: set[str] = set()

        def note(name: str, item) -> None:
            if isinstance(item, h5py.Dataset):
                if name.endswith(PARTIAL_SUFFIX):
                    partials.append(name)
                else:
                    done.add(name)

        with self._opened("w" if overwrite else "a") as file:
            file.visititems(note)
            for name in partials:
                del file[name]
        self._done = done

    def is_done(self, image: InputImage) -> bool:
        return image.key in self._require_open()

    def write(self, image: InputImage, pixels: np.ndarray, log_density: np.ndarray) -> None:
        done = self._require_open()
        partial = image.key + PARTIAL_SUFFIX
        with self._opened("a") as file:
            file.create_dataset(partial, data=log_density.astype(np.float32), compression="gzip",
                                compression_opts=self.compression_level)
            file.move(partial, image.key)
        done.add(image.key)

    def close(self) -> None:
        self._done = None

    def _opened(self, mode: str) -> h5py.File:
        try:
            return h5py.File(self.destination, mode)
        except OSError as err:
            raise DataError(f"{self.destination}: cannot open as an HDF5 file to write ({err}); "
                            "remove it or choose another output folder") from err

    def _require_open(self) -> set[str]:
        if self._done is None:
            raise RuntimeError(f"{self.destination}: call open() before writing")
        return self._done


def make_writers(output_dir: str | Path, formats: Sequence[str], keep_extension: bool = False) -> list:
    """Writers of the chosen `formats` (subset of OUTPUT_FORMATS) in their places below `output_dir`: folders
    `npy/`, `saliency/`, `overlay/` and the file `log_densities.hdf5`, so that no format's files mix with another's
    (pysaliency's directory models read every file of a folder)."""
    output_dir = Path(output_dir)
    unknown = sorted(set(formats) - set(OUTPUT_FORMATS))
    if unknown or not formats:
        raise DataError(f"output formats {list(formats)}: expected one or more of {', '.join(OUTPUT_FORMATS)}")
    makers = {
        "npy": lambda: NpyWriter(output_dir / "npy"),
        "hdf5": lambda: HDF5Writer(output_dir / HDF5_FILE_NAME),
        "saliency": lambda: SaliencyMapWriter(output_dir / "saliency", keep_extension),
        "overlay": lambda: OverlayWriter(output_dir / "overlay"),
    }
    return [makers[name]() for name in OUTPUT_FORMATS if name in formats]
