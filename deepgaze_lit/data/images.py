"""Image files: listing a folder, reading a size from the header, decoding to RGB; one error path for all."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import DataError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"})
"""File name endings (lower case) treated as images when a folder is listed."""


def natural_key(name: str) -> list:
    """Sort key ordering embedded numbers by value ("img2" before "img10"), as pysaliency's `natsorted`."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def is_image_file(path: Path) -> bool:
    """Whether `path` is a regular file with an image extension (stray files such as Thumbs.db are not)."""
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def image_files(folder: Path) -> list[Path]:
    """The image files of `folder` (see `is_image_file`) in natural order of their names."""
    return sorted((file for file in folder.iterdir() if is_image_file(file)), key=lambda file: natural_key(file.name))


@contextmanager
def open_image(path: str | Path, failure: str) -> Iterator[Image.Image]:
    """The Pillow image of `path`; any failure to open or decode it inside the block raises DataError naming the
    file, `failure` (what went wrong, e.g. "cannot decode image") and the cause."""
    try:
        with Image.open(path) as image:
            yield image
    except FileNotFoundError as err:
        raise DataError(f"{path}: image file not found") from err
    except Image.DecompressionBombError as err:
        raise DataError(f"{path}: {failure}: {err} (Pillow refuses images over PIL.Image.MAX_IMAGE_PIXELS * 2 "
                        "pixels); downscale it, or raise that limit if the file is trusted") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: {failure} ({err}); "
                        "expected a readable image file such as JPEG or PNG") from err


def read_image_size(path: str | Path) -> tuple[int, int]:
    """(H, W) in pixels from the image header, without decoding the pixels."""
    with open_image(path, "not a readable image") as image:
        width, height = image.size
    return height, width


def pil_to_rgb(image: Image.Image) -> np.ndarray:
    """(H,W,3) uint8 RGB from any Pillow mode: greyscale, palette, CMYK, RGBA (alpha dropped), 16-bit grey."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        grey = np.asarray(image).astype(np.float64) / 257.0
        grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.array(image, dtype=np.uint8)


def load_rgb(path: str | Path) -> np.ndarray:
    """Decode an image file to an (H,W,3) uint8 RGB array; raises DataError naming the file when it cannot."""
    with open_image(path, "cannot decode image") as image:
        image.load()
        return pil_to_rgb(image)
