"""How a composed model's vision tower sees an image: the one place its token count is made.

A ViT tower takes images of one pixel size, cuts them into square patches and gives one feature
per patch (and a CLS feature, for CLIP); `mm_vision_select_feature` picks which of them go on
to the projector. `ImageGeometry` holds those facts and derives the grid, the positions the
tower runs over and the image tokens the language model sees. The tower, the conversation
tokenizer (through the model's `num_image_tokens`), the FLOP model, the export and the preview
all ask it; nothing else writes the formula.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SELECT_FEATURES = ("patch", "cls_patch")
SPATIAL_POOL, PIXEL_SHUFFLE = "spatial_pool", "pixel_shuffle"
POOL_MODES = ("average", "bilinear")


@dataclass(frozen=True)
class TokenReduction:
    """A token-reducing projector's first step over the tower's patch grid: `spatial_pool`
    (each `factor` x `factor` window to one token, by average pooling, or bilinear resizing to
    the same grid; a partial window at the edge counts), or `pixel_shuffle` (space-to-depth: each
    window's features side by side, `factor`**2 times as wide; the grid must divide)."""

    kind: str
    factor: int
    mode: str = "average"

    def __post_init__(self):
        if self.kind not in (SPATIAL_POOL, PIXEL_SHUFFLE) or self.factor < 2:
            raise ValueError(f"no token reduction {self.kind}{self.factor} (a factor of 2 or more)")
        if self.mode not in POOL_MODES or (self.kind == PIXEL_SHUFFLE and self.mode != "average"):
            raise ValueError(f"{self.kind} takes no mode {self.mode!r}")

    @property
    def name(self) -> str:
        suffix = "_bilinear" if self.mode == "bilinear" else ""
        return f"{self.kind}{self.factor}{suffix}"

    def output_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        rows, columns = grid
        if self.kind == PIXEL_SHUFFLE:
            if rows % self.factor or columns % self.factor:
                raise ValueError(
                    f"{self.name}: the tower's {rows}x{columns} patch grid does not divide by "
                    f"{self.factor}"
                )
            return rows // self.factor, columns // self.factor
        return math.ceil(rows / self.factor), math.ceil(columns / self.factor)

    @property
    def width_factor(self) -> int:
        """How many times wider a token is after the reduction."""
        return self.factor**2 if self.kind == PIXEL_SHUFFLE else 1


@dataclass(frozen=True)
class ImageGeometry:
    """A ViT tower's view of one image.

    `image_size` is (height, width) in pixels, `patch_size` the side of a square patch,
    `has_cls_token` whether the tower adds a CLS position, `select_feature` which outputs
    go on to the projector: "patch" (the patches) or "cls_patch" (CLS, then the patches);
    `reduction` the projector's token reduction over the patch grid, if it has one.
    """

    image_size: tuple[int, int]
    patch_size: int
    has_cls_token: bool
    select_feature: str = "patch"
    reduction: TokenReduction | None = None

    def __post_init__(self):
        if self.select_feature not in SELECT_FEATURES:
            raise ValueError(
                f"Unknown mm_vision_select_feature {self.select_feature!r}; known: "
                f"{', '.join(SELECT_FEATURES)}"
            )
        if self.select_feature == "cls_patch" and not self.has_cls_token:
            raise ValueError("mm_vision_select_feature 'cls_patch' needs a tower with a CLS token")
        if self.reduction is not None:
            if self.select_feature == "cls_patch":
                raise ValueError(
                    f"{self.reduction.name} reduces the patch grid: use mm_vision_select_feature "
                    "'patch', not 'cls_patch'"
                )
            self.reduction.output_grid(self.grid)  # a grid it cannot reduce fails here

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, columns) of patches."""
        height, width = self.image_size
        return height // self.patch_size, width // self.patch_size

    @property
    def num_patches(self) -> int:
        rows, columns = self.grid
        return rows * columns

    @property
    def positions(self) -> int:
        """The sequence the tower's layers run over: the patches and the CLS token."""
        return self.num_patches + int(self.has_cls_token)

    @property
    def num_features(self) -> int:
        """The tower's features that go on to the projector."""
        return self.num_patches + int(self.select_feature == "cls_patch")

    @property
    def num_image_tokens(self) -> int:
        """The image tokens the language model sees: one per feature, or per cell of the
        reduced grid."""
        if self.reduction is None:
            return self.num_features
        rows, columns = self.reduction.output_grid(self.grid)
        return rows * columns
