"""Answering a question file (batched, resumable, chunked), and perplexity on a data file."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from llava.constants import IGNORE_INDEX
from llava.data.dataset import load_supervised_dataset
from llava.eval import model_vqa, perplexity
from llava.inference import Answerer, Prompt
from llava.model.builder import build_llava_model, load_pretrained_model, load_tokenizer
from tests.fixtures.datasets import write_shapes_dataset

ANSWER_KEYS = {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
MAX_NEW_TOKENS = 6


def save_tiny_llava(folder: str, llm_path: str, tower: str, tokenizer_path: str) -> str:
    """A full checkpoint folder (model and tokenizer) as training writes it."""
    torch.manual_seed(0)
    build_llava_model(llm_path, tower).save_pretrained(folder)
    load_tokenizer(tokenizer_path).save_pretrained(folder)
    return folder


def greedy_answer(model, tokenizer, prompt: Prompt, max_new_tokens: int = MAX_NEW_TOKENS) -> str:
    """Greedy decoding by hand: the full forward pass again for every token, no cache."""
    ids = list(prompt.input_ids)
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids]), pixel_values=prompt.pixel_values).logits
            token = int(logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            ids.append(token)
            new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True).strip()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_llama_path, tiny_clip_path, sp_llama_tokenizer_path) -> str:
    folder = str(tmp_path_factory.mktemp("tiny_llava"))
    return save_tiny_llava(folder, tiny_llama_path, tiny_clip_path, sp_llama_tokenizer_path)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, str]:
    return write_shapes_dataset(str(tmp_path_factory.mktemp("shapes")), num_images=8)


QUESTIONS = [
    {"question_id": "q0", "image": "000.png", "text": "What colour is the square?"},
    {
        "question_id": "q1",
        "image": "001.png",
        "text": "Describe the picture in detail: the objects, their colour, where they are "
        "and what the scene shows.",
    },
    {"question_id": "q2", "text": "What is two plus one?"},
    {"question_id": 3, "image": ["002.png", "003.png"], "text": "Which one is red?"},
    {"question_id": "q4", "image": "004.png", "text": "Is it a square?"},
    {"question_id": "q5", "image": "005.png", "text": "<image>\nCount the objects, please."},
    {"question_id": "q6", "image": "006.png", "text": "Where is it?"},
]


@pytest.fixture
def question_file(tmp_path) -> str:
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return str(path)


def run_vqa(model_dir, shapes, question_file, answers_file, *extra: str) -> list[dict]:
    model_vqa.main(
        [
            "--model-path", model_dir,
            "--question-file", question_file,
            "--image-folder", shapes["image_folder"],
            "--answers-file", str(answers_file),
            "--max-new-tokens", str(MAX_NEW_TOKENS),
            *extra,
        ]
    )  # fmt: skip
    return model_vqa.read_jsonl(str(answers_file))


def texts_by_id(rows: list[dict]) -> dict:
    return {row["question_id"]: row["text"] for row in rows}


@pytest.fixture(scope="module")
def reference_answers(model_dir, shapes) -> dict:
    """Greedy answers decoded by hand, one question at a time."""
    loaded = load_pretrained_model(model_dir)
    answerer = Answerer(loaded, "v1")
    answers = {}
    for question in QUESTIONS:
        images = model_vqa.image_sources(question, shapes["image_folder"])
        prompt = answerer.question_prompt(question["text"], images)
        answers[question["question_id"]] = greedy_answer(loaded.model, loaded.tokenizer, prompt)
    return answers


def test_left_padded_batches_answer_as_one_question_at_a_time(
    model_dir, shapes, question_file, reference_answers, tmp_path
):
    one = run_vqa(model_dir, shapes, question_file, tmp_path / "one.jsonl", "--batch-size", "1")
    three = run_vqa(model_dir, shapes, question_file, tmp_path / "three.jsonl", "--batch-size", "3")
    assert texts_by_id(three) == texts_by_id(one) == reference_answers
    assert [row["question_id"] for row in three] == [q["question_id"] for q in QUESTIONS]


def test_answer_rows_have_exactly_the_documented_keys(model_dir, shapes, question_file, tmp_path):
    rows = run_vqa(model_dir, shapes, question_file, tmp_path / "a.jsonl", "--batch-size", "4")
    assert all(set(row) == ANSWER_KEYS for row in rows)
    assert [row["prompt"] for row in rows] == [q["text"] for q in QUESTIONS]
    assert {row["model_id"] for row in rows} == {os.path.basename(model_dir)}
    assert len({row["answer_id"] for row in rows}) == len(QUESTIONS)
    assert all(row["metadata"] == {} for row in rows)


def test_an_interrupted_answers_file_resumes_without_redoing_lines(
    model_dir, shapes, question_file, reference_answers, tmp_path, capsys
):
    answers_file = tmp_path / "answers.jsonl"
    complete = run_vqa(model_dir, shapes, question_file, tmp_path / "complete.jsonl")
    lines = [json.dumps(row) + "\n" for row in complete]
    torn = lines[3][: len(lines[3]) // 2]  # the run stopped in the middle of a write
    answers_file.write_text("".join(lines[:3]) + torn)
    capsys.readouterr()
    resumed = run_vqa(model_dir, shapes, question_file, answers_file, "--batch-size", "2")
    assert f"wrote {len(QUESTIONS) - 3} answers" in capsys.readouterr().out
    assert resumed[:3] == complete[:3]  # same answer_ids: kept, not redone
    assert [row["question_id"] for row in resumed] == [q["question_id"] for q in QUESTIONS]
    assert texts_by_id(resumed) == reference_answers
    run_vqa(model_dir, shapes, question_file, answers_file)  # nothing left to do
    assert model_vqa.read_jsonl(str(answers_file)) == resumed


def test_a_bad_line_before_the_last_is_an_error_not_a_silent_drop(tmp_path):
    answers_file = tmp_path / "answers.jsonl"
    answers_file.write_text('{"question_id": 1}\nnot json\n{"question_id": 2}\n')
    with pytest.raises(ValueError, match="answers.jsonl:2: not an answer row"):
        model_vqa.answered_ids(str(answers_file))
    answers_file.write_text('{"question_id": 1}\n{"question_id": 2}')  # no final newline
    assert model_vqa.answered_ids(str(answers_file)) == {1, 2}
    assert answers_file.read_text() == '{"question_id": 1}\n{"question_id": 2}\n'


def test_chunks_partition_the_questions_exactly(model_dir, shapes, question_file, tmp_path):
    chunks = [
        run_vqa(
            model_dir, shapes, question_file, tmp_path / f"{index}.jsonl",
            "--num-chunks", "3", "--chunk-idx", str(index), "--batch-size", "2",
        )
        for index in range(3)
    ]  # fmt: skip
    assert [[row["question_id"] for row in rows] for rows in chunks] == [
        ["q0", "q1", "q2"],
        [3, "q4"],
        ["q5", "q6"],
    ]
    for num_items in range(9):
        for num_chunks in range(1, 5):
            items = list(range(num_items))
            parts = [model_vqa.chunk(items, num_chunks, index) for index in range(num_chunks)]
            assert sum(parts, []) == items
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError, match="--chunk-idx 3"):
        model_vqa.chunk(QUESTIONS, 3, 3)
    with pytest.raises(ValueError, match="--num-chunks"):
        model_vqa.chunk(QUESTIONS, 0, 0)


def test_a_missing_image_names_its_question_before_anything_runs(
    model_dir, shapes, question_file, tmp_path
):
    with open(question_file, "a") as f:
        f.write(json.dumps({"question_id": "q-lost", "image": "gone.png", "text": "Hi?"}) + "\n")
    answers_file = tmp_path / "answers.jsonl"
    with pytest.raises(FileNotFoundError, match=r"question 'q-lost': image .*gone.png"):
        run_vqa(model_dir, shapes, question_file, answers_file)
    assert not answers_file.exists()


def test_malformed_questions_are_refused_naming_them(shapes):
    with pytest.raises(ValueError, match="question 2 of the file has no question_id"):
        model_vqa.check_questions([{"question_id": 1, "text": "a"}, {"text": "b"}], None)
    with pytest.raises(ValueError, match="question_id 'x' appears twice"):
        model_vqa.check_questions([{"question_id": "x", "text": "a"}] * 2, None)
    two_images = {"question_id": "y", "image": ["000.png", "001.png"], "text": "<image> and?"}
    with pytest.raises(ValueError, match="question 'y': 1 <image> tags in its text but 2 images"):
        model_vqa.check_questions([two_images], shapes["image_folder"])


# -- perplexity --------------------------------------------------------------------------------


def reference_perplexity(model_dir: str, data_path: str, image_folder: str) -> tuple[float, int]:
    """exp(mean token loss) from full logits, one sample at a time, written out by hand."""
    loaded = load_pretrained_model(model_dir)
    model = loaded.model
    dataset = load_supervised_dataset(
        data_path,
        loaded.tokenizer,
        "v1",
        loaded.context_length,
        image_processor=loaded.image_processor,
        num_image_tokens=model.num_image_tokens,
        image_folder=image_folder,
        image_aspect_ratio=model.config.image_aspect_ratio,
    )
    total, count = torch.zeros((), dtype=torch.float64), 0
    with torch.no_grad():
        for index in range(len(dataset)):
            sample = dataset[index]
            logits = model(
                input_ids=sample["input_ids"][None], pixel_values=sample["pixel_values"]
            ).logits[0]  # (T, V)
            targets = sample["labels"][1:]
            total += F.cross_entropy(
                logits[:-1].float(), targets, ignore_index=IGNORE_INDEX, reduction="sum"
            ).double()
            count += int((targets != IGNORE_INDEX).sum())
    return math.exp(float(total) / count), count


def run_perplexity(model_dir, data_path, image_folder, batch_size) -> perplexity.Perplexity:
    return perplexity.main(
        [
            "--model-path", model_dir,
            "--data_path", data_path,
            "--image_folder", image_folder,
            "--version", "v1",
            "--batch-size", str(batch_size),
        ]
    )  # fmt: skip


def test_perplexity_is_exp_of_the_mean_loss_over_all_supervised_tokens(model_dir, shapes):
    expected, num_tokens = reference_perplexity(
        model_dir, shapes["finetune"], shapes["image_folder"]
    )
    results = [
        run_perplexity(model_dir, shapes["finetune"], shapes["image_folder"], batch_size)
        for batch_size in (1, 3, 10)
    ]
    for result in results:
        assert result.num_tokens == num_tokens
        assert result.num_samples == 10  # 8 image conversations, 2 text-only
        assert result.perplexity == pytest.approx(expected, rel=1e-5)
    assert results[1].perplexity == pytest.approx(results[0].perplexity, rel=1e-6)
    assert results[2].perplexity == pytest.approx(results[0].perplexity, rel=1e-6)


def test_perplexity_reads_any_data_format(model_dir, shapes, tmp_path):
    """The same conversations as OpenAI messages in JSONL score the same."""
    with open(shapes["finetune"]) as f:
        records = json.load(f)
    roles = {"human": "user", "gpt": "assistant"}
    path = tmp_path / "messages.jsonl"
    with open(path, "w") as f:
        for record in records:
            messages = [
                {"role": roles[turn["from"]], "content": turn["value"]}
                for turn in record["conversations"]
            ]
            row = {
                "messages": messages,
                **({"image": record["image"]} if "image" in record else {}),
            }
            f.write(json.dumps(row) + "\n")
    llava_json = run_perplexity(model_dir, shapes["finetune"], shapes["image_folder"], 4)
    messages = run_perplexity(model_dir, str(path), shapes["image_folder"], 4)
    assert messages.num_tokens == llava_json.num_tokens
    assert messages.perplexity == pytest.approx(llava_json.perplexity, rel=1e-6)


def test_perplexity_with_nothing_left_to_score_says_why(model_dir, shapes):
    with pytest.raises(ValueError, match="no sample to score: .*dropped 10 longer than"):
        perplexity.main(
            ["--model-path", model_dir, "--data_path", shapes["finetune"],
             "--image_folder", shapes["image_folder"], "--model_max_length", "8"]
        )  # fmt: skip
