"""deepgaze-lit: train, fine-tune and evaluate DeepGaze III fixation-density models with PyTorch Lightning."""

__version__ = "0.1.0"
