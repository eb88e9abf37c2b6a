"""Parity with transformers' LlavaForConditionalGeneration on the same weights and input."""

from __future__ import annotations

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from llava.constants import IMAGE_PLACEHOLDER_ID
from llava.model.builder import build_llava_model
from llava.model.hf_llava import check_exportable, hf_llava_config, hf_llava_state_dict
from tests.fixtures.models import TINY_IMAGE_SIZE, TINY_VOCAB_SIZE

IMAGE_TOKEN_ID = TINY_VOCAB_SIZE - 1


@pytest.mark.parametrize("llm", ["llama", "qwen2"])
@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_logits_match_transformers_llava(llm, tower, tiny_llms, tiny_towers):
    torch.manual_seed(0)
    ours = build_llava_model(tiny_llms[llm], tiny_towers[tower]).eval()
    theirs = LlavaForConditionalGeneration(hf_llava_config(ours.config, IMAGE_TOKEN_ID)).eval()
    missing, unexpected = theirs.load_state_dict(
        hf_llava_state_dict(ours.state_dict()), strict=False
    )
    assert unexpected == []
    assert missing == []

    num = ours.num_image_tokens
    text = [1, 17, 18, 19]
    ids = torch.tensor([text + [IMAGE_PLACEHOLDER_ID] * num + [25, 26, 27]])
    pixel_values = torch.randn(1, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    with torch.no_grad():
        our_logits = ours(input_ids=ids, pixel_values=pixel_values).logits
        their_logits = theirs(
            input_ids=ids.masked_fill(ids == IMAGE_PLACEHOLDER_ID, IMAGE_TOKEN_ID),
            pixel_values=pixel_values,
        ).logits
    assert torch.allclose(our_logits, their_logits, atol=1e-5, rtol=1e-5)


def test_only_mlp2x_gelu_with_an_hf_tower_maps(
    tiny_llama_path, tiny_clip_path, tiny_open_clip_spec
):
    linear = build_llava_model(tiny_llama_path, tiny_clip_path, mm_projector_type="linear")
    with pytest.raises(ValueError, match="Only mlp2x_gelu"):
        check_exportable(linear.config)
    open_clip = build_llava_model(tiny_llama_path, tiny_open_clip_spec)
    with pytest.raises(ValueError, match="'open_clip'"):
        check_exportable(open_clip.config)


@pytest.mark.parametrize("tower", ["clip", "siglip"])
@pytest.mark.parametrize("size", [(100, 30), (30, 100), (64, 64), (40, 40), (13, 7)])
def test_anyres_logits_match_transformers_llava_next(size, tower, tiny_llama_path, tiny_towers):
    """An anyres (spatial_unpad) model and LlavaNextForConditionalGeneration on the same weights
    (the newline included), tiles and image sizes: the same logits, two images of two sizes."""
    from transformers import LlavaNextForConditionalGeneration

    from llava.data.anyres_data import AnyResMedia

    torch.manual_seed(0)
    ours = build_llava_model(
        tiny_llama_path,
        tiny_towers[tower],
        mm_vision_select_feature="patch",
        image_aspect_ratio="anyres",
        image_grid_pinpoints="(1x1),...,(3x3)",
        mm_patch_merge_type="spatial_unpad",
    ).eval()
    config = hf_llava_config(ours.config, IMAGE_TOKEN_ID)
    theirs = LlavaNextForConditionalGeneration(config).eval()
    missing, unexpected = theirs.load_state_dict(
        hf_llava_state_dict(ours.state_dict()), strict=False
    )
    assert (missing, unexpected) == ([], [])
    media = AnyResMedia(ours.anyres, ours.vision_tower.image_processor, lambda n: [0] * n)
    generator = torch.Generator().manual_seed(1)
    images = [
        torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
        for width, height in (size, (48, 32))
    ]
    from PIL import Image

    pils = [Image.fromarray(image.numpy()) for image in images]
    pixels = media.pixels(pils)
    counts = [ours.anyres.num_image_tokens(image.size) for image in pils]
    ids = torch.tensor(
        [[1, 17] + [IMAGE_PLACEHOLDER_ID] * counts[0] + [18] + [IMAGE_PLACEHOLDER_ID] * counts[1]
         + [25, 26]]
    )  # fmt: skip
    tiles = [1 + r * c for r, c in (ours.anyres.layout(image.size).tiles for image in pils)]
    padded = torch.zeros(2, max(tiles), *pixels["pixel_values"].shape[1:])  # their layout
    for row, chunk in enumerate(pixels["pixel_values"].split(tiles)):
        padded[row, : chunk.shape[0]] = chunk
    with torch.no_grad():
        our_logits = ours(input_ids=ids, **pixels).logits
        their_logits = theirs(
            input_ids=ids.masked_fill(ids == IMAGE_PLACEHOLDER_ID, IMAGE_TOKEN_ID),
            pixel_values=padded,
            image_sizes=pixels["image_sizes"],
        ).logits
    assert torch.allclose(our_logits, their_logits, atol=1e-5, rtol=1e-5)


def test_anyres_settings_llava_next_lacks_are_named(tiny_llama_path, tiny_clip_path):
    for aspect, merge, match in [
        ("anyres_max_9", "spatial_unpad", "OneVision's cap"),
        ("anyres", "flat", "mm_patch_merge_type 'flat'"),
    ]:
        model = build_llava_model(
            tiny_llama_path,
            tiny_clip_path,
            image_aspect_ratio=aspect,
            image_grid_pinpoints="(1x1),...,(2x2)",
            mm_patch_merge_type=merge,
        )
        with pytest.raises(ValueError, match=match):
            check_exportable(model.config)
