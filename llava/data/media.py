"""How a composed model's vision tower sees an image: the one place its token count is made.

A ViT tower takes images of one pixel size, cuts them into square patches and gives one feature
per patch (and a CLS feature, for CLIP); `mm_vision_select_feature` picks which of them go on
to the projector. `ImageGeometry` holds those facts and derives the grid, the positions the
tower runs over and the image tokens the language model sees. The tower, the conversation
tokenizer (through the model's `num_image_tokens`), the FLOP model, the export and the preview
all ask it; nothing else writes the formula.
"""

from __future__ import annotations

from dataclasses import dataclass

SELECT_FEATURES = ("patch", "cls_patch")


@dataclass(frozen=True)
class ImageGeometry:
    """A ViT tower's view of one image.

    `image_size` is (height, width) in pixels, `patch_size` the side of a square patch,
    `has_cls_token` whether the tower adds a CLS position, `select_feature` which outputs
    become image tokens: "patch" (the patches) or "cls_patch" (CLS, then the patches).
    """

    image_size: tuple[int, int]
    patch_size: int
    has_cls_token: bool
    select_feature: str = "patch"

    def __post_init__(self):
        if self.select_feature not in SELECT_FEATURES:
            raise ValueError(
                f"Unknown mm_vision_select_feature {self.select_feature!r}; known: "
                f"{', '.join(SELECT_FEATURES)}"
            )
        if self.select_feature == "cls_patch" and not self.has_cls_token:
            raise ValueError("mm_vision_select_feature 'cls_patch' needs a tower with a CLS token")

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
    def num_image_tokens(self) -> int:
        """The features that go on to the projector, one image token each."""
        return self.num_patches + int(self.select_feature == "cls_patch")
