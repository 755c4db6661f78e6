"""Loading DeepGaze III weights: the released mixture layout, the reference's single-model (one fold) layout and
this project's training checkpoints.

Mixture layout (the released `deepgaze3.pth`, and this project's `DeepGazeIII.state_dict()`): `features.` (backbone)
plus `saliency_networks.N.`, `scanpath_networks.N.`, `fixation_selection_networks.N.`, `finalizers.N.`.
Single-model layout (one cross-validation fold of the reference): the same without `.N`, with singular prefixes
`saliency_network.`, `scanpath_network.`, `fixation_selection_network.`, `finalizer.`. Component k of the release
is fold k's single model.
Training checkpoint (a Lightning `.ckpt` of `deepgaze fit`): the network's mixture-layout entries under `model.` in
its `state_dict`, its constructor arguments under `hyper_parameters` and, under `BACKBONE_RECORD`, how its frozen
backbone is rebuilt (`BackboneRecord`) when the backbone's tensors were left out.
"""

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

from deepgaze_lit.model.backbone import backbone_weights_file
from deepgaze_lit.model.errors import WeightsFileError
from deepgaze_lit.model.files import load_torch_file

TRAINING_CHECKPOINT = "a deepgaze-lit training checkpoint (a .ckpt file written by `deepgaze fit`)"
TRAINING_CHECKPOINT_KEYS = ("state_dict", "global_step")

COMPONENT_PREFIXES = {
    "saliency_network": "saliency_networks",
    "scanpath_network": "scanpath_networks",
    "fixation_selection_network": "fixation_selection_networks",
    "finalizer": "finalizers",
}
"""Single-model prefix -> mixture prefix."""
BACKBONE_PREFIX = "features."
NETWORK_PREFIX = "model."
"""Prefix of the network's entries in a training checkpoint's `state_dict` (the module attribute `model`)."""
BACKBONE_RECORD = "deepgaze_backbone"
"""Key of a training checkpoint that holds its `BackboneRecord`."""
_SINGLE_KEY = re.compile(rf"^({'|'.join(COMPONENT_PREFIXES)})\.(.+)$")
_MIXTURE_KEY = re.compile(rf"^({'|'.join(COMPONENT_PREFIXES.values())})\.(\d+)\.(.+)$")


class CheckpointMismatchError(ValueError):
    """Weights that cannot be loaded as asked: a file of another kind, another architecture, a component that is
    not there, another backbone than the one trained with. The CLI prints it as one line."""


@dataclass(frozen=True)
class ShapeMismatch:
    """A key that the saved state dict and the model both hold, in different shapes."""

    key: str
    saved: tuple[int, ...]
    expected: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.key} (checkpoint {self.saved}, model {self.expected})"


@dataclass
class LoadReport:
    """How a saved state dict fits a model: the expected model keys it lacks (`missing`), its keys the model does
    not have (`unexpected`), its keys whose shape differs from the model's (`mismatched`) and the expected model
    keys it fills (`loaded`)."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[ShapeMismatch] = field(default_factory=list)
    loaded: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    @property
    def fresh(self) -> list[str]:
        """Model keys a non-strict load leaves at their fresh initialisation: missing, then mismatched."""
        return self.missing + [mismatch.key for mismatch in self.mismatched]

    @property
    def ignored(self) -> list[str]:
        """Saved keys a non-strict load does not use: unexpected, then mismatched."""
        return self.unexpected + [mismatch.key for mismatch in self.mismatched]

    def describe(self) -> str:
        """One line: how many keys were loaded, which were initialised fresh and which were ignored."""
        parts = [f"{len(self.loaded)} keys loaded"]
        for name, keys in (("initialised fresh", self.fresh), ("ignored", self.ignored)):
            parts.append(f"{len(keys)} {name}" + (f" ({_shortened(keys)})" if keys else ""))
        return ", ".join(parts)

    def __str__(self) -> str:
        if self.ok:
            return "all keys loaded"
        parts = []
        for name, entries in (("missing", self.missing), ("unexpected", self.unexpected),
                              ("mismatched", self.mismatched)):
            if entries:
                parts.append(f"{len(entries)} {name} keys: {_shortened(entries)}")
        return "; ".join(parts)


def _shortened(entries: list, shown: int = 8) -> str:
    more = f", ... ({len(entries) - shown} more)" if len(entries) > shown else ""
    return ", ".join(map(str, entries[:shown])) + more


def diff_state_dict(
    saved: Mapping[str, Tensor], model_state: Mapping[str, Tensor], expected: Iterable[str] | None = None
) -> LoadReport:
    """Compare a saved state dict with a model's `state_dict()`; `expected`: the model keys the saved one should
    fill (default: all of them). Entries keep the order of `expected` (missing) and of `saved` (the others)."""
    expected = list(model_state if expected is None else expected)
    return LoadReport(
        missing=[key for key in expected if key not in saved],
        loaded=[key for key in expected if key in saved and saved[key].shape == model_state[key].shape],
        unexpected=[key for key in saved if key not in model_state],
        mismatched=[
            ShapeMismatch(key, tuple(value.shape), tuple(model_state[key].shape))
            for key, value in saved.items()
            if key in model_state and value.shape != model_state[key].shape
        ],
    )


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The network state dict in a file (loaded with weights_only=True): a flat dict of tensors saved with
    `torch.save` (the release, a reference fold, `deepgaze export`), or the network part of a training checkpoint
    (mixture layout; without `features.` entries when it was saved without the backbone)."""
    return read_weights(path)[0]


