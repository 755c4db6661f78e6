"""Eye-tracking data for DeepGaze III: readers, splits, resizing, centre bias, torch datasets, sampler, DataModule.

All readers return a `FixationDataset` (coordinates in pixels of the image, 0-based, x right, y down).
"""

from .centerbias import (MIT1003_BANDWIDTH, MIT1003_EPS, BaselineCenterbias, CrossvalidatedBaselineCenterbias,
                         TemplateCenterbias, UniformCenterbias, centerbias_log_density)
from .csv_dataset import read_csv_dataset
from .datamodule import SaliencyDataModule
from .dataset import FixationDataset
from .errors import DataError
from .images import load_rgb
from .mit1003 import read_mit1003
from .pysaliency_io import read_pysaliency
from .resize import target_shape
from .sampler import ResumableDataLoader, ShapeBucketBatchSampler
from .splits import crossval_split, holdout_split
from .synthetic import make_synthetic
from .torch_dataset import FixationSamples, ImageSamples, collate_samples, history_slots

__all__ = [
    "MIT1003_BANDWIDTH", "MIT1003_EPS", "BaselineCenterbias", "CrossvalidatedBaselineCenterbias", "DataError",
    "FixationDataset", "FixationSamples", "ImageSamples", "ResumableDataLoader",
    "SaliencyDataModule", "ShapeBucketBatchSampler", "TemplateCenterbias", "UniformCenterbias",
    "centerbias_log_density", "collate_samples", "crossval_split", "history_slots", "holdout_split", "load_rgb",
    "make_synthetic", "read_csv_dataset", "read_mit1003", "read_pysaliency", "target_shape",
]
