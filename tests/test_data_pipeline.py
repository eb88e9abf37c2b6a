"""Dataset -> sampler -> collator: lazy lengths, drops counted, padding, stacked pixels."""

from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, CLIPImageProcessor

from llava.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID
from llava.data.collator import SupervisedCollator, pad_token_id_of
from llava.data.dataset import build_supervised_data, load_supervised_dataset
from llava.data.formats import BadRecordError
from llava.data.sampler import build_train_sampler
from tests.test_data_formats import llava_row, write_image, write_rows

NUM_IMAGE_TOKENS = 16


@pytest.fixture
def processor() -> CLIPImageProcessor:
    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


@pytest.fixture
def tokenizer(tokenizer_paths):
    return AutoTokenizer.from_pretrained(tokenizer_paths["sp"])


@pytest.fixture
def data(tmp_path) -> SimpleNamespace:
    folder = tmp_path / "images"
    folder.mkdir()
    write_image(str(folder / "a.png"))
    write_image(str(folder / "b.png"), size=(8, 30))
    two = [
        ("human", "<image> and <image>: same?"),
        ("gpt", "No."),
        ("human", "Sure?"),
        ("gpt", "Yes."),
    ]
    rows = [
        llava_row(0, "a.png"),
        llava_row(1),
        llava_row(2, ["a.png", "b.png"], two),
        llava_row(3),
    ]
    return SimpleNamespace(
        data_path=write_rows(str(tmp_path), rows),
        image_folder=str(folder),
        image_aspect_ratio="pad",
        dataset_text_field=None,
        dataset_image_field=None,
        skip_bad_records=False,
    )


def test_build_supervised_data_end_to_end(tokenizer, processor, data):
    dataset, collator = build_supervised_data(
        tokenizer, processor, NUM_IMAGE_TOKENS, data, "v1", 512
    )
    assert dataset.modalities == ["image", "text", "image", "text"]
    assert dataset.modality_lengths[1] < 0 < dataset.modality_lengths[0]
    for i in range(len(dataset)):  # lengths known up front are the true lengths
        sample = dataset[i]
        assert len(sample["input_ids"]) == dataset.lengths[i]
        placeholders = (sample["input_ids"] == IMAGE_PLACEHOLDER_ID).sum().item()
        num_images = 0 if sample["pixel_values"] is None else sample["pixel_values"].shape[0]
        assert placeholders == NUM_IMAGE_TOKENS * num_images
    assert dataset[2]["pixel_values"].shape == (2, 3, 32, 32)
    sampler = build_train_sampler(dataset, 2, group_by_modality_length=True)
    loader = DataLoader(dataset, batch_size=2, sampler=sampler, collate_fn=collator)
    batches = list(loader)
    assert len(batches) == 2
    for batch in batches:
        images = batch.get("pixel_values")
        runs = (batch["input_ids"] == IMAGE_PLACEHOLDER_ID).sum().item() // NUM_IMAGE_TOKENS
        assert (0 if images is None else images.shape[0]) == runs


def test_dropped_and_shortened_samples_are_counted(tokenizer, processor, tmp_path, caplog):
    long_answer = " ".join(["word"] * 200)
    rows = [
        llava_row(0, None, [("human", "Hi?")]),  # nothing to learn
        llava_row(1, None, [("human", "Hi?"), ("gpt", long_answer)]),  # first answer too long
        llava_row(
            2,
            None,
            [("human", "Hi?"), ("gpt", "Yes."), ("human", "Tell me."), ("gpt", long_answer)],
        ),
        llava_row(3),
    ]
    dataset = load_supervised_dataset(write_rows(str(tmp_path), rows), tokenizer, "v1", 100)
    summary = dataset.summary
    assert (summary.dropped_no_supervision, summary.dropped_too_long, summary.shortened) == (
        1,
        1,
        1,
    )
    assert len(dataset) == 2 and max(dataset.lengths) <= 100
    labels = dataset[0]["labels"]
    assert (labels != IGNORE_INDEX).any()
    assert "dropped 1 longer than model_max_length" in caplog.text


def test_unreadable_image_fails_or_is_replaced(tokenizer, processor, data, tmp_path):
    (tmp_path / "images" / "broken.png").write_bytes(b"not an image")
    rows = [llava_row(0, "a.png"), llava_row(1, "broken.png"), llava_row(2)]
    path = write_rows(str(tmp_path), rows)
    dataset = load_supervised_dataset(
        path, tokenizer, "v1", 512, processor, NUM_IMAGE_TOKENS, data.image_folder
    )
    with pytest.raises(BadRecordError, match=r"data\.json record 1 \(id r1\): unreadable image"):
        dataset[1]
    skipping = load_supervised_dataset(
        path,
        tokenizer,
        "v1",
        512,
        processor,
        NUM_IMAGE_TOKENS,
        data.image_folder,
        skip_bad_records=True,
    )
    replacement = skipping[1]  # the next good sample of the same modality
    assert replacement["pixel_values"].shape == (1, 3, 32, 32)
    assert torch.equal(replacement["input_ids"], skipping[0]["input_ids"])
    assert skipping.summary.replaced_when_decoding == 1


def test_images_without_a_processor_fail_clearly(tokenizer, data):
    with pytest.raises(ValueError, match="has images but no image processor"):
        load_supervised_dataset(
            data.data_path, tokenizer, "v1", 512, image_folder=data.image_folder
        )


def samples():
    pixels = torch.arange(3 * 3 * 2 * 2, dtype=torch.float).reshape(3, 3, 2, 2)
    return [
        {
            "input_ids": torch.tensor([1, 5, 6]),
            "labels": torch.tensor([-100, 5, 6]),
            "pixel_values": pixels[:2],
        },
        {
            "input_ids": torch.tensor([1, 7]),
            "labels": torch.tensor([-100, 7]),
            "pixel_values": None,
        },
        {
            "input_ids": torch.tensor([1, 8, 9, 10]),
            "labels": torch.tensor([-100, -100, 9, 10]),
            "pixel_values": pixels[2:],
        },
    ], pixels


def test_collator_pads_right_with_masks_and_stacks_pixels_in_sample_order():
    batch_samples, pixels = samples()
    batch = SupervisedCollator(pad_token_id=0)(batch_samples)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 0], [1, 7, 0, 0], [1, 8, 9, 10]]
    assert batch["labels"].tolist() == [
        [-100, 5, 6, -100],
        [-100, 7, -100, -100],
        [-100, -100, 9, 10],
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert torch.equal(
        batch["pixel_values"], pixels
    )  # (3, 3, 2, 2): sample 0's two, then sample 2's


def test_collator_left_padding_multiple_of_and_text_only_batches():
    batch_samples, _ = samples()
    batch = SupervisedCollator(pad_token_id=2, padding_side="left", pad_to_multiple_of=8)(
        batch_samples[:2]
    )
    assert batch["input_ids"].tolist() == [[2] * 5 + [1, 5, 6], [2] * 6 + [1, 7]]
    assert batch["attention_mask"].tolist() == [[0] * 5 + [1] * 3, [0] * 6 + [1] * 2]
    text_only = SupervisedCollator(pad_token_id=0)([batch_samples[1]])
    assert "pixel_values" not in text_only


def test_pad_token_falls_back_to_unk_for_llama(tokenizer, tokenizer_paths):
    assert tokenizer.pad_token_id is None
    assert pad_token_id_of(tokenizer) == tokenizer.unk_token_id
    qwen = AutoTokenizer.from_pretrained(tokenizer_paths["bpe_qwen2"])
    assert pad_token_id_of(qwen) == qwen.convert_tokens_to_ids("<|endoftext|>")