def read_weights(path: str | Path) -> tuple[dict[str, Tensor], "BackboneRecord | None"]:
    """`read_state_dict` and, for a training checkpoint, its `BackboneRecord` (None for plain state dicts and for
    training checkpoints written before the record existed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    state = load_torch_file(path, f"DeepGaze III weights (a state dict such as deepgaze3.pth) or {TRAINING_CHECKPOINT}")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        return network_state(state["state_dict"]), BackboneRecord.of(state)
    if not isinstance(state, dict) or not all(isinstance(value, Tensor) for value in state.values()):
        raise WeightsFileError(f"{path} is neither a DeepGaze III state dict (a flat dict of tensors) nor "
                               f"{TRAINING_CHECKPOINT}")
    return state, None


def read_training_checkpoint(path: str | Path, mmap: bool = False) -> dict:
    """A training checkpoint (`deepgaze fit`'s `.ckpt`) as a dict, loaded with weights_only=True (tensors
    memory-mapped with `mmap`); WeightsFileError naming the file when it is something else (unreadable,
    truncated, a bare tensor, released weights, another kind of dict)."""
    checkpoint = load_torch_file(path, TRAINING_CHECKPOINT, mmap=mmap)
    if not isinstance(checkpoint, dict) or not all(key in checkpoint for key in TRAINING_CHECKPOINT_KEYS):
        if isinstance(checkpoint, dict) and checkpoint and all(isinstance(value, Tensor)
                                                               for value in checkpoint.values()):
            raise WeightsFileError(f"{path} holds network weights, not {TRAINING_CHECKPOINT}: for released "
                                   f"weights such as deepgaze3.pth use --model.init_from {path} (or "
                                   "DeepGazeIII.from_release) instead")
        raise WeightsFileError(f"{path} holds a {type(checkpoint).__name__} of other content, not "
                               f"{TRAINING_CHECKPOINT}")
    if not isinstance(checkpoint["state_dict"], dict):
        raise WeightsFileError(f"{path}: its state_dict is not a dict of tensors; expected {TRAINING_CHECKPOINT}")
    return checkpoint


def network_state(module_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The network's entries (mixture layout) of a training checkpoint's `state_dict`."""
    return {key[len(NETWORK_PREFIX):]: value for key, value in module_state.items() if key.startswith(NETWORK_PREFIX)}


def holds_backbone(state: Mapping[str, Tensor]) -> bool:
    """Whether a network state dict holds backbone (`features.`) entries."""
    return any(key.startswith(BACKBONE_PREFIX) for key in state)


def require_backbone_weights(backbone_weights: str | Path, source: str) -> None:
    """Raise FileNotFoundError (one line naming the file and the option to set) when the weights file that rebuilds
    the backbone a checkpoint left out (`source`, for the message) is missing."""
    path = backbone_weights_file(backbone_weights)
    if path is not None and not path.is_file():
        raise FileNotFoundError(
            f"{source} was saved without its frozen backbone, which is rebuilt from backbone_weights="
            f"{str(backbone_weights)!r}, but the weights file {path} does not exist: put the file there (for "
            f"'imagenet': into the torch hub folder, see TORCH_HOME) or set model.backbone_weights to the path of "
            f"the same weights (training with model.checkpoint_backbone true keeps the backbone in checkpoints)"
        )


