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
import re
from collections.abc import Sequence
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


# -- AnyRes (LLaVA-NeXT, OneVision) -------------------------------------------------------------
Resolution = tuple[int, int]  # (height, width) in pixels
MERGES = ("spatial_unpad", "flat")
PINPOINT_RANGE = re.compile(r"^\((\d+)x(\d+)\),\.\.\.,\((\d+)x(\d+)\)$")
PINPOINT = re.compile(r"(\d+)\s*[x,]\s*(\d+)")


def parse_pinpoints(text: str, tile_size: int) -> tuple[Resolution, ...]:
    """`--image_grid_pinpoints`: a range of tile grids as LLaVA-NeXT writes it, "(1x1),...,(3x3)"
    (every grid from the first to the last, in tiles of `tile_size` pixels), or a list of
    resolutions in pixels, "[(336, 672), (672, 336)]" or "336x672,672x336" ((height, width), as
    transformers reads them). Each must be a whole number of tiles."""
    compact = text.replace(" ", "")
    match = PINPOINT_RANGE.match(compact)
    if match:
        first_rows, first_columns, last_rows, last_columns = map(int, match.groups())
        grids = [
            (rows, columns)
            for rows in range(first_rows, last_rows + 1)
            for columns in range(first_columns, last_columns + 1)
        ]
        pinpoints = tuple((rows * tile_size, columns * tile_size) for rows, columns in grids)
    else:
        pinpoints = tuple((int(h), int(w)) for h, w in PINPOINT.findall(text))
    if not pinpoints:
        raise ValueError(
            f"--image_grid_pinpoints {text!r}: expected a range such as (1x1),...,(3x3) or a "
            "list of resolutions such as [(336, 672), (672, 336)]"
        )
    for height, width in pinpoints:
        if height % tile_size or width % tile_size or not height or not width:
            raise ValueError(
                f"--image_grid_pinpoints: {height}x{width} is not a whole number of the tower's "
                f"{tile_size} px tiles"
            )
    return pinpoints


@dataclass(frozen=True)
class AnyResLayout:
    """How one image is seen: resized into `resolution`, cut into `tiles` (rows, columns) of the
    tower's size beside a downscaled base image; the tiles' features form a grid of
    `feature_grid` (rows, columns) after unpadding, each row closed by a newline token."""

    resolution: Resolution
    tiles: tuple[int, int]
    feature_grid: tuple[int, int]
    num_image_tokens: int


# How the model sees each medium of a sample (one `media_kinds` entry per medium, in order):
# an image tiled by AnyRes, an image seen whole (one tile, OneVision's images of a several-image
# sample), or a video's frames.
TILED, WHOLE, VIDEO = 0, 1, 2


@dataclass(frozen=True)
class VideoSampling:
    """A video as the model sees it: `frames` frames (sampled uniformly, llava.data.video), each
    squashed to one tile; each frame's patch grid shrunk by bilinear resizing to
    ceil(rows / pool_stride) x ceil(columns / pool_stride) (OneVision's pooling; 1 keeps it);
    the frames' tokens in order, then one newline where the model closes rows with one."""

    frames: int
    pool_stride: int = 2

    def __post_init__(self):
        if self.frames < 1 or self.pool_stride < 1:
            raise ValueError(
                f"--video_frames {self.frames} and --video_pool_stride {self.pool_stride} must "
                "be at least 1"
            )

    def pooled_grid(self, tile: ImageGeometry) -> tuple[int, int]:
        rows, columns = tile.grid
        return math.ceil(rows / self.pool_stride), math.ceil(columns / self.pool_stride)

    def num_image_tokens(self, tile: ImageGeometry, newline: bool) -> int:
        rows, columns = self.pooled_grid(tile)
        return self.frames * rows * columns + int(newline)


