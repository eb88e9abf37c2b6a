"""Projectors from vision features to the language model's embedding space.

A projector type is a head (`linear`, `identity`, `mlp{N}x_gelu`), optionally after a token
reduction over the tower's patch grid, joined by "+": `spatial_pool2+mlp2x_gelu` (2x2 average
pooling, a quarter of the tokens), `spatial_pool2_bilinear+mlp2x_gelu` (bilinear resizing to
the same grid), `pixel_shuffle2+mlp2x_gelu` (space-to-depth as Idefics3 / nanoVLM: a quarter
of the tokens, each four times as wide, into the head).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from llava.data.media import PIXEL_SHUFFLE, TokenReduction

MLP_PATTERN = re.compile(r"^mlp(\d+)x_gelu$")
REDUCTION_PATTERN = re.compile(r"^(spatial_pool|pixel_shuffle)(\d+)(_bilinear)?$")


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
KNOWN = ", ".join(
    [
        *PROJECTORS,
        "mlp{N}x_gelu (e.g. mlp2x_gelu)",
        "any of them after spatial_pool{K}, spatial_pool{K}_bilinear or pixel_shuffle{K} "
        "and a + (e.g. spatial_pool2+mlp2x_gelu)",
    ]
)


def unknown(projector_type: str) -> ValueError:
    return ValueError(f"Unknown mm_projector_type {projector_type!r}; known: {KNOWN}")


def split_projector_type(projector_type: str) -> tuple[TokenReduction | None, str]:
    """(its token reduction or None, its head's name); an unknown name is a ValueError."""
    reduction_name, plus, head = projector_type.rpartition("+")
    reduction = None
    if plus:
        match = REDUCTION_PATTERN.match(reduction_name)
        if match is None:
            raise unknown(projector_type)
        kind, factor, bilinear = match.groups()
        reduction = TokenReduction(kind, int(factor), "bilinear" if bilinear else "average")
    match = MLP_PATTERN.match(head)
    if head not in PROJECTORS and not (match and int(match.group(1)) >= 1):
        raise unknown(projector_type)
    return reduction, head


def projector_reduction(projector_type: str) -> TokenReduction | None:
    return split_projector_type(projector_type)[0]


def build_head(head: str, vision_size: int, text_size: int) -> nn.Module:
    if head in PROJECTORS:
        return PROJECTORS[head](vision_size, text_size)
    return build_mlp_gelu(int(MLP_PATTERN.match(head).group(1)), vision_size, text_size)


class ReducingProjector(nn.Module):
    """A token reduction over the tower's patch grid, then the head.

    (N, rows * columns, C) features, in row-major grid order -> (N, tokens, D): the reduced
    grid, row-major, each token `width_factor` * C wide before the head."""

    def __init__(self, reduction: TokenReduction, grid: tuple[int, int], head: nn.Module):
        super().__init__()
        self.reduction = reduction
        self.grid = grid
        self.output_grid = reduction.output_grid(grid)
        self.head = head

    def reduce(self, features: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = features.shape
        rows, columns = self.grid
        if tokens != rows * columns:
            raise ValueError(
                f"{self.reduction.name} expects the {rows}x{columns} patch grid's {rows * columns} "
                f"features, got {tokens}"
            )
        grid = features.transpose(1, 2).reshape(batch, width, rows, columns)  # (N, C, h, w)
        factor = self.reduction.factor
        if self.reduction.kind == PIXEL_SHUFFLE:
            grid = F.pixel_unshuffle(grid, factor)  # (N, C * K * K, h / K, w / K)
        elif self.reduction.mode == "bilinear":
            grid = F.interpolate(grid, size=self.output_grid, mode="bilinear", align_corners=False)
        else:
            grid = F.avg_pool2d(grid, factor, ceil_mode=True)
        return grid.flatten(2).transpose(1, 2)  # (N, tokens', C')

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.reduce(features))


def build_projector(
    projector_type: str,
    vision_size: int,
    text_size: int,
    grid: tuple[int, int] | None = None,
) -> nn.Module:
    """Build a projector by name (the module docstring); one with a token reduction needs the
    tower's patch `grid` (rows, columns)."""
    reduction, head = split_projector_type(projector_type)
    if reduction is None:
        return build_head(head, vision_size, text_size)
    if grid is None:
        raise ValueError(f"{projector_type} needs the tower's patch grid")
    head_module = build_head(head, vision_size * reduction.width_factor, text_size)
    return ReducingProjector(reduction, grid, head_module)