def saved_backbone(path: str | Path) -> tuple[bool, "BackboneRecord | None"]:
    """Whether the training checkpoint at `path` holds its backbone's tensors, and its `BackboneRecord` (None when
    it has none)."""
    checkpoint = read_training_checkpoint(path, mmap=True)
    return holds_backbone(network_state(checkpoint["state_dict"])), BackboneRecord.of(checkpoint)


def backbone_fingerprint(state: Mapping[str, Tensor]) -> str:
    """Hex digest (BLAKE2b, 16 bytes) of the backbone entries (`features.` keys) of a network state dict: their
    names, dtypes, shapes and values. Two backbones with the same fingerprint hold the same tensors."""
    digest = hashlib.blake2b(digest_size=16)
    for key in sorted(key for key in state if key.startswith(BACKBONE_PREFIX)):
        value = state[key].detach().cpu()
        digest.update(f"{key}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


@dataclass(frozen=True)
class BackboneRecord:
    """What a training checkpoint says about its frozen backbone.

    backbone_weights: the `backbone_weights` setting it was trained with; fingerprint: `backbone_fingerprint` of
    the backbone it was trained with; from_weights: whether that backbone is what `backbone_weights` builds (False
    when `init_from` supplied it; the checkpoint then always holds it).
    """

    backbone_weights: str
    fingerprint: str
    from_weights: bool

    @classmethod
    def of(cls, checkpoint: Mapping) -> "BackboneRecord | None":
        """The record of a training checkpoint dict; None when it has none."""
        record = checkpoint.get(BACKBONE_RECORD)
        return None if record is None else cls(**record)

    def as_dict(self) -> dict:
        return {"backbone_weights": self.backbone_weights, "fingerprint": self.fingerprint,
                "from_weights": self.from_weights}

    def check(self, model_state: Mapping[str, Tensor], source: str) -> None:
        """Raise CheckpointMismatchError unless the backbone in `model_state` (a network state dict) is the one this
        record was written with."""
        if backbone_fingerprint(model_state) != self.fingerprint:
            raise CheckpointMismatchError(
                f"{source} was trained on another frozen backbone than this model's (saved with backbone_weights="
                f"{self.backbone_weights!r}, fingerprint {self.fingerprint}): set model.backbone_weights to the "
                f"weights it was trained with"
            )


def is_single_model_layout(state: dict[str, Tensor]) -> bool:
    """Whether `state` uses the single-model (one fold) prefixes."""
    return any(_SINGLE_KEY.match(key) for key in state)


def mixture_components(state: dict[str, Tensor]) -> list[int]:
    """Sorted component indices present in a mixture-layout state dict."""
    return sorted({int(match.group(2)) for match in map(_MIXTURE_KEY.match, state) if match})


def single_model_to_component(state: dict[str, Tensor], component: int) -> dict[str, Tensor]:
    """Rename single-model keys to mixture component `component` (backbone keys unchanged, others kept as they are)."""
    renamed = {}
    for key, value in state.items():
        match = _SINGLE_KEY.match(key)
        renamed[f"{COMPONENT_PREFIXES[match.group(1)]}.{component}.{match.group(2)}" if match else key] = value
    return renamed


def extract_component(state: dict[str, Tensor], component: int) -> dict[str, Tensor]:
    """The state dict of a 1-component model holding component `component` of a mixture state dict, backbone
    included."""
    available = mixture_components(state)
    if component not in available:
        raise CheckpointMismatchError(
            f"component {component} is not in the checkpoint; it holds components {available}"
        )
    extracted = {}
    for key, value in state.items():
        match = _MIXTURE_KEY.match(key)
        if match is None:
            extracted[key] = value
        elif int(match.group(2)) == component:
            extracted[f"{match.group(1)}.0.{match.group(3)}"] = value
    return extracted


def _component_keys(model_keys: list[str], component: int) -> list[str]:
    return [key for key in model_keys if (m := _MIXTURE_KEY.match(key)) and int(m.group(2)) == component]


def load_state(
    model: nn.Module, state: dict[str, Tensor], expected: list[str], strict: bool, source: str
) -> LoadReport:
    """Copy the matching entries of `state` into `model`; report the `expected` model keys it lacks and its extras.

    strict: raise a CheckpointMismatchError naming `source` unless every expected key is filled and nothing is left
    over.
    """
    report = diff_state_dict(state, model.state_dict(), expected)
    if strict and not report.ok:
        raise CheckpointMismatchError(
            f"{source} does not fit this model ({report}); pass strict=False to load what fits"
        )
    unfit = set(report.ignored)
    model.load_state_dict({key: value for key, value in state.items() if key not in unfit}, strict=False)
    return report


def load_weights(
    model: nn.Module, source: str | Path | dict[str, Tensor], component: int | None = None, strict: bool = True
) -> LoadReport:
    """Initialise `model` (a DeepGazeIII) from a mixture or single-model state dict (file or dict) or from a
    training checkpoint file.

    Mixture layout: loaded as is, or, with `component=k`, only component k into a 1-component model.
    Single-model layout: loaded into component `component` (default 0 for a 1-component model).
    The backbone is loaded when the source has `features.` keys; a training checkpoint saved without them must have
    been trained on the model's backbone (CheckpointMismatchError otherwise). Returns the LoadReport; strict raises
    on any mismatch.
    """
    name = str(source) if not isinstance(source, dict) else "state dict"
    state, record = (source, None) if isinstance(source, dict) else read_weights(source)
    if record is not None and not holds_backbone(state):
        record.check(model.state_dict(), name)
    model_keys = list(model.state_dict())
    backbone_keys = [key for key in model_keys if key.startswith(BACKBONE_PREFIX)] if holds_backbone(state) else []
    if is_single_model_layout(state):
        if component is None:
            if model.num_components != 1:
                raise CheckpointMismatchError(
                    f"{name} is a single-model checkpoint but the model has {model.num_components} components: "
                    f"pass component=k (0..{model.num_components - 1}) to choose which one it initialises"
                )
            component = 0
        if not 0 <= component < model.num_components:
            raise CheckpointMismatchError(f"component {component} is outside 0..{model.num_components - 1}")
        expected = _component_keys(model_keys, component) + backbone_keys
        return load_state(model, single_model_to_component(state, component), expected, strict, name)
    if component is not None:
        if model.num_components != 1:
            raise CheckpointMismatchError(
                f"component={component} extracts one component: build the model with num_components=1"
            )
        state = extract_component(state, component)
    expected = [key for key in model_keys if not key.startswith(BACKBONE_PREFIX)] + backbone_keys
    return load_state(model, state, expected, strict, name)


def check_initialisation(report: LoadReport, num_components: int, source: str) -> None:
    """Raise CheckpointMismatchError (one line, with the fix) when a non-strict load (`report`) into a model of
    `num_components` components cannot be a starting point: saved shapes that differ from the model's, saved
    components the model lacks or model components nothing was loaded into, or no readout parameter filled.
    Parameters the source lacks (a spatial model's into a scanpath model: the scanpath networks) keep their
    fresh initialisation."""
    readout_loaded = [key for key in report.loaded if not key.startswith(BACKBONE_PREFIX)]
    if not readout_loaded:
        raise CheckpointMismatchError(
            f"init_from {source} fits no readout parameter of this model: it holds another architecture"
        )
    if report.mismatched:
        raise CheckpointMismatchError(
            f"init_from {source} does not fit this model: {len(report.mismatched)} parameters have other shapes "
            f"({_shortened(report.mismatched, 3)}); use the model settings it was trained with"
        )
    saved_components = {int(m.group(2)) for m in map(_MIXTURE_KEY.match, report.unexpected) if m}
    loaded_components = {int(m.group(2)) for m in map(_MIXTURE_KEY.match, readout_loaded) if m}
    extra = sorted(index for index in saved_components if index >= num_components)
    empty = sorted(set(range(num_components)) - loaded_components)
    if extra or empty:
        saved_count = max([*loaded_components, *saved_components]) + 1
        raise CheckpointMismatchError(
            f"init_from {source} holds {saved_count} mixture components, this model {num_components}: set "
            f"model.num_components {saved_count}, or model.num_components 1 with model.component k to start from "
            f"component k"
        )
