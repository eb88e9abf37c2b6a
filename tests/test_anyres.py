"""AnyRes geometry (llava.data.media.AnyRes): for images of many sizes and several pinpoint sets,
the tile layout and the per-image token count equal those of transformers' LlavaNextProcessor
(spatial_unpad, a CLIP tower) and LlavaOnevisionProcessor (anyres_max_N, a SigLIP tower)."""

from __future__ import annotations

import pytest
from PIL import Image
from transformers import AutoTokenizer

from llava.data.media import AnyRes, ImageGeometry, parse_pinpoints

TILE = 32  # the tiny towers' image size; patch 8: a 4 x 4 grid a tile
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
    (320, 40),
    (64, 64),
    (96, 33),
    (150, 151),
]  # fmt: skip  (width, height)
PINPOINT_SETS = {
    "llava-next": "[(32, 64), (64, 32), (64, 64), (96, 32), (32, 96)]",
    "range 1-3": "(1x1),...,(3x3)",
    "range 1-2 by 1-4": "(1x1),...,(2x4)",
}


@pytest.fixture(scope="module")
def tokenizer(tiny_vlm_paths):
    if "llava_next" not in tiny_vlm_paths:
        pytest.skip("llava_next is not built on this transformers line")
    return AutoTokenizer.from_pretrained(tiny_vlm_paths["llava_next"])


def image_token_count(processor, size: tuple[int, int]) -> int:
    image = Image.new("RGB", size)
    inputs = processor(text=["<image>"], images=[image], return_tensors="pt")
    image_token_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    return int((inputs["input_ids"] == image_token_id).sum())


def test_pinpoint_ranges_and_lists():
    assert parse_pinpoints("(1x1),...,(2x2)", 336) == (
        (336, 336), (336, 672), (672, 336), (672, 672)
    )  # fmt: skip
    assert parse_pinpoints("[(336, 672), (672, 336)]", 336) == ((336, 672), (672, 336))
    assert parse_pinpoints("336x672,672x336", 336) == ((336, 672), (672, 336))
    with pytest.raises(ValueError, match="not a whole number of the tower's 336 px tiles"):
        parse_pinpoints("[(336, 500)]", 336)
    with pytest.raises(ValueError, match=r"expected a range such as \(1x1\)"):
        parse_pinpoints("big", 336)


@pytest.mark.parametrize("pinpoints", PINPOINT_SETS)
@pytest.mark.parametrize("size", SIZES)
def test_llava_next_counts_and_layout(size, pinpoints, tokenizer):
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor
    from transformers.image_processing_utils import select_best_resolution

    grid = parse_pinpoints(PINPOINT_SETS[pinpoints], TILE)
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessor(
            size={"shortest_edge": TILE},
            crop_size={"height": TILE, "width": TILE},
            image_grid_pinpoints=[list(p) for p in grid],
        ),
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",  # CLIP: the CLS feature dropped
        num_additional_image_tokens=1,
    )
    anyres = AnyRes(grid, ImageGeometry((TILE, TILE), 8, has_cls_token=True))
    layout = anyres.layout(size)
    width, height = size
    assert layout.resolution == tuple(select_best_resolution((height, width), list(grid)))
    assert layout.tiles == (layout.resolution[0] // TILE, layout.resolution[1] // TILE)
    assert layout.num_image_tokens == image_token_count(processor, size)


@pytest.mark.parametrize("max_tiles", [1, 2, 9])
@pytest.mark.parametrize("size", SIZES)
def test_onevision_counts_with_its_cap(size, max_tiles, tokenizer):
    from transformers import (
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    grid = parse_pinpoints("(1x1),...,(4x4)", TILE)
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(
            size={"height": TILE, "width": TILE}, image_grid_pinpoints=[list(p) for p in grid]
        ),
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(size={"height": TILE, "width": TILE}),
        num_image_tokens=16,  # SigLIP: a 4 x 4 grid, no CLS
        vision_feature_select_strategy="full",
        vision_aspect_ratio=f"anyres_max_{max_tiles}",
    )
    anyres = AnyRes(grid, ImageGeometry((TILE, TILE), 8, False), max_tiles=max_tiles)
    assert anyres.num_image_tokens(size) == image_token_count(processor, size)


def test_flat_keeps_every_tiles_features():
    anyres = AnyRes(((32, 64),), ImageGeometry((TILE, TILE), 8, True), merge="flat")
    assert anyres.num_image_tokens((100, 30)) == 16 + 2 * 16  # the base, then two tiles


def test_what_anyres_cannot_take_is_named():
    tile = ImageGeometry((TILE, TILE), 8, True)
    with pytest.raises(ValueError, match="anyres takes"):
        AnyRes(((32, 32),), tile, merge="unpad")
    with pytest.raises(ValueError, match="is not a whole number of tiles"):
        AnyRes(((32, 48),), tile)
    with pytest.raises(ValueError, match="without a token reduction"):
        AnyRes(((32, 32),), ImageGeometry((TILE, TILE), 8, True, "cls_patch"))
