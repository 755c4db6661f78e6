"""read_mit1003: the official MIT1003 download (ALLSTIMULI/ + ALLFIXATIONMAPS/<name>_fixPts.jpg)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .dataset import FixationDataset
from .errors import DataError
from .images import image_files, load_rgb, read_image_size

FIXPTS_THRESHOLD = 128
"""A pixel of a JPEG-compressed fixation-point map counts as fixated when its grey value is >= this (0..255).

Fixated pixels are saved as 255 and background as 0; JPEG compression moves both by at most a few tens of
grey levels at the quality the maps were saved with, so the midpoint separates them."""


def read_mit1003(path: str | Path, threshold: int = FIXPTS_THRESHOLD) -> FixationDataset:
    """Read MIT1003 as downloaded from its website: `<path>/ALLSTIMULI/*.jpeg` and `<path>/ALLFIXATIONMAPS/`.

    Stimuli are the image files of ALLSTIMULI in natural order (as pysaliency sorts them; stray files such as
    Thumbs.db are skipped). Fixations come from `ALLFIXATIONMAPS/<stem>_fixPts.jpg`: every pixel (i, j) with
    grey value >= `threshold` is one fixation at x = j, y = i (pixels). The maps hold all subjects at once, so
    there are no subjects, no times and no scanpath history, and fixations of several subjects on the same pixel
    collapse into one.
    """
    root = Path(path)
    stimuli_dir, maps_dir = root / "ALLSTIMULI", root / "ALLFIXATIONMAPS"
    for folder in (root, stimuli_dir, maps_dir):
        if not folder.is_dir():
            raise DataError(f"{folder}: folder not found; expected the MIT1003 download with ALLSTIMULI/ and "
                            "ALLFIXATIONMAPS/ inside")
    files = image_files(stimuli_dir)
    if not files:
        raise DataError(f"{stimuli_dir}: no images; expected the 1003 MIT1003 stimuli (*.jpeg)")
    shapes, xs, ys, ns = [], [], [], []
    for index, file in enumerate(files):
        shape = read_image_size(file)
        point_map = maps_dir / f"{file.stem}_fixPts.jpg"
        if not point_map.is_file():
            raise DataError(f"{point_map}: fixation-point map not found; expected one <name>_fixPts.jpg per "
                            f"stimulus in {maps_dir}")
        grey = load_rgb(point_map).mean(axis=2)
        if grey.shape != shape:
            raise DataError(f"{point_map}: map is {grey.shape[0]}x{grey.shape[1]} but its stimulus {file} is "
                            f"{shape[0]}x{shape[1]} (H x W); expected equal sizes")
        rows, cols = np.nonzero(grey >= threshold)
        shapes.append(shape)
        xs.append(cols.astype(np.float64))
        ys.append(rows.astype(np.float64))
        ns.append(np.full(len(rows), index, dtype=np.int64))
    dataset = FixationDataset(shapes=np.array(shapes), x=np.concatenate(xs), y=np.concatenate(ys),
                              n=np.concatenate(ns), image_paths=[str(file) for file in files], source=str(root))
    if dataset.n_fixations == 0:
        raise DataError(f"{maps_dir}: no fixated pixel (grey value >= {threshold}) in any fixation-point map")
    return dataset
