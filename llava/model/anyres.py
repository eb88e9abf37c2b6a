"""AnyRes on the model side: one image's base and tile features packed into the image tokens the
language model sees, in the order and number that `llava.data.media.AnyRes` counts.

`spatial_unpad` is LLaVA-NeXT's packing (transformers' `LlavaNextModel.pack_image_features`):
the tiles' features laid out as one feature grid, the rows or columns that are padding for the
image's aspect ratio dropped, each row closed by a learned newline. With `max_tiles` it is
OneVision's (`LlavaOnevisionModel.pack_image_features`, anyres_max_N): an unpadded grid of more
than about N tiles' features is first shrunk by bilinear interpolation. `flat` keeps every tile's
features in tile order. `pack_medium` adds OneVision's other media: an image seen whole (its
features, then a newline) and a video (each frame's grid pooled, the frames in order, then a
newline; `LlavaOnevisionModel.get_video_features`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llava.data.media import TILED, WHOLE, AnyRes, AnyResLayout, unpadded_grid


def pack_image_features(
    features: torch.Tensor,
    anyres: AnyRes,
    image_size: tuple[int, int],
    newline: torch.Tensor | None = None,
) -> torch.Tensor:
    """One image's projected features, (1 + num_tiles, P, D): the base image first, then its
    tiles in row-major tile order, each the tower's P patch features (row-major); `image_size`
    is the image's (width, height) before resizing. Returns (num_image_tokens, D): the base
    image's P features, then the tiles' features packed by `anyres.merge`. `newline` (D,) closes
    each row for spatial_unpad; flat takes none."""
    layout = anyres.layout(image_size)
    check_features(features, anyres, layout)
    base, tile_features = features[0], features[1:]  # (P, D), (num_tiles, P, D)
    if anyres.merge == "flat":
        return torch.cat([base, tile_features.flatten(0, 1)])
    if newline is None:
        raise ValueError("spatial_unpad closes each row of the tiles' features with a newline")
    grid = tile_feature_grid(tile_features, layout.tiles, anyres.tile.grid)  # (D, rows, columns)
    grid = unpad(grid, image_size)
    if grid.shape[1:] != layout.feature_grid:  # OneVision's cap: AnyRes.layout decides it
        grid = F.interpolate(grid[None], list(layout.feature_grid), mode="bilinear")[0]
    return torch.cat([base, rows_with_newlines(grid, newline)])


def check_features(features: torch.Tensor, anyres: AnyRes, layout: AnyResLayout) -> None:
    tile_rows, tile_columns = layout.tiles
    expected = (1 + tile_rows * tile_columns, anyres.tile.num_patches)
    if features.dim() != 3 or tuple(features.shape[:2]) != expected:
        raise ValueError(
            f"AnyRes features do not match the image's layout: expected {expected[0]} images (the "
            f"base, then {tile_rows}x{tile_columns} tiles) of {expected[1]} patch features, got "
            f"a tensor of shape {tuple(features.shape)}"
        )


def tile_feature_grid(
    tile_features: torch.Tensor, tiles: tuple[int, int], grid: tuple[int, int]
) -> torch.Tensor:
    """(num_tiles, P, D) tile features, row-major tiles of a rows x columns patch `grid` each,
    to one channels-first feature grid (D, tile_rows * rows, tile_columns * columns)."""
    tile_rows, tile_columns = tiles
    rows, columns = grid
    width = tile_features.shape[-1]
    cells = tile_features.reshape(tile_rows, tile_columns, rows, columns, width)
    # (D, tile row, patch row, tile column, patch column): a tile's rows sit inside its tile row
    cells = cells.permute(4, 0, 2, 1, 3).contiguous()
    return cells.view(width, tile_rows * rows, tile_columns * columns)


def unpad(grid: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """The part of a (D, rows, columns) feature grid that an image of `image_size` (width,
    height), fitted in centred, fills: the padding rows or columns on both sides dropped."""
    width, height = image_size
    rows, columns = grid.shape[1:]
    kept_rows, kept_columns = unpadded_grid(rows, columns, height, width)
    top, left = (rows - kept_rows) // 2, (columns - kept_columns) // 2
    return grid[:, top : top + kept_rows, left : left + kept_columns]


def rows_with_newlines(grid: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
    """(D, rows, columns) to (rows * (columns + 1), D): row by row, each closed by `newline`."""
    width, rows, _ = grid.shape
    closing = newline.to(grid.device, grid.dtype)[:, None, None].expand(width, rows, 1)
    return torch.cat([grid, closing], dim=2).flatten(1, 2).transpose(0, 1)


def pack_medium(
    features: torch.Tensor,
    kind: int,
    anyres: AnyRes,
    image_size: tuple[int, int],
    newline: torch.Tensor | None = None,
) -> torch.Tensor:
    """One medium's projected features, (views, P, D) as `anyres.medium_views` counts them, to
    its (medium_tokens, D) image tokens; `image_size` (width, height) for a tiled image."""
    if kind == TILED:
        return pack_image_features(features, anyres, image_size, newline)
    if kind == WHOLE:
        tokens = features[0]  # (P, D)
    else:
        tokens = pool_frames(features, anyres.tile.grid, anyres.video.pooled_grid(anyres.tile))
    if not anyres.has_newline:
        return tokens
    if newline is None:
        raise ValueError("spatial_unpad closes a whole image or a video with a newline")
    return torch.cat([tokens, newline.to(tokens.device, tokens.dtype)[None]])


def pool_frames(
    frames: torch.Tensor, grid: tuple[int, int], pooled: tuple[int, int]
) -> torch.Tensor:
    """(F, P, D) frame features over a rows x columns `grid` to (F * pooled cells, D): each
    frame's grid resized bilinearly to `pooled`, frames in order."""
    count, _, width = frames.shape
    if tuple(pooled) != tuple(grid):
        cells = frames.view(count, *grid, width).permute(0, 3, 1, 2)  # (F, D, rows, columns)
        cells = F.interpolate(cells, size=list(pooled), mode="bilinear")
        frames = cells.permute(0, 2, 3, 1).reshape(count, -1, width)
    return frames.reshape(-1, width)
