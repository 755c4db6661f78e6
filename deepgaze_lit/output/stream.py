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


class PredictionJob:
    """The images of `source` (an image file, or a folder walked with its subfolders) and their open `writers`.

    Made before any prediction (and before a network is loaded): the inputs are listed (duplicate stems in one
    folder refused), outputs in the input folder or onto an input refused, and every writer opened (an unwritable
    destination fails with a DataError). `run(predictor)` then predicts what is missing; `close()` (or leaving a
    `with` block) closes the writers. Existing outputs are kept unless `overwrite`.
    """

    def __init__(self, source: str | Path, writers: Sequence, overwrite: bool = False):
        self.images = list_input_images(source)
        check_output_location(source, self.images, writers)
        self.writers: list = []
        self.overwrite = overwrite
        try:
            for writer in writers:
                writer.open(overwrite)
                self.writers.append(writer)
        except BaseException:
            self.close()
            raise

    def pending_writers(self, image) -> list:
        """The writers that still lack `image`'s output (all of them with `overwrite`)."""
        if self.overwrite:
            return list(self.writers)
        return [writer for writer in self.writers if not writer.is_done(image)]

    def count_done(self) -> int:
        """Images whose every output exists already (skipped by `run` unless `overwrite`)."""
        return sum(not self.pending_writers(image) for image in self.images)

    def run(self, predictor: DensityPredictor) -> WriteSummary:
        """Predict every image that lacks an output, one at a time, into the writers that lack it. An unreadable
        or too small image is skipped with one warning line naming it, and listed in `failed`."""
        summary = WriteSummary()
        for image in self.images:
            pending = self.pending_writers(image)
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

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
        self.writers = []

    def __enter__(self) -> PredictionJob:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def write_predictions(predictor: DensityPredictor, source: str | Path, writers: Sequence,
                      overwrite: bool = False) -> WriteSummary:
    """Predict every image of `source` into `writers` (see `PredictionJob`): open, run, close."""
    with PredictionJob(source, writers, overwrite) as job:
        return job.run(predictor)
