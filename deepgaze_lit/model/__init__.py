"""The DeepGaze III network (pure PyTorch): frozen DenseNet-201 backbone, readout components, mixture."""

from deepgaze_lit.model.backbone import MIN_IMAGE_SIDE, DenseNetFeatures, imagenet_weights_path
from deepgaze_lit.model.checkpoint import (CheckpointMismatchError, LoadReport, ShapeMismatch, diff_state_dict,
                                           extract_component, load_weights, read_state_dict)
from deepgaze_lit.model.deepgaze3 import BlockLogDensity, DeepGazeIII

__all__ = [
    "MIN_IMAGE_SIDE",
    "BlockLogDensity",
    "CheckpointMismatchError",
    "DeepGazeIII",
    "DenseNetFeatures",
    "LoadReport",
    "ShapeMismatch",
    "diff_state_dict",
    "extract_component",
    "imagenet_weights_path",
    "load_weights",
    "read_state_dict",
]
