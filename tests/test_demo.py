"""The embedded demo: its dataset writer (fast) and a shortened run of scripts/demo.sh (slow)."""

from __future__ import annotations

import functools
import json
import os
import subprocess

import pytest
from PIL import Image

from llava.model.builder import checkpoint_kind
from playground.digits.data import (
    PAIR_CATEGORY,
    PAIR_QUESTION,
    QUESTIONS,
    answer,
    caption,
    compare,
    write_dataset,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CATEGORY_OF_QUESTION = {question: category for category, (question, _) in QUESTIONS.items()}


def read_json(path) -> list[dict]:
    with open(path) as f:
        return json.load(f)


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@functools.cache
def labels() -> list[int]:
    from sklearn.datasets import load_digits

    return load_digits().target.tolist()


def digit_of(image: str) -> int:
    """The label of images/<split>/NNNN.png, NNNN being the scan's index in load_digits()."""
    return labels()[int(os.path.basename(image)[:4])]


def test_answer_words():
    assert caption(7) == "a handwritten seven"
    assert [answer("digit", d) for d in (0, 7, 9)] == ["zero", "seven", "nine"]
    assert [answer("parity", d) for d in (0, 3, 8)] == ["even", "odd", "even"]
    assert [answer("plus_one", d) for d in (0, 4, 9)] == ["one", "five", "ten"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("digits"))
    counts = write_dataset(out)
    assert counts == {
        "pretrain.json": 1437,
        # a chat and a two-image question per training image, 5% text-only rows, and 1,000
        # text-only comparisons
        "finetune.json": 1437 + 1437 + 72 + 1000,
        "test_questions.jsonl": 4 * 360,
        "test_annotations.jsonl": 4 * 360,
    }
    return out


def test_no_test_image_is_in_training(dataset):
    pretrain = read_json(os.path.join(dataset, "pretrain.json"))
    finetune = read_json(os.path.join(dataset, "finetune.json"))
    questions = read_jsonl(os.path.join(dataset, "test_questions.jsonl"))
    train_images = {r["image"] for r in pretrain}
    for record in finetune:
        train_images |= set(images_of(record))
    test_images = {image for q in questions for image in images_of(q)}
    assert len(train_images) == 1437 and len(test_images) == 360
    train_scans = {os.path.basename(image) for image in train_images}
    assert not train_scans & {os.path.basename(image) for image in test_images}
    for image in sorted(train_images)[:5] + sorted(test_images)[:5]:
        assert Image.open(os.path.join(dataset, image)).size == (32, 32)
    assert {digit_of(image) for image in test_images} == set(range(10))


def images_of(row: dict) -> list[str]:
    image = row.get("image", [])
    return [image] if isinstance(image, str) else image


def test_captions_and_answers_match_the_labels(dataset):
    for record in read_json(os.path.join(dataset, "pretrain.json"))[:20]:
        assert record["conversations"][1]["value"] == caption(digit_of(record["image"]))
    finetune = read_json(os.path.join(dataset, "finetune.json"))
    chats = [r for r in finetune if isinstance(r.get("image"), str)]
    for record in chats[:20]:
        turns = record["conversations"]
        assert turns[0]["value"].startswith("<image>\n")
        assert sum("<image>" in turn["value"] for turn in turns) == 1
        for human, gpt in zip(turns[::2], turns[1::2]):
            category = CATEGORY_OF_QUESTION[human["value"].removeprefix("<image>\n")]
            assert gpt["value"] == answer(category, digit_of(record["image"]))
    questions = read_jsonl(os.path.join(dataset, "test_questions.jsonl"))
    annotations = read_jsonl(os.path.join(dataset, "test_annotations.jsonl"))
    for question, annotation in list(zip(questions, annotations))[:30]:
        assert question["question_id"] == annotation["question_id"]
        assert annotation["digit"] == digit_of(question["image"])
        assert annotation["answer"] == answer(annotation["category"], annotation["digit"])
        assert CATEGORY_OF_QUESTION[question["text"]] == annotation["category"]


def test_two_image_questions_compare_both_digits(dataset):
    pairs = [r for r in read_json(os.path.join(dataset, "finetune.json")) if "pair" in r["id"]]
    assert len(pairs) == 1437
    assert len({record["image"][0] for record in pairs}) == 1437  # each image first once
    for record in pairs:
        first, second = (digit_of(image) for image in record["image"])
        human, gpt = record["conversations"]
        assert human["value"] == f"<image>\n<image>\n{PAIR_QUESTION}"
        assert gpt["value"] == compare(first, second)
    assert compare(7, 3) == "seven and three, so yes"
    assert compare(3, 7) == "three and seven, so no" and compare(5, 5) == "five and five, so no"
    verdicts = [record["conversations"][1]["value"].endswith("yes") for record in pairs]
    assert 0.35 < sum(verdicts) / len(verdicts) < 0.55  # neither verdict alone is mostly right
    questions = read_jsonl(os.path.join(dataset, "test_questions.jsonl"))
    annotations = read_jsonl(os.path.join(dataset, "test_annotations.jsonl"))
    compared = [(q, a) for q, a in zip(questions, annotations) if a["category"] == PAIR_CATEGORY]
    assert len(compared) == 360
    for question, annotation in compared:
        assert question["text"] == PAIR_QUESTION and question["image"] == annotation["image"]
        digits = [digit_of(image) for image in question["image"]]
        assert annotation["digits"] == digits and annotation["answer"] == compare(*digits)


def assert_png(path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width > 0 and image.height > 0


@pytest.mark.slow
def test_quick_demo_writes_every_artifact(tmp_path):
    demo, data = tmp_path / "demo", tmp_path / "data"
    env = {**os.environ, "DEMO_QUICK": "1", "DEMO_DIR": str(demo), "DEMO_DATA_DIR": str(data)}
    log = tmp_path / "demo.log"
    with open(log, "w") as out:
        result = subprocess.run(
            ["bash", os.path.join(REPO, "scripts", "demo.sh")],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=600,
        )
    assert result.returncode == 0, log.read_text()[-6000:]

    stage1, stage2 = demo / "stage1-pretrain", demo / "stage2-lora"
    assert {"mm_projector.bin", "config.json"} <= set(os.listdir(stage1))
    lora_files = {
        "adapter_config.json",
        "adapter_model.safetensors",
        "non_lora_trainables.bin",
        "config.json",
    }
    assert lora_files <= set(os.listdir(stage2))
    assert checkpoint_kind(str(stage1)) == "projector" and checkpoint_kind(str(stage2)) == "lora"
    assert {"preprocessor_config.json", "model.safetensors"} <= set(os.listdir(demo / "clip"))
    assert {"tokenizer.model", "model.safetensors"} <= set(os.listdir(demo / "llama"))

    assert len(read_json(data / "pretrain.json")) == 64
    assert len(read_json(data / "finetune.json")) == 64 + 64 + 3 + 64
    questions = read_jsonl(data / "test_questions.jsonl")
    assert len(questions) == 4 * 8 == len(read_jsonl(data / "test_annotations.jsonl"))
    answers = read_jsonl(demo / "test_answers.jsonl")
    assert sorted(a["question_id"] for a in answers) == sorted(q["question_id"] for q in questions)

    scores = (demo / "report" / "scores.txt").read_text()
    assert all(category in scores for category in [*QUESTIONS, PAIR_CATEGORY])
    assert_png(demo / "report" / "loss_curves.png")
    assert_png(demo / "report" / "test_examples.png")
