"""Prediction outputs: input listing and output names, streaming writers (npy, hdf5, saliency, overlay)."""

from deepgaze_lit.output.names import InputImage, check_output_location, list_input_images, minimal_unique_names
from deepgaze_lit.output.stream import PredictionJob, WriteSummary, write_predictions
from deepgaze_lit.output.writers import (
    OUTPUT_FORMATS,
    HDF5Writer,
    NpyWriter,
    OverlayWriter,
    SaliencyMapWriter,
    make_writers,
)

__all__ = [
    "OUTPUT_FORMATS",
    "HDF5Writer",
    "InputImage",
    "NpyWriter",
    "OverlayWriter",
    "PredictionJob",
    "SaliencyMapWriter",
    "WriteSummary",
    "check_output_location",
    "list_input_images",
    "make_writers",
    "minimal_unique_names",
    "write_predictions",
]
