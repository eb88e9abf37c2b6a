"""AnyRes packing on the model side (llava.model.anyres): for images of many sizes and several
pinpoint sets, the packed features are as many as AnyRes counts, equal transformers'
LlavaNextModel.pack_image_features (spatial_unpad) and LlavaOnevisionModel.pack_image_features
(anyres_max_N), and pass gradients to the newline and to every kept feature."""

from __future__ import annotations

import pytest
import torch

from llava.data.media import AnyRes, ImageGeometry, parse_pinpoints
from llava.model.anyres import pack_image_features

TILE, PATCH, WIDTH = 32, 8, 8  # a 4 x 4 patch grid a tile; features 8 wide
VISION = {"image_size": TILE, "patch_size": PATCH, "hidden_size": WIDTH, "intermediate_size": 16,
          "num_hidden_layers": 1, "num_attention_heads": 2}  # fmt: skip
TEXT = {"hidden_size": WIDTH, "intermediate_size": 16, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 64}  # fmt: skip
SIZES = [
    (32, 32),
    (64, 32),
    (32, 64),
    (100, 30),
    (30, 100),
    (97, 61),
    (61, 97),
    (200, 150),
    (13, 7),
    (1, 1),
    (320, 40),
    (40, 320),
    (64, 64),
    (96, 33),
    (150, 151),
    (4000, 3000),
    (5000, 50),
    (1000, 9000),
]  # fmt: skip  (width, height)
PINPOINT_SETS = {
    "llava-next": "[(32, 64), (64, 32), (64, 64), (96, 32), (32, 96)]",
    "range 1-3": "(1x1),...,(3x3)",
    "range 1-2 by 1-4": "(1x1),...,(2x4)",
    "range 1-4": "(1x1),...,(4x4)",
}


def tile_geometry() -> ImageGeometry:
    return ImageGeometry((TILE, TILE), PATCH, has_cls_token=False)


