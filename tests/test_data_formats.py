"""Readers (LLaVA JSON/JSONL, OpenAI messages, local HF datasets) and bad-record handling."""

import json
import logging
import os
import pickle
import re

import pytest
from PIL import Image
from transformers import AutoTokenizer

from llava.constants import IMAGE_TOKEN
from llava.conversation import Turn
from llava.data.dataset import load_supervised_dataset
from llava.data.formats import BadRecordError, DatasetImage, detect_columns, load_records
from llava.data.images import load_image


def write_image(path: str, size=(20, 12), colour=(255, 0, 0)) -> str:
    Image.new("RGB", size, colour).save(path)
    return path


def llava_row(index: int, image=None, turns=None) -> dict:
    turns = turns or [("human", "What is this?\n<image>" if image else "Hi?"), ("gpt", "A cat.")]
    row = {"id": f"r{index}", "conversations": [{"from": f, "value": v} for f, v in turns]}
    if image is not None:
        row["image"] = image
    return row


def write_rows(folder: str, rows: list, name: str = "data.json") -> str:
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        if name.endswith(".jsonl"):
            f.writelines(json.dumps(row) + "\n" for row in rows)
        else:
            json.dump(rows, f)
    return path


@pytest.fixture
def image_folder(tmp_path) -> str:
    folder = tmp_path / "images"
    folder.mkdir()
    write_image(str(folder / "a.png"))
    write_image(str(folder / "b.png"), size=(8, 30), colour=(0, 0, 255))
    (folder / "broken.png").write_bytes(b"this is not an image")
    return str(folder)


# -- LLaVA JSON / JSONL ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["data.json", "data.jsonl"])
def test_llava_json_single_multi_and_text_only(tmp_path, image_folder, name):
    two = [("human", "<image> left, <image> right: same?"), ("gpt", "No.")]
    rows = [llava_row(0, "a.png"), llava_row(1, ["a.png", "b.png"], two), llava_row(2)]
    loaded = load_records(write_rows(str(tmp_path), rows, name), image_folder)
    single, multi, text = loaded.records
    assert single.turns == (Turn("user", "<image>\nWhat is this?"), Turn("assistant", "A cat."))
    assert single.images == (os.path.join(image_folder, "a.png"),)
    assert single.id == "r0" and single.index == 0 and single.source.endswith(name)
    assert multi.turns[0].text == "<image> left, <image> right: same?"  # positions kept
    assert len(multi.images) == 2 and text.images == () and text.turns[0].text == "Hi?"


def test_image_paths_default_to_the_file_folder(tmp_path):
    write_image(str(tmp_path / "c.png"))
    rows = [llava_row(0, "c.png", [("human", "Describe.<image>"), ("gpt", "Red.")])]
    (record,) = load_records(write_rows(str(tmp_path), rows)).records
    assert record.turns[0].text == "<image>\nDescribe."
    assert record.images == (str(tmp_path / "c.png"),)


def test_system_turn_and_leading_assistant_turn(tmp_path):
    turns = [("system", "Be brief."), ("gpt", "Hello!"), ("human", "Hi?"), ("gpt", "Yes.")]
    (record,) = load_records(write_rows(str(tmp_path), [llava_row(0, None, turns)])).records
    assert [t.role for t in record.turns] == ["system", "user", "assistant"]


# -- OpenAI messages ---------------------------------------------------------------------------
def messages_row(images_key="pics") -> dict:
    return {
        "msgs": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
            {"role": "user", "content": "And now?"},
            {"role": "assistant", "content": "Still a cat."},
        ],
        images_key: ["a.png"],
    }


def test_messages_with_named_fields(tmp_path, image_folder):
    path = write_rows(str(tmp_path), [messages_row()], "m.jsonl")
    (record,) = load_records(path, image_folder, text_field="msgs", image_field="pics").records
    assert record.turns[0] == Turn("user", "<image>\nWhat?")
    assert [t.text for t in record.turns[1:]] == ["A cat.", "And now?", "Still a cat."]
    assert record.images == (os.path.join(image_folder, "a.png"),)


def test_messages_found_automatically_with_inline_images(tmp_path, image_folder):
    row = {"messages": messages_row()["msgs"]}
    row["messages"][0]["content"][0] = {"type": "image", "image": "b.png"}
    (record,) = load_records(write_rows(str(tmp_path), [row], "m.json"), image_folder).records
    assert record.images == (os.path.join(image_folder, "b.png"),)


