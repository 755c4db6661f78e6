"""Freezing parameters by name: the reference's stage 3 trains the scanpath model with the first two saliency
layers fixed (`saliency_networks.N.{layernorm0,conv0,bias0,layernorm1,conv1,bias1}`).

A prefix names a module or parameter path of the state dict, matched by whole dot-separated segments
(`saliency_networks.0.conv1` matches `saliency_networks.0.conv1.weight`, not `saliency_networks.0.conv10.weight`);
the segment `*` matches any one segment (`saliency_networks.*.conv0`: every component).
"""

from collections.abc import Sequence

from torch import nn

from deepgaze_lit.model.errors import ModelConfigError

WILDCARD = "*"


def prefix_matches(prefix: str, name: str) -> bool:
    """Whether the parameter `name` lies under `prefix` (whole segments, `*` = any one segment)."""
    wanted = prefix.split(".")
    parts = name.split(".")
    return len(parts) >= len(wanted) and all(w in (WILDCARD, part) for w, part in zip(wanted, parts))


def freeze_parameters(module: nn.Module, prefixes: Sequence[str]) -> list[str]:
    """Set `requires_grad=False` on every parameter of `module` under one of `prefixes`; return their names in
    module order. A prefix that matches no parameter raises a ModelConfigError naming it and some valid prefixes."""
    names = [name for name, _ in module.named_parameters()]
    for prefix in prefixes:
        if not any(prefix_matches(prefix, name) for name in names):
            raise ModelConfigError(
                f"model.freeze: {prefix!r} matches no parameter; a prefix is a module path such as "
                f"{', '.join(_example_prefixes(names))} ('{WILDCARD}' for any one segment: "
                f"saliency_networks.{WILDCARD}.conv0)"
            )
    frozen = []
    for name, parameter in module.named_parameters():
        if any(prefix_matches(prefix, name) for prefix in prefixes):
            parameter.requires_grad_(False)
            frozen.append(name)
    return frozen


def _example_prefixes(names: list[str]) -> list[str]:
    """The first module path (three segments, e.g. `saliency_networks.0.layernorm0`) of each readout network."""
    examples: dict[str, str] = {}
    for name in names:
        network = name.split(".")[0]
        if network != "features" and network not in examples:
            examples[network] = ".".join(name.split(".")[:3])
    return list(examples.values())
