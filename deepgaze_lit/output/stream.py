"""Predict an image file or a folder tree into one or more output formats, one image at a time.

Memory stays flat in the number of images: each image is decoded, predicted and written before the next. A rerun
continues where an interrupted one stopped: an image whose outputs all exist is neither decoded nor predicted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from deepgaze_lit.data.errors import DataError
from deepgaze_lit.data.images import load_rgb
from deepgaze_lit.inference import DensityPredictor
from deepgaze_lit.output.names import check_output_location, list_input_images

log = logging.getLogger(__name__)


@dataclass
class WriteSummary:
    """What a run did: images predicted and written, images skipped because every output existed, and the inputs
    that could not be read or used (each reported in one warning line)."""

    written: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)


def write_predictions(predictor: DensityPredictor, source: str | Path, writers: Sequence,
                      overwrite: bool = False) -> WriteSummary:
    """Predict every image of `source` (an image file, or a folder walked with its subfolders) into `writers`.

    Before any prediction: the inputs are listed (duplicate stems in one folder refused), outputs in the input
    folder or onto an input refused, and every writer opened (an unwritable destination fails with a DataError).
    Existing outputs are kept unless `overwrite`. An unreadable or too small image is skipped with a warning.
    """
    images = list_input_images(source)
    check_output_location(source, images, writers)
    opened = []
    try:
        for writer in writers:
            writer.open(overwrite)
            opened.append(writer)
        summary = WriteSummary()
        for image in images:
            pending = list(writers) if overwrite else [writer for writer in writers if not writer.is_done(image)]
            if not pending:
                summary.skipped += 1
                continue
            try:
                pixels = load_rgb(image.path)
                log_density = predictor.log_density(pixels, source=str(image.path))
            except DataError as err:
                log.warning("skipped %s", err)
                summary.failed.append(str(image.path))
                continue
            for writer in pending:
                writer.write(image, pixels, log_density)
            summary.written += 1
        return summary
    finally:
        for writer in opened:
            writer.close()