# -- local Hugging Face datasets ---------------------------------------------------------------
def test_saved_dataset_with_question_answer_columns_and_stored_images(tmp_path):
    datasets = pytest.importorskip("datasets")
    images = [Image.new("RGB", (10, 6), (0, 255, 0)), Image.new("L", (6, 6), 128)]
    table = datasets.Dataset.from_dict(
        {"image": images, "question": ["Colour?", "Shade?"], "answer": ["Green.", "Gray."]},
        features=datasets.Features(
            image=datasets.Image(),
            question=datasets.Value("string"),
            answer=datasets.Value("string"),
        ),
    )
    table.save_to_disk(str(tmp_path / "saved"))
    first, second = load_records(str(tmp_path / "saved")).records
    assert first.turns == (Turn("user", "<image>\nColour?"), Turn("assistant", "Green."))
    assert isinstance(first.images[0], DatasetImage)
    assert load_image(first.images[0]).getpixel((0, 0)) == (0, 255, 0)
    assert load_image(second.images[0]).mode == "RGB"
    revived = pickle.loads(pickle.dumps(first))  # as loader workers receive it
    assert load_image(revived.images[0]).getpixel((0, 0)) == (0, 255, 0)


def test_parquet_captions_become_stage_1_pairs(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features(
        images=datasets.Sequence(datasets.Image()), caption=datasets.Value("string")
    )
    rows = {"images": [[Image.new("RGB", (4, 4))], []], "caption": ["a black square", "no image"]}
    (tmp_path / "pq").mkdir()
    datasets.Dataset.from_dict(rows, features=features).to_parquet(
        str(tmp_path / "pq" / "0.parquet")
    )
    with_image, without = load_records(str(tmp_path / "pq")).records
    assert with_image.turns == (Turn("user", IMAGE_TOKEN), Turn("assistant", "a black square"))
    assert load_image(with_image.images[0]).size == (4, 4)
    assert without.images == () and without.turns[0].text == ""


def test_saved_dataset_in_trl_messages_layout(tmp_path):
    """llava-instruct-mix-vsft style: messages with {index, text, type} parts + images list."""
    datasets = pytest.importorskip("datasets")
    part = {
        "index": datasets.Value("int64"),
        "text": datasets.Value("string"),
        "type": datasets.Value("string"),
    }
    message = {"content": [part], "role": datasets.Value("string")}
    features = datasets.Features(messages=[message], images=datasets.Sequence(datasets.Image()))
    messages = [
        {
            "role": "user",
            "content": [
                {"index": 0, "text": None, "type": "image"},
                {"index": None, "text": "What?", "type": "text"},
            ],
        },
        {"role": "assistant", "content": [{"index": None, "text": "A cat.", "type": "text"}]},
    ]
    rows = {"messages": [messages], "images": [[Image.new("RGB", (5, 5), (9, 9, 9))]]}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "trl"))
    (record,) = load_records(str(tmp_path / "trl")).records
    assert record.turns == (Turn("user", "<image>\nWhat?"), Turn("assistant", "A cat."))
    assert load_image(record.images[0]).getpixel((2, 2)) == (9, 9, 9)


def test_unknown_columns_ask_for_the_flags():
    with pytest.raises(ValueError, match="--dataset_text_field"):
        detect_columns({"foo", "bar"}, None)
    with pytest.raises(ValueError, match="column 'txt' not found"):
        detect_columns({"foo"}, None, text_field="txt")


# -- bad records -----------------------------------------------------------------------------------
BAD_CASES = {
    "missing image": (llava_row(1, "missing.png"), "image file .*missing.png.* not found"),
    "more tags than images": (
        llava_row(1, "a.png", [("human", "<image> and <image>"), ("gpt", "Two.")]),
        "2 <image> tags but 1 images",
    ),
    "image without a tag": (
        llava_row(1, "a.png", [("human", "Describe."), ("gpt", "Red.")]),
        "1 images but no <image> tag in the text",
    ),
    "empty conversation": ({"id": "r1", "conversations": []}, "empty conversation"),
    "unknown role": (
        llava_row(1, None, [("human", "Hi"), ("robot", "Beep.")]),
        "unknown role 'robot'",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_record_error_names_file_and_index(tmp_path, image_folder, case):
    bad, reason = BAD_CASES[case]
    path = write_rows(str(tmp_path), [llava_row(0, "a.png"), bad, llava_row(2)])
    with pytest.raises(BadRecordError, match=r"data\.json record 1 \(id r1\): ") as error:
        load_records(path, image_folder)
    assert error.value.index == 1 and error.value.source == path
    assert re.search(reason, str(error.value))


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_record_skipped_and_counted(tmp_path, image_folder, tokenizer_paths, caplog, case):
    bad, _ = BAD_CASES[case]
    path = write_rows(str(tmp_path), [llava_row(0), bad, llava_row(2)])
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_paths["sp"])
    with caplog.at_level(logging.WARNING):
        dataset = load_supervised_dataset(
            path, tokenizer, "v1", 512, image_folder=image_folder, skip_bad_records=True
        )
    assert len(dataset) == 2 and dataset.summary.skipped_bad == 1
    assert "data.json record 1" in dataset.summary.reasons[0]
    assert "3 records -> 2 samples" in caplog.text and "skipped 1 bad records" in caplog.text


def test_invalid_jsonl_line_is_a_bad_record(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(llava_row(0)) + "\n{not json\n")
    with pytest.raises(BadRecordError, match="d.jsonl record 1: invalid JSON"):
        load_records(str(path))
    assert len(load_records(str(path), skip_bad_records=True).records) == 1
