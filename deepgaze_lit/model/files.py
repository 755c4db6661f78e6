"""Reading the PyTorch files a user names (checkpoints, released weights, backbone weights): always with
`weights_only=True`, and every failure told as one `WeightsFileError` naming the file and what it should be (never
torch's own advice, which suggests unpickling the file with `weights_only=False`)."""

import pickle
from pathlib import Path
from typing import Any

import torch

from deepgaze_lit.model.errors import WeightsFileError


def load_torch_file(path: str | Path, expected: str, mmap: bool = False) -> Any:
    """The object saved in `path` (tensors and plain containers only), on the CPU.

    `expected` says what the file should be (e.g. "a deepgaze-lit training checkpoint (.ckpt)"); it ends every
    message. `mmap` maps the tensors instead of reading them (files written by `torch.save`'s zip format only).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsFileError(f"{path}: no such file; expected {expected}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        reason = "not a PyTorch file, or it holds objects other than tensors, which are never unpickled"
    except EOFError:
        reason = "empty or truncated"
    except RuntimeError:
        reason = "truncated or not a PyTorch file"
    except OSError:
        raise
    except Exception:  # noqa: BLE001 - torch's legacy reader fails on arbitrary bytes with any error type
        reason = "not a PyTorch file"
    raise WeightsFileError(f"{path} cannot be read ({reason}); expected {expected}")