def random_features(anyres: AnyRes, size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """(1 + num_tiles, 16, WIDTH) features of the base image and its tiles."""
    tile_rows, tile_columns = anyres.layout(size).tiles
    generator = torch.Generator().manual_seed(seed)
    shape = (1 + tile_rows * tile_columns, anyres.tile.num_patches, WIDTH)
    return torch.randn(shape, generator=generator)


@pytest.fixture(scope="module")
def llava_next():
    """A tiny transformers LlavaNextModel over the tiny tower (CLIP, 32 px, patch 8)."""
    from transformers import LlavaNextConfig, LlavaNextModel

    config = LlavaNextConfig(
        vision_config={"model_type": "clip_vision_model", **VISION},
        text_config={"model_type": "llama", **TEXT},
    )
    return LlavaNextModel(config)


@pytest.fixture(scope="module")
def llava_onevision():
    """A tiny transformers LlavaOnevisionModel over the tiny tower (SigLIP, 32 px, patch 8)."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionModel

    config = LlavaOnevisionConfig(
        vision_config={"model_type": "siglip_vision_model", **VISION},
        text_config={"model_type": "qwen2", **TEXT},
    )
    return LlavaOnevisionModel(config)


def transformers_packing(model, anyres: AnyRes, size, features, **options) -> torch.Tensor:
    """The model's pack_image_features on one image, with `anyres`'s pinpoints and the
    model's own newline."""
    model.config.image_grid_pinpoints = [list(p) for p in anyres.pinpoints]
    width, height = size
    packed, lengths = model.pack_image_features(
        [features],
        torch.tensor([[height, width]]),  # transformers' image_sizes are (height, width)
        image_newline=model.image_newline,
        **options,
    )
    assert lengths.tolist() == [packed[0].shape[0]]
    return packed[0]


@pytest.mark.parametrize("pinpoints", PINPOINT_SETS)
@pytest.mark.parametrize("size", SIZES)
def test_llava_next_packing_equals_transformers(size, pinpoints, llava_next):
    anyres = AnyRes(parse_pinpoints(PINPOINT_SETS[pinpoints], TILE), tile_geometry())
    features = random_features(anyres, size)
    packed = pack_image_features(features, anyres, size, llava_next.image_newline)
    assert packed.shape == (anyres.num_image_tokens(size), WIDTH)
    expected = transformers_packing(
        llava_next, anyres, size, features, vision_feature_select_strategy="default"
    )
    assert torch.equal(packed, expected)


@pytest.mark.parametrize("max_tiles", [1, 2, 9])
@pytest.mark.parametrize("pinpoints", ["range 1-4", "llava-next"])
@pytest.mark.parametrize("size", SIZES)
def test_onevision_packing_equals_transformers(size, pinpoints, max_tiles, llava_onevision):
    grid = parse_pinpoints(PINPOINT_SETS[pinpoints], TILE)
    anyres = AnyRes(grid, tile_geometry(), max_tiles=max_tiles)
    features = random_features(anyres, size)
    packed = pack_image_features(features, anyres, size, llava_onevision.image_newline)
    assert packed.shape == (anyres.num_image_tokens(size), WIDTH)
    expected = transformers_packing(
        llava_onevision, anyres, size, features, vision_aspect_ratio=f"anyres_max_{max_tiles}"
    )
    assert torch.equal(packed, expected)  # the same interpolation: equal to the bit on CPU


def test_onevision_cap_shrinks_the_grid():
    """A 2x2-tile image's 8x8 grid under anyres_max_1: ratio 2, so a 4x4 grid and its newlines."""
    anyres = AnyRes(((64, 64),), tile_geometry(), max_tiles=1)
    features = random_features(anyres, (64, 64))
    packed = pack_image_features(features, anyres, (64, 64), torch.zeros(WIDTH))
    assert anyres.layout((64, 64)).feature_grid == (4, 4)
    assert packed.shape == (16 + 4 * 5, WIDTH)


def test_tiles_side_by_side_form_rows_then_a_newline():
    """Golden order: two tiles side by side (64 x 32), no padding; feature = 100 tile + patch."""
    anyres = AnyRes(((32, 64),), tile_geometry())
    features = torch.tensor([[100.0 * t + p for p in range(16)] for t in range(3)])[..., None]
    packed = pack_image_features(features, anyres, (64, 32), torch.tensor([-1.0]))
    base = list(range(16))
    rows = [
        [100 + 4 * r + c for c in range(4)] + [200 + 4 * r + c for c in range(4)] + [-1]
        for r in range(4)
    ]
    assert packed[:, 0].tolist() == base + [value for row in rows for value in row]


def test_flat_keeps_every_tile_in_order():
    anyres = AnyRes(((64, 64),), tile_geometry(), merge="flat")
    features = random_features(anyres, (100, 30))
    packed = pack_image_features(features, anyres, (100, 30))
    assert packed.shape == (anyres.num_image_tokens((100, 30)), WIDTH)
    assert torch.equal(packed, features.flatten(0, 1))


@pytest.mark.parametrize("size", [(64, 20), (20, 64), (97, 61), (32, 32)])
def test_gradients_reach_the_newline_and_every_kept_feature(size):
    """Without the cap each kept feature appears once and the padding not at all, so the
    gradient of the sum is 1 on kept features, 0 on dropped ones, and `rows` on the newline."""
    anyres = AnyRes(((32, 64), (64, 32), (64, 64)), tile_geometry())
    layout = anyres.layout(size)
    features = random_features(anyres, size).requires_grad_()
    newline = torch.randn(WIDTH, requires_grad=True)
    pack_image_features(features, anyres, size, newline).sum().backward()

    rows, columns = layout.feature_grid
    assert torch.equal(newline.grad, torch.full((WIDTH,), float(rows)))
    kept = kept_mask(layout.tiles, size=(rows, columns))  # (1 + num_tiles, 16)
    assert torch.equal(features.grad, kept[..., None].float().expand_as(features))
    if (rows, columns) != (4 * layout.tiles[0], 4 * layout.tiles[1]):
        assert not kept.all()  # some padding was dropped, and got no gradient


def kept_mask(tiles: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Which features a centred `size` window of the tiles' 4x4-per-tile grid keeps, by tile
    and patch (the base image always kept); written out cell by cell."""
    tile_rows, tile_columns = tiles
    rows, columns = size
    top, left = (4 * tile_rows - rows) // 2, (4 * tile_columns - columns) // 2
    mask = torch.zeros(1 + tile_rows * tile_columns, 16, dtype=torch.bool)
    mask[0] = True
    for tile_row in range(tile_rows):
        for tile_column in range(tile_columns):
            for patch_row in range(4):
                for patch_column in range(4):
                    row, column = 4 * tile_row + patch_row, 4 * tile_column + patch_column
                    inside = top <= row < top + rows and left <= column < left + columns
                    tile = 1 + tile_row * tile_columns + tile_column
                    mask[tile, 4 * patch_row + patch_column] = inside
    return mask


def test_features_that_do_not_fit_the_layout_are_named():
    anyres = AnyRes(((32, 64),), tile_geometry())
    with pytest.raises(ValueError, match=r"expected 3 images \(the base, then 1x2 tiles\)"):
        pack_image_features(torch.zeros(2, 16, WIDTH), anyres, (64, 32), torch.zeros(WIDTH))
    with pytest.raises(ValueError, match="with a newline"):
        pack_image_features(torch.zeros(3, 16, WIDTH), anyres, (64, 32))