@dataclass(frozen=True)
class AnyRes:
    """LLaVA-NeXT's AnyRes over a tower of `tile` geometry, and OneVision's media around it.

    The image is fitted into the best of `pinpoints` (the most of its pixels kept, then the
    least waste), cut into tiles the tower takes, and a downscaled copy of the whole image goes
    first. `merge` "spatial_unpad" arranges the tiles' features as one grid, drops the rows or
    columns that are padding for the image's aspect ratio, and ends each row with a learned
    newline; "flat" keeps every tile's features in order. `max_tiles` (OneVision's
    anyres_max_N) shrinks an unpadded grid of more than about N tiles' features.
    `several_images_whole` (OneVision): in a sample of several images each is seen whole, one
    tile closed by a newline. `video`: how videos are seen (None: the model takes none).
    """

    pinpoints: tuple[Resolution, ...]
    tile: ImageGeometry
    merge: str = "spatial_unpad"
    max_tiles: int | None = None
    several_images_whole: bool = False
    video: VideoSampling | None = None

    def __post_init__(self):
        if self.merge not in MERGES:
            raise ValueError(f"--mm_patch_merge_type {self.merge!r}: anyres takes {MERGES}")
        if self.tile.reduction is not None or self.tile.select_feature != "patch":
            raise ValueError("anyres takes the tower's patch features, without a token reduction")
        rows, columns = self.tile.image_size
        for height, width in self.pinpoints:
            if height % rows or width % columns:
                raise ValueError(f"pinpoint {height}x{width} is not a whole number of tiles")

    def best_resolution(self, size: tuple[int, int]) -> Resolution:
        """The pinpoint an image of `size` (width, height) is fitted into."""
        width, height = size
        best, best_kept, best_waste = None, -1, None
        for target_height, target_width in self.pinpoints:
            scale = min(target_width / width, target_height / height)
            kept = min(int(width * scale) * int(height * scale), width * height)
            waste = target_height * target_width - kept
            if kept > best_kept or (kept == best_kept and waste < best_waste):
                best, best_kept, best_waste = (target_height, target_width), kept, waste
        return best

    def layout(self, size: tuple[int, int]) -> AnyResLayout:
        """The layout of an image of `size` (width, height), known from its size alone."""
        width, height = size
        resolution = self.best_resolution(size)
        tile_rows, tile_columns = self.tile.image_size
        tiles = (resolution[0] // tile_rows, resolution[1] // tile_columns)
        grid_rows, grid_columns = self.tile.grid
        rows, columns = grid_rows * tiles[0], grid_columns * tiles[1]
        base = self.tile.num_image_tokens
        if self.merge == "flat":
            return AnyResLayout(resolution, tiles, (rows, columns), base + rows * columns)
        rows, columns = unpadded_grid(rows, columns, height, width)
        if self.max_tiles is not None:
            ratio = math.sqrt(rows * columns / (self.max_tiles * grid_rows**2))
            if ratio > 1.1:
                rows, columns = int(rows // ratio), int(columns // ratio)
        return AnyResLayout(resolution, tiles, (rows, columns), base + rows * (columns + 1))

    def num_image_tokens(self, size: tuple[int, int]) -> int:
        return self.layout(size).num_image_tokens

    @property
    def has_newline(self) -> bool:
        return self.merge == "spatial_unpad"

    def media_kinds(self, is_video: Sequence[bool]) -> list[int]:
        """How each medium of one sample is seen, given which of them are videos."""
        if any(is_video) and self.video is None:
            raise ValueError("a video record, but the model takes no videos (set --video_frames)")
        whole = self.several_images_whole and len(is_video) - sum(is_video) > 1
        return [VIDEO if video else WHOLE if whole else TILED for video in is_video]

    def medium_tokens(self, kind: int, size: tuple[int, int] | None) -> int:
        """The image tokens of one medium of `kind`; `size` (width, height) for a tiled image."""
        if kind == TILED:
            return self.layout(size).num_image_tokens
        if kind == WHOLE:
            return self.tile.num_image_tokens + int(self.has_newline)
        return self.video.num_image_tokens(self.tile, self.has_newline)

    def medium_views(self, kind: int, size: tuple[int, int] | None) -> int:
        """The pictures of one medium the tower sees: base and tiles, one, or the frames."""
        if kind == TILED:
            rows, columns = self.layout(size).tiles
            return 1 + rows * columns
        return 1 if kind == WHOLE else self.video.frames


def unpadded_grid(rows: int, columns: int, height: int, width: int) -> tuple[int, int]:
    """The part of a rows x columns feature grid an image of height x width fills when fitted
    into it centred: the padding rows (or columns) on both sides dropped."""
    if width / height > columns / rows:  # wider: padded above and below
        fitted = int(round(height * (columns / width), 7))
        rows -= (rows - fitted) // 2 * 2
    else:
        fitted = int(round(width * (rows / height), 7))
        columns -= (columns - fitted) // 2 * 2
    return rows, columns


ANYRES_ASPECT = re.compile(r"^anyres(?:_max_(\d+))?$")


def is_anyres(image_aspect_ratio: str) -> bool:
    """`--image_aspect_ratio anyres` or OneVision's `anyres_max_N`."""
    return ANYRES_ASPECT.match(image_aspect_ratio or "") is not None


def anyres_of(
    image_aspect_ratio: str,
    pinpoints: str | Sequence[Sequence[int]] | None,
    merge: str,
    tile: ImageGeometry,
    video_frames: int | None = None,
    video_pool_stride: int = 2,
) -> AnyRes | None:
    """The AnyRes of a model's settings (None unless its aspect ratio is anyres): `pinpoints`
    as --image_grid_pinpoints writes them (`parse_pinpoints`, in the tower's tiles) or as a
    saved config's (height, width) pairs, `merge` its mm_patch_merge_type, `tile` its tower's
    geometry (square tiles). anyres_max_N is OneVision's: its cap, and the images of a
    several-image sample seen whole. `video_frames` (None: no videos) and `video_pool_stride`
    say how videos are seen."""
    match = ANYRES_ASPECT.match(image_aspect_ratio or "")
    if match is None:
        return None
    if not pinpoints:
        raise ValueError(f"--image_aspect_ratio {image_aspect_ratio} needs --image_grid_pinpoints")
    tile_height, tile_width = tile.image_size
    if tile_height != tile_width:
        raise ValueError(f"anyres takes a tower of square tiles, not {tile_height}x{tile_width}")
    if isinstance(pinpoints, str):
        pinpoints = parse_pinpoints(pinpoints, tile_height)
    max_tiles = int(match.group(1)) if match.group(1) else None
    resolutions = tuple((int(height), int(width)) for height, width in pinpoints)
    video = VideoSampling(video_frames, video_pool_stride) if video_frames else None
    return AnyRes(resolutions, tile, merge, max_tiles, max_tiles is not None, video)
