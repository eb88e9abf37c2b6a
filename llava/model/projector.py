"""Projectors from vision features to the language model's embedding space."""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

MLP_PATTERN = re.compile(r"^mlp(\d+)x_gelu$")


def build_linear(vision_size: int, text_size: int) -> nn.Module:
    return nn.Linear(vision_size, text_size)


def build_identity(vision_size: int, text_size: int) -> nn.Module:
    if vision_size != text_size:
        raise ValueError(
            f"The identity projector needs equal sizes; vision features are {vision_size} wide, "
            f"the language model's embeddings {text_size}"
        )
    return nn.Identity()


def build_mlp_gelu(depth: int, vision_size: int, text_size: int) -> nn.Sequential:
    """Linear, then (GELU, Linear) x (depth - 1): LLaVA-1.5's mlp2x_gelu when depth is 2.

    A Sequential keeps the original checkpoint keys (`0.weight`, `2.weight`, ...).
    """
    layers: list[nn.Module] = [nn.Linear(vision_size, text_size)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(text_size, text_size)]
    return nn.Sequential(*layers)


PROJECTORS: dict[str, Callable[[int, int], nn.Module]] = {
    "linear": build_linear,
    "identity": build_identity,
}


def build_projector(projector_type: str, vision_size: int, text_size: int) -> nn.Module:
    """Build a projector by name: linear, identity or mlp{N}x_gelu (N >= 1)."""
    if projector_type in PROJECTORS:
        return PROJECTORS[projector_type](vision_size, text_size)
    match = MLP_PATTERN.match(projector_type)
    if match and int(match.group(1)) >= 1:
        return build_mlp_gelu(int(match.group(1)), vision_size, text_size)
    known = ", ".join([*PROJECTORS, "mlp{N}x_gelu (e.g. mlp2x_gelu)"])
    raise ValueError(f"Unknown mm_projector_type {projector_type!r}; known: {known}")
