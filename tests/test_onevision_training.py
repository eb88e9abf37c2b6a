"""OneVision on the composed model (--image_aspect_ratio anyres_max_N with --video_frames): a
stage-2 file of one-image, two-image, video and image-beside-video records through the data
pipeline (each medium seen as its record says, its tokens and views counted before decoding);
packed and padded batches of those samples give the same loss and gradients; a saved model
reloads with its video settings, and its export is a LlavaOnevisionForConditionalGeneration
folder whose processor prepares our pictures and tokens and whose logits are ours."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from llava.constants import IMAGE_PLACEHOLDER_ID
from llava.data.anyres_data import AnyResDataset
from llava.data.collator import SupervisedCollator
from llava.data.dataset import load_supervised_dataset
from llava.data.media import TILED, VIDEO, WHOLE
from llava.data.packing import PackingCollator
from llava.model.builder import build_llava_model, load_tokenizer
from llava.model.llava import PACKED_SDPA, register_packed_attention
from tests.fixtures.datasets import write_onevision_dataset
from tests.test_packing import loss_and_grads

PINPOINTS = "(1x1),...,(2x2)"  # 32 px tiles: 32x32 to 64x64
ASPECT = "anyres_max_1"  # OneVision's cap at one tile's features: it shrinks the bigger grids
FRAMES = 3


@pytest.fixture(scope="module")
def onevision_model(training_assets):
    register_packed_attention()
    torch.manual_seed(0)
    model = build_llava_model(
        training_assets["llm"],
        training_assets["clip"],
        image_aspect_ratio=ASPECT,
        image_grid_pinpoints=PINPOINTS,
        mm_patch_merge_type="spatial_unpad",
        video_frames=FRAMES,
    )
    model.language_model.requires_grad_(True)
    return model.train()


@pytest.fixture(scope="module")
def dataset(training_assets, onevision_model, tmp_path_factory) -> AnyResDataset:
    path = write_onevision_dataset(str(tmp_path_factory.mktemp("onevision")), training_assets)
    dataset = load_supervised_dataset(
        path,
        load_tokenizer(training_assets["llm"]),
        "v1",
        2048,
        image_processor=onevision_model.vision_tower.image_processor,
        image_aspect_ratio=ASPECT,
        anyres=onevision_model.anyres,
    )
    assert isinstance(dataset, AnyResDataset)
    return dataset


def index_of(dataset, record_id: str) -> int:
    return next(i for i, (record, _) in enumerate(dataset.samples) if record.id == record_id)


@pytest.mark.parametrize(
    "record_id, kinds",
    [
        ("conv0", [TILED]),
        ("pair0", [WHOLE, WHOLE]),
        ("video0", [VIDEO]),
        ("image-and-video", [TILED, VIDEO]),
        ("text0", []),
    ],
)
def test_each_medium_is_seen_as_its_record_says(dataset, onevision_model, record_id, kinds):
    anyres = onevision_model.anyres
    i = index_of(dataset, record_id)
    sample = dataset[i]
    assert len(sample["input_ids"]) == dataset.lengths[i]  # counted before decoding
    if not kinds:
        assert sample["pixel_values"] is None
        return
    assert sample["media_kinds"].tolist() == kinds
    sizes = [(w, h) for h, w in sample["image_sizes"].tolist()]
    tokens = sum(anyres.medium_tokens(kind, size) for kind, size in zip(kinds, sizes))
    views = sum(anyres.medium_views(kind, size) for kind, size in zip(kinds, sizes))
    assert int((sample["input_ids"] == IMAGE_PLACEHOLDER_ID).sum()) == tokens
    assert sample["pixel_values"].shape == (views, 3, 32, 32)
    if WHOLE in kinds:
        assert tokens == 2 * (16 + 1)  # CLIP 32 px, patch 8: 16 features, then a newline
    if VIDEO in kinds:
        assert anyres.medium_tokens(VIDEO, None) == FRAMES * 2 * 2 + 1  # frames pooled by 2


@pytest.mark.parametrize(
    "layout",
    [("rows", dict(), "sdpa"), ("flat", dict(flatten=True), PACKED_SDPA)],
    ids=lambda layout: layout[0],
)
def test_packed_and_padded_onevision_batches_give_the_same_loss_and_gradients(
    dataset, onevision_model, layout
):
    _, options, attention = layout
    ids = ["conv0", "pair0", "video0", "image-and-video", "text0", "pair1"]
    samples = [dataset[index_of(dataset, record_id)] for record_id in ids]
    padded_loss, padded_grads = loss_and_grads(
        onevision_model, SupervisedCollator(pad_token_id=0)(samples)
    )
    packed_loss, packed_grads = loss_and_grads(
        onevision_model, PackingCollator(pad_token_id=0, **options)(samples), attention
    )
    assert packed_loss.item() == pytest.approx(padded_loss.item(), rel=1e-5)
    assert packed_grads.keys() == padded_grads.keys()
    assert "projector.image_newline" in padded_grads  # whole images and videos end with it
    for name, grad in padded_grads.items():
        assert torch.allclose(packed_grads[name], grad, atol=1e-5, rtol=1e-4), name


def test_media_that_disagree_with_their_kinds_are_named(dataset, onevision_model):
    sample = dataset[index_of(dataset, "pair0")]
    batch = SupervisedCollator(pad_token_id=0)([sample])
    batch["media_kinds"] = torch.tensor([TILED, TILED])
    with pytest.raises(ValueError, match="views; the media's kinds"):
        onevision_model(**batch)


def test_export_writes_a_llava_onevision_folder_with_the_same_logits(
    onevision_model, training_assets, dataset, tmp_path
):
    from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

    from llava.export_hf import export
    from llava.model.builder import load_pretrained_model

    onevision_model.save_pretrained(tmp_path / "model")
    load_tokenizer(training_assets["llm"]).save_pretrained(tmp_path / "model")
    loaded = load_pretrained_model(str(tmp_path / "model"))
    assert loaded.model.anyres == onevision_model.anyres  # video settings included
    export(str(tmp_path / "model"), str(tmp_path / "hf"))
    theirs = LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    i = index_of(dataset, "pair0")
    sample = dataset[i]
    images = [Image.open(path).convert("RGB") for path in dataset.samples[i][0].images]
    inputs = processor(
        text=["<image>\n<image>\nSame colour?"], images=[images], return_tensors="pt"
    )
    assert torch.equal(inputs["pixel_values"][:, 0], sample["pixel_values"])  # each one whole
    image_token_id = theirs.config.image_token_id
    ours_ids = inputs["input_ids"].masked_fill(
        inputs["input_ids"] == image_token_id, IMAGE_PLACEHOLDER_ID
    )
    onevision_model.eval()
    with torch.no_grad():
        our_logits = onevision_model(
            input_ids=ours_ids,
            pixel_values=sample["pixel_values"],
            image_sizes=sample["image_sizes"],
            media_kinds=sample["media_kinds"],
        ).logits
        their_logits = theirs(**inputs).logits
    onevision_model.train()
    assert torch.allclose(our_logits, their_logits, atol=1e-5, rtol=1e-5)
