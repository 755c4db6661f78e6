"""deepgaze-lit: train, fine-tune and evaluate DeepGaze III fixation-density models with PyTorch Lightning."""

from deepgaze_lit.model import DeepGazeIII

__version__ = "0.1.0"

__all__ = ["DeepGazeIII", "__version__"]
