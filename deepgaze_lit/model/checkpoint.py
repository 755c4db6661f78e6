"""Loading DeepGaze III weights: the released mixture layout and the reference's single-model (one fold) layout.

Mixture layout (the released `deepgaze3.pth`, and this project's `DeepGazeIII.state_dict()`): `features.` (backbone)
plus `saliency_networks.N.`, `scanpath_networks.N.`, `fixation_selection_networks.N.`, `finalizers.N.`.
Single-model layout (one cross-validation fold of the reference): the same without `.N`, with singular prefixes
`saliency_network.`, `scanpath_network.`, `fixation_selection_network.`, `finalizer.`. Component k of the release
is fold k's single model.
"""

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

from deepgaze_lit.model.errors import WeightsFileError
from deepgaze_lit.model.files import load_torch_file

COMPONENT_PREFIXES = {
    "saliency_network": "saliency_networks",
    "scanpath_network": "scanpath_networks",
    "fixation_selection_network": "fixation_selection_networks",
    "finalizer": "finalizers",
}
"""Single-model prefix -> mixture prefix."""
BACKBONE_PREFIX = "features."
_SINGLE_KEY = re.compile(rf"^({'|'.join(COMPONENT_PREFIXES)})\.(.+)$")
_MIXTURE_KEY = re.compile(rf"^({'|'.join(COMPONENT_PREFIXES.values())})\.(\d+)\.(.+)$")


class CheckpointMismatchError(ValueError):
    """Weights that do not fit the model's architecture."""


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
    not have (`unexpected`) and its keys whose shape differs from the model's (`mismatched`)."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[ShapeMismatch] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def unfilled(self) -> set[str]:
        """Model keys a load leaves as they were: the missing and the mismatched ones."""
        return set(self.missing) | {mismatch.key for mismatch in self.mismatched}

    def __str__(self) -> str:
        if self.ok:
            return "all keys loaded"
        parts = []
        for name, entries in (("missing", self.missing), ("unexpected", self.unexpected),
                              ("mismatched", self.mismatched)):
            if entries:
                more = f", ... ({len(entries) - 8} more)" if len(entries) > 8 else ""
                shown = ", ".join(map(str, entries[:8])) + more
                parts.append(f"{len(entries)} {name} keys: {shown}")
        return "; ".join(parts)


def diff_state_dict(
    saved: Mapping[str, Tensor], model_state: Mapping[str, Tensor], expected: Iterable[str] | None = None
) -> LoadReport:
    """Compare a saved state dict with a model's `state_dict()`; `expected`: the model keys the saved one should
    fill (default: all of them). Entries keep the order of `expected` (missing) and of `saved` (the others)."""
    expected = model_state if expected is None else expected
    return LoadReport(
        missing=[key for key in expected if key not in saved],
        unexpected=[key for key in saved if key not in model_state],
        mismatched=[
            ShapeMismatch(key, tuple(value.shape), tuple(model_state[key].shape))
            for key, value in saved.items()
            if key in model_state and value.shape != model_state[key].shape
        ],
    )


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict (a flat dict of tensors) saved with `torch.save`, loaded with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    state = load_torch_file(path, "DeepGaze III weights (a state dict saved with torch.save, e.g. deepgaze3.pth)")
    if not isinstance(state, dict) or not all(isinstance(value, Tensor) for value in state.values()):
        lightning = isinstance(state, dict) and "state_dict" in state
        hint = " (a Lightning checkpoint? load it with the Lightning module instead)" if lightning else ""
        raise WeightsFileError(f"{path} is not a DeepGaze III state dict (a flat dict of tensors){hint}")
    return state


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
        raise ValueError(f"component {component} is not in the checkpoint; it holds components {available}")
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
    unfit = set(report.unexpected) | {mismatch.key for mismatch in report.mismatched}
    model.load_state_dict({key: value for key, value in state.items() if key not in unfit}, strict=False)
    return report


def load_weights(
    model: nn.Module, source: str | Path | dict[str, Tensor], component: int | None = None, strict: bool = True
) -> LoadReport:
    """Initialise `model` (a DeepGazeIII) from a mixture or single-model state dict (file or dict).

    Mixture layout: loaded as is, or, with `component=k`, only component k into a 1-component model.
    Single-model layout: loaded into component `component` (default 0 for a 1-component model); the backbone is
    loaded too when the checkpoint has `features.` keys. Returns the LoadReport; strict raises on any mismatch.
    """
    name = str(source) if not isinstance(source, dict) else "state dict"
    state = source if isinstance(source, dict) else read_state_dict(source)
    model_keys = list(model.state_dict())
    if is_single_model_layout(state):
        if component is None:
            if model.num_components != 1:
                raise ValueError(
                    f"{name} is a single-model checkpoint but the model has {model.num_components} components: "
                    f"pass component=k (0..{model.num_components - 1}) to choose which one it initialises"
                )
            component = 0
        if not 0 <= component < model.num_components:
            raise ValueError(f"component {component} is outside 0..{model.num_components - 1}")
        expected = _component_keys(model_keys, component)
        if any(key.startswith(BACKBONE_PREFIX) for key in state):
            expected += [key for key in model_keys if key.startswith(BACKBONE_PREFIX)]
        return load_state(model, single_model_to_component(state, component), expected, strict, name)
    if component is not None:
        if model.num_components != 1:
            raise ValueError(f"component={component} extracts one component: build the model with num_components=1")
        state = extract_component(state, component)
    return load_state(model, state, model_keys, strict, name)
