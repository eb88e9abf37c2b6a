"""AnyRes on the composed model: each image's placeholders from its size (read before decoding),
its base image and tiles as pixels, the model packing them with a learned newline; packed and
padded batches of samples with different token counts give the same loss and gradients."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from llava.constants import IMAGE_PLACEHOLDER_ID
from llava.data.anyres_data import AnyResDataset
from llava.data.collator import SupervisedCollator
from llava.data.dataset import load_supervised_dataset
from llava.data.packing import PackingCollator
from llava.model.builder import build_llava_model, load_tokenizer
from llava.model.llava import ANYRES_NEWLINE, PACKED_SDPA, register_packed_attention
from tests.test_packing import loss_and_grads

PINPOINTS = "(1x1),...,(2x2)"  # 32 px tiles: 32x32 to 64x64


@pytest.fixture(scope="module")
def anyres_model(training_assets):
    register_packed_attention()
    torch.manual_seed(0)
    model = build_llava_model(
        training_assets["llm"],
        training_assets["clip"],
        image_aspect_ratio="anyres",
        image_grid_pinpoints=PINPOINTS,
        mm_patch_merge_type="spatial_unpad",
    )
    model.language_model.requires_grad_(True)
    return model.train()


@pytest.fixture(scope="module")
def dataset(training_assets, anyres_model) -> AnyResDataset:
    tokenizer = load_tokenizer(training_assets["llm"])
    dataset = load_supervised_dataset(
        training_assets["finetune"],
        tokenizer,
        "v1",
        2048,
        image_processor=anyres_model.vision_tower.image_processor,
        image_folder=training_assets["image_folder"],
        image_aspect_ratio="anyres",
        anyres=anyres_model.anyres,
    )
    assert isinstance(dataset, AnyResDataset)
    return dataset


def image_sizes(dataset, i: int) -> list[tuple[int, int]]:
    record, num_images = dataset.samples[i]
    return [Image.open(source).size for source in record.images[:num_images]]


def test_each_images_tokens_and_tiles_follow_its_size(dataset, anyres_model):
    anyres = anyres_model.anyres
    counts = set()
    for i in range(len(dataset)):
        sample = dataset[i]
        sizes = image_sizes(dataset, i)
        assert len(sample["input_ids"]) == dataset.lengths[i]  # known before decoding
        placeholders = int((sample["input_ids"] == IMAGE_PLACEHOLDER_ID).sum())
        assert placeholders == sum(anyres.num_image_tokens(size) for size in sizes)
        if not sizes:
            assert sample["pixel_values"] is None and "image_sizes" not in sample
            continue
        tiles = sum(1 + rows * columns for rows, columns in (anyres.layout(s).tiles for s in sizes))
        assert sample["pixel_values"].shape == (tiles, 3, 32, 32)
        assert sample["image_sizes"].tolist() == [[h, w] for w, h in sizes]
        counts.add(placeholders)
    assert len(counts) > 1  # the shapes' three sizes give different counts


def test_a_padded_batch_trains_the_projector_and_the_newline(dataset, anyres_model):
    batch = SupervisedCollator(pad_token_id=0)([dataset[i] for i in range(6)])
    assert batch["image_sizes"].shape[0] == sum(1 for i in range(6) if image_sizes(dataset, i))
    loss, grads = loss_and_grads(anyres_model, batch)
    assert torch.isfinite(loss)
    assert grads[f"projector.{ANYRES_NEWLINE}"].abs().sum() > 0
    assert grads["projector.0.weight"].abs().sum() > 0


@pytest.mark.parametrize(
    "layout",
    [("rows", dict(), "sdpa"), ("flat", dict(flatten=True), PACKED_SDPA)],
    ids=lambda layout: layout[0],
)
def test_packed_and_padded_anyres_batches_give_the_same_loss_and_gradients(
    dataset, anyres_model, layout
):
    _, options, attention = layout
    samples = [dataset[i] for i in range(6)]
    padded_loss, padded_grads = loss_and_grads(
        anyres_model, SupervisedCollator(pad_token_id=0)(samples)
    )
    packed_loss, packed_grads = loss_and_grads(
        anyres_model, PackingCollator(pad_token_id=0, **options)(samples), attention
    )
    assert packed_loss.item() == pytest.approx(padded_loss.item(), rel=1e-5)
    assert packed_grads.keys() == padded_grads.keys()
    for name, grad in padded_grads.items():
        assert torch.allclose(packed_grads[name], grad, atol=1e-5, rtol=1e-4), name


def test_tiles_and_sizes_that_disagree_are_named(dataset, anyres_model):
    batch = SupervisedCollator(pad_token_id=0)([dataset[0]])
    with pytest.raises(ValueError, match="anyres pixel_values need image_sizes"):
        anyres_model(**{k: v for k, v in batch.items() if k != "image_sizes"})
    batch["pixel_values"] = batch["pixel_values"][:-1]
    with pytest.raises(ValueError, match=r"anyres pixel_values hold \d+ views; the media's kinds"):
        anyres_model(**batch)


def test_a_text_only_batch_still_reaches_the_newline(dataset, anyres_model):
    """ZeRO-3 would step a trainable part left out of a backward with its old gradient."""
    text_only = [i for i in range(len(dataset)) if not image_sizes(dataset, i)][:2]
    batch = SupervisedCollator(pad_token_id=0)([dataset[i] for i in text_only])
    _, grads = loss_and_grads(anyres_model, batch)
    assert f"projector.{ANYRES_NEWLINE}" in grads


def test_anyres_settings_that_cannot_work_are_named(training_assets):
    with pytest.raises(ValueError, match="needs --image_grid_pinpoints"):
        build_llava_model(
            training_assets["llm"], training_assets["clip"], image_aspect_ratio="anyres"
        )
    with pytest.raises(ValueError, match="takes a projector without a token reduction"):
        build_llava_model(
            training_assets["llm"],
            training_assets["clip"],
            "spatial_pool2+mlp2x_gelu",
            image_aspect_ratio="anyres",
            image_grid_pinpoints=PINPOINTS,
        )


def test_a_saved_anyres_model_reloads_and_answers_a_batch_as_each_prompt_alone(
    dataset, anyres_model, training_assets, tmp_path
):
    """Save, reload (the config keeps the pinpoints and merge; the newline comes back), and a
    left-padded batch of questions about images of three sizes answers as each alone."""
    from llava.inference import answerer_for, sampling_kwargs
    from llava.model.builder import load_pretrained_model

    anyres_model.save_pretrained(tmp_path)
    load_tokenizer(training_assets["llm"]).save_pretrained(tmp_path)
    loaded = load_pretrained_model(str(tmp_path))
    assert loaded.model.anyres == anyres_model.anyres
    batch = SupervisedCollator(pad_token_id=0)([dataset[i] for i in range(3)])
    anyres_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**batch).loss, anyres_model(**batch).loss)
    anyres_model.train()
    answerer = answerer_for(loaded)
    sources = [
        dataset.samples[i][0].images[0] for i in range(len(dataset)) if image_sizes(dataset, i)
    ]
    by_size = {Image.open(s).size: s for s in sources}
    assert len(by_size) == 3
    questions = ["What colour is it?", "Colour?", "Which colour is the square in the image?"]
    prompts = [answerer.question_prompt(q, [s]) for q, s in zip(questions, by_size.values())]
    greedy = sampling_kwargs(0.0, None, 1, 4)
    together = answerer.generate(prompts, **greedy)
    alone = [answerer.generate([prompt], **greedy)[0] for prompt in prompts]
    assert together == alone


def test_export_writes_a_llava_next_folder_with_the_same_logits(
    anyres_model, training_assets, dataset, tmp_path
):
    """export_hf of an anyres model: LlavaNextForConditionalGeneration and its processor, which
    plain transformers opens; its processor's tiles and image tokens and its logits are ours."""
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    from llava.export_hf import export

    anyres_model.save_pretrained(tmp_path / "model")
    load_tokenizer(training_assets["llm"]).save_pretrained(tmp_path / "model")
    export(str(tmp_path / "model"), str(tmp_path / "hf"))
    theirs = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    i = next(i for i in range(len(dataset)) if image_sizes(dataset, i))
    sample = dataset[i]
    image = Image.open(dataset.samples[i][0].images[0]).convert("RGB")
    inputs = processor(
        text=["<image>\nWhat colour is the square?"], images=[image], return_tensors="pt"
    )
    assert torch.equal(inputs["pixel_values"][0], sample["pixel_values"])
    assert inputs["image_sizes"].tolist() == sample["image_sizes"].tolist()
    image_token_id = theirs.config.image_token_id
    ours_ids = inputs["input_ids"].masked_fill(
        inputs["input_ids"] == image_token_id, IMAGE_PLACEHOLDER_ID
    )
    anyres_model.eval()
    with torch.no_grad():
        our_logits = anyres_model(
            input_ids=ours_ids,
            pixel_values=sample["pixel_values"],
            image_sizes=sample["image_sizes"],
        ).logits
        their_logits = theirs(**inputs).logits
    anyres_model.train()
    assert torch.allclose(our_logits, their_logits, atol=1e-5, rtol=1e-5)


def test_the_training_entry_trains_anyres_in_process(training_assets, tmp_path):
    """The flags reach the model and the data: a short stage 2 in one process, the loss finite,
    the saved config holding the pinpoints and merge; static shapes are refused by name."""
    from llava.train.arguments import parse_arguments
    from llava.train.train import train
    from tests.fixtures.training import training_flags

    flags = training_flags(
        training_assets, tmp_path / "out",
        "--version", "v1", "--data_path", training_assets["finetune"],
        "--image_aspect_ratio", "anyres", "--image_grid_pinpoints", PINPOINTS,
        "--mm_patch_merge_type", "spatial_unpad",
    )  # fmt: skip
    trainer = train(*parse_arguments(flags))
    assert trainer.model.anyres is not None
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 3 and all(loss == loss for loss in losses)
    with pytest.raises(ValueError, match="static shapes are not implemented with"):
        flags[flags.index("--output_dir") + 1] = str(tmp_path / "buckets")
        train(*parse_arguments([*flags, "--num_length_buckets", "4"]))
