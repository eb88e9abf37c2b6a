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
    pixels = media.pixels(pils, media.kinds(pils))
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


def test_anyres_settings_transformers_lacks_are_named(tiny_llama_path, tiny_clip_path):
    for aspect, merge, frames, stride, match in [
        ("anyres", "flat", None, 2, "mm_patch_merge_type 'flat'"),
        ("anyres_max_4", "flat", None, 2, "mm_patch_merge_type 'flat'"),
        ("anyres", "spatial_unpad", 4, 2, "does not map onto LlavaNextForConditionalGeneration"),
        ("anyres_max_4", "spatial_unpad", 4, 3, "video_pool_stride 3 does not map"),
    ]:
        model = build_llava_model(
            tiny_llama_path,
            tiny_clip_path,
            image_aspect_ratio=aspect,
            image_grid_pinpoints="(1x1),...,(2x2)",
            mm_patch_merge_type=merge,
            video_frames=frames,
            video_pool_stride=stride,
        )
        with pytest.raises(ValueError, match=match):
            check_exportable(model.config)


ONEVISION_CASES = {
    "one image (tiled, capped)": [(97, 61)],
    "two images (each whole)": [(97, 61), (30, 100)],
    "a video": "video",
}


@pytest.mark.parametrize("case", ONEVISION_CASES)
@pytest.mark.parametrize("tower", ["siglip", "clip"])
def test_onevision_logits_match_transformers(case, tower, tiny_llama_path, tiny_towers, tmp_path):
    """An anyres_max_N model with videos and LlavaOnevisionForConditionalGeneration on the same
    weights and the same processed media (transformers' processor's pictures, our data
    pipeline's): the same logits, for one image, two images and a video."""
    from PIL import Image
    from transformers import LlavaOnevisionForConditionalGeneration

    from llava.data.anyres_data import AnyResMedia
    from llava.data.video import Video, read_frames
    from tests.fixtures.datasets import write_video
    from tests.test_onevision_data import FRAME_LEVELS

    torch.manual_seed(0)
    ours = build_llava_model(
        tiny_llama_path,
        tiny_towers[tower],
        mm_vision_select_feature="patch",
        image_aspect_ratio="anyres_max_1",
        image_grid_pinpoints="(1x1),...,(3x3)",
        mm_patch_merge_type="spatial_unpad",
        video_frames=3,
    ).eval()
    video_token_id = IMAGE_TOKEN_ID - 1
    config = hf_llava_config(ours.config, IMAGE_TOKEN_ID, video_token_id)
    theirs = LlavaOnevisionForConditionalGeneration(config).eval()
    missing, unexpected = theirs.load_state_dict(
        hf_llava_state_dict(ours.state_dict()), strict=False
    )
    assert (missing, unexpected) == ([], [])
    media = AnyResMedia(ours.anyres, ours.vision_tower.image_processor, lambda n: [0] * n)
    if ONEVISION_CASES[case] == "video":
        items = [read_frames(Video(write_video(str(tmp_path / "v.mp4"), FRAME_LEVELS)), 3)]
        kinds = media.kinds([Video("v.mp4")])
        token_id = video_token_id
    else:
        generator = torch.Generator().manual_seed(1)
        items = [
            Image.fromarray(
                torch.randint(0, 256, (h, w, 3), generator=generator, dtype=torch.uint8).numpy()
            )
            for w, h in ONEVISION_CASES[case]
        ]
        kinds = media.kinds(items)
        token_id = IMAGE_TOKEN_ID
    counts = [len(ids) for ids in media.media_ids(kinds, [getattr(i, "size", None) for i in items])]
    ids = [1, 17]
    for count in counts:
        ids += [IMAGE_PLACEHOLDER_ID] * count + [18]
    ids = torch.tensor([ids + [25, 26]])
    pixels = media.pixels(items, kinds)
    their_ids = ids.masked_fill(ids == IMAGE_PLACEHOLDER_ID, token_id)
    if token_id == video_token_id:
        their_inputs = {"pixel_values_videos": pixels["pixel_values"][None]}
    else:
        views = [ours.anyres.medium_views(k, image.size) for k, image in zip(kinds, items)]
        padded = torch.zeros(len(items), max(views), *pixels["pixel_values"].shape[1:])
        for row, chunk in enumerate(pixels["pixel_values"].split(views)):
            padded[row, : chunk.shape[0]] = chunk
        their_inputs = {
            "pixel_values": padded,
            "image_sizes": pixels["image_sizes"],
            "batch_num_images": torch.tensor([len(items)]),
        }
    with torch.no_grad():
        our_logits = ours(input_ids=ids, **pixels).logits
        their_logits = theirs(input_ids=their_ids, **their_inputs).logits
    assert torch.allclose(our_logits, their_logits, atol=1e-5, rtol=1e-5)
