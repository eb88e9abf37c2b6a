"""OneVision's media on the data side: videos read with PyAV and sampled uniformly, video records
in LLaVA JSON, and the per-medium token counts and pictures of an anyres_max_N model (an image of
a one-image sample tiled, the images of a several-image sample whole, a video's pooled frames)
equal to transformers' LlavaOnevisionProcessor's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from llava.constants import IMAGE_TOKEN
from llava.data.anyres_data import AnyResMedia
from llava.data.formats import BadRecordError, load_records
from llava.data.media import TILED, VIDEO, WHOLE, ImageGeometry, anyres_of
from llava.data.video import Video, frame_indices, read_frames
from tests.fixtures.datasets import write_video

TILE = 32  # the tiny towers' image size; patch 8: a 4 x 4 grid a tile
FRAME_LEVELS = [0, 40, 80, 120, 160, 200, 240]  # frame k is one grey level


def test_frames_are_sampled_evenly_from_first_to_last(tmp_path):
    path = write_video(str(tmp_path / "v.mp4"), FRAME_LEVELS)
    frames = read_frames(Video(path), 4)
    assert frame_indices(7, 4) == [0, 2, 4, 6]
    levels = [round(float(np.asarray(frame).mean())) for frame in frames]
    assert levels == pytest.approx([0, 80, 160, 240], abs=6)
    assert all(frame.mode == "RGB" and frame.size == (48, 40) for frame in frames)
    assert frame_indices(2, 4) == [0, 0, 0, 1]  # a short video repeats frames


def test_unreadable_videos_are_named(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        read_frames(Video(str(tmp_path / "missing.mp4")), 4)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all" * 10)
    with pytest.raises(ValueError, match="broken.mp4"):
        read_frames(Video(str(broken)), 4)


def write_records(folder, records) -> str:
    for name in ("a.png", "b.png"):
        Image.new("RGB", (40, 30)).save(folder / name)
    write_video(str(folder / "v.mp4"), FRAME_LEVELS)
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return str(path)


def test_video_records_keep_their_media_in_tag_order(tmp_path):
    records = [
        {
            "id": "mixed",
            "image": ["a.png", "b.png"],
            "video": "v.mp4",
            "conversations": [
                {"from": "human", "value": "<image> then <video> then <image>?"},
                {"from": "gpt", "value": "yes"},
            ],
        },
        {  # LLaVA-Video's records: the video tagged <image>
            "id": "llava-video",
            "video": "v.mp4",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat happens?"},
                {"from": "gpt", "value": "nothing"},
            ],
        },
    ]
    loaded = load_records(write_records(tmp_path, records))
    mixed, llava_video = loaded.records
    assert [type(m).__name__ for m in mixed.images] == ["str", "Video", "str"]
    assert mixed.images[0].endswith("a.png") and mixed.images[2].endswith("b.png")
    assert mixed.turns[0].text == f"{IMAGE_TOKEN} then {IMAGE_TOKEN} then {IMAGE_TOKEN}?"
    assert llava_video.images == (Video(str(tmp_path / "v.mp4")),)


@pytest.mark.parametrize(
    "record, reason",
    [
        ({"video": "v.mp4", "image": "a.png", "text": "<image>"}, "0 <video> tags but 1 videos"),
        ({"video": ["v.mp4", "v.mp4"], "text": "<video>"}, "1 <video> tags but 2 videos"),
        ({"text": "<video> hi"}, "1 <video> tags but 0 videos"),
        ({"video": "gone.mp4", "text": "<video>"}, "video file .*gone.mp4.* not found"),
    ],
)
def test_video_tag_mismatches_name_the_record(tmp_path, record, reason):
    conversation = [{"from": "human", "value": record.pop("text")}, {"from": "gpt", "value": "a"}]
    path = write_records(tmp_path, [{"id": "bad", **record, "conversations": conversation}])
    with pytest.raises(BadRecordError, match=f"record 0 \\(id bad\\): {reason}"):
        load_records(path)


# -- against transformers' LlavaOnevisionProcessor -------------------------------------------
@pytest.fixture(scope="module")
def onevision(tiny_vlm_paths):
    """Our OneVision media (SigLIP-like tile: 32 px, patch 8, no CLS) and transformers'
    processor over the same pinpoints, tile and normalisation."""
    from transformers import (
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    if "llava_next" not in tiny_vlm_paths:
        pytest.skip("llava_next is not built on this transformers line")
    tokenizer = AutoTokenizer.from_pretrained(tiny_vlm_paths["llava_next"])
    tokenizer.add_tokens(["<video>"], special_tokens=True)
    tile = ImageGeometry((TILE, TILE), 8, has_cls_token=False)
    anyres = anyres_of("anyres_max_4", "(1x1),...,(3x3)", "spatial_unpad", tile, video_frames=4)
    image_processor = LlavaOnevisionImageProcessor(
        size={"height": TILE, "width": TILE},
        image_grid_pinpoints=[list(p) for p in anyres.pinpoints],
    )
    processor = LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(size={"height": TILE, "width": TILE}),
        num_image_tokens=16,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_4",
    )
    return AnyResMedia(anyres, image_processor, lambda n: [0] * n), processor


def random_image(size: tuple[int, int], seed: int) -> Image.Image:
    generator = np.random.default_rng(seed)
    width, height = size
    return Image.fromarray(generator.integers(0, 256, (height, width, 3), dtype=np.uint8))


def tokens_of(processor, token: str, inputs) -> int:
    return int((inputs["input_ids"] == processor.tokenizer.convert_tokens_to_ids(token)).sum())


@pytest.mark.parametrize(
    "sizes", [[(97, 61)], [(97, 61), (30, 100)], [(64, 64), (40, 30), (13, 7)]]
)
def test_image_counts_and_pictures_equal_the_onevision_processor(sizes, onevision):
    media, processor = onevision
    images = [random_image(size, seed) for seed, size in enumerate(sizes)]
    kinds = media.kinds(images)
    assert kinds == ([TILED] if len(images) == 1 else [WHOLE] * len(images))
    inputs = processor(
        text=[IMAGE_TOKEN * len(images)], images=[images], return_tensors="pt"
    )  # one sample of these images
    ours = [len(ids) for ids in media.media_ids(kinds, [image.size for image in images])]
    assert sum(ours) == tokens_of(processor, IMAGE_TOKEN, inputs)
    if len(images) > 1:
        assert ours == [16 + 1] * len(images)  # a whole tile, then a newline
    pixels = media.pixels(images, kinds)
    views = [media.anyres.medium_views(kind, image.size) for kind, image in zip(kinds, images)]
    theirs = torch.cat([v[:n] for v, n in zip(inputs["pixel_values"], views)])
    assert torch.equal(pixels["pixel_values"], theirs)
    assert pixels["image_sizes"].tolist() == inputs["image_sizes"].tolist()
    assert pixels["media_kinds"].tolist() == kinds


def test_video_counts_and_frames_equal_the_onevision_processor(tmp_path, onevision):
    media, processor = onevision
    frames = read_frames(Video(write_video(str(tmp_path / "v.mp4"), FRAME_LEVELS)), 4)
    inputs = processor(text=["<video>"], videos=[frames], return_tensors="pt")
    kinds = media.kinds([Video("v.mp4")])
    assert kinds == [VIDEO]
    (ids,) = media.media_ids(kinds, [None])
    assert len(ids) == 4 * 2 * 2 + 1 == tokens_of(processor, "<video>", inputs)
    pixels = media.pixels([frames], kinds)
    assert torch.equal(pixels["pixel_values"], inputs["pixel_values_videos"][0])


def test_an_image_beside_a_video_is_tiled(onevision):
    media, _ = onevision
    assert media.kinds([Video("v.mp4"), random_image((40, 30), 0)]) == [VIDEO, TILED]
    no_video = anyres_of("anyres", "(1x1),...,(2x2)", "spatial_unpad", media.anyres.tile)
    with pytest.raises(ValueError, match="takes no videos .*--video_frames"):
        no_video.media_kinds([True])
    assert no_video.media_kinds([False, False]) == [TILED, TILED]  # LLaVA-NeXT tiles them all
