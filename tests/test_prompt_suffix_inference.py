"""Inference on a model whose processor takes a bare prompt (PaliGemma's and Fuyu's,
transformers 5.x): model_vqa answers a batch as plain greedy generate answers each question
alone, PaliGemma's prompt is attended both ways as training attends the prefix, the CLI asks each question alone about the
image, a history or a chat template is refused by name, and perplexity is the model's own loss
over the supervised tokens (the plain folder and a LoRA output over it)."""

from __future__ import annotations

import io
import json
import os

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForImageTextToText, AutoProcessor

from llava.conversation import ASSISTANT, USER, Turn
from llava.data.images import load_image
from llava.eval import model_vqa, perplexity
from llava.inference import PromptSuffixAnswerer, answerer_for
from llava.model.builder import load_pretrained_model
from llava.serve import cli
from llava.train.arguments import parse_arguments
from llava.train.train import train
from tests.fixtures.datasets import write_shapes_dataset
from tests.fixtures.tiny_vlms import PROMPT_FAMILIES
from tests.test_vlm_inference import models_own_perplexity
from tests.test_vlm_training import vlm_flags

pytestmark = pytest.mark.skipif(
    not PROMPT_FAMILIES, reason="prompt+suffix models (PaliGemma) train on transformers 5.x"
)

FOLDERS = ("base", "lora")  # the plain VLM, and a short LoRA fine-tune over it
MAX_NEW_TOKENS = 5
# images of three sizes (40x40, 48x32, 32x56), questions of different lengths, one with two images
QUESTIONS = [
    {"question_id": "q0", "image": "000.png", "text": "What colour is the square?"},
    {"question_id": "q1", "image": "001.png", "text": "<image>\nColour?"},
    {"question_id": "q2", "image": ["002.png", "003.png"], "text": "Which of the two is red?"},
]
# Whether a prompt holds the processor's image token per image (PaliGemma's warns without it;
# Fuyu's writes its own), and how many images a prompt takes.
TAGS_IMAGES = {"paligemma": True, "fuyu": False}
MAX_IMAGES = {"paligemma": 2, "fuyu": 1}


def questions_for(family: str) -> list[dict]:
    def count(question: dict) -> int:
        return len(question["image"]) if isinstance(question["image"], list) else 1

    return [q for q in QUESTIONS if count(q) <= MAX_IMAGES[family]]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, str]:
    return write_shapes_dataset(str(tmp_path_factory.mktemp("shapes")), num_images=8)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, shapes, tiny_vlm_paths) -> dict[str, dict[str, str]]:
    """family -> {"base", "lora"}: a tiny prompt+suffix VLM and a two-step LoRA fine-tune of it
    on the one-turn captions (a low learning rate, so answers are not yet one repeated token)."""
    root = tmp_path_factory.mktemp("prompt_suffix_outputs")
    captions = {**shapes, "finetune": shapes["pretrain"]}
    folders = {}
    for family in PROMPT_FAMILIES:
        base, lora = tiny_vlm_paths[family], root / f"{family}_lora"
        flags = vlm_flags(
            captions, base, lora,
            "--max_steps", "2", "--learning_rate", "1e-4",
            "--lora_enable", "True", "--lora_r", "8", "--lora_alpha", "16",
            "--attn_implementation", "eager",  # its Gemma 2 takes no sdpa
        )  # fmt: skip
        train(*parse_arguments(flags))
        folders[family] = {"base": base, "lora": str(lora)}
    return folders


def base_flags(folders: dict[str, str], name: str) -> list[str]:
    """--model-path, and --model-base for a LoRA output."""
    base = ["--model-base", folders["base"]] if name == "lora" else []
    return ["--model-path", folders[name], *base]


def plain_model(folders: dict[str, str], name: str) -> torch.nn.Module:
    """The output as plain transformers (and peft, adapters unmerged) open it."""
    base = AutoModelForImageTextToText.from_pretrained(folders["base"])
    if name == "lora":
        return PeftModel.from_pretrained(base, folders["lora"]).eval()
    return base.eval()


def own_inputs(family: str, processor, question: str, images) -> dict[str, torch.Tensor]:
    """The processor's own inputs for one bare prompt about `images`."""
    tags = processor.image_token * len(images) if TAGS_IMAGES[family] else ""
    inputs = processor(text=[tags + question], images=[images], return_tensors="pt")
    inputs.pop("labels", None)
    return inputs


def plain_answer(family: str, model, processor, question: str, images) -> str:
    """transformers' greedy generate on the processor's own inputs for one bare prompt, decoded."""
    inputs = own_inputs(family, processor, question, images)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    new = output[0, inputs["input_ids"].shape[1] :]
    return processor.tokenizer.decode(new, skip_special_tokens=True).strip()


def question_images(question: dict, image_folder: str) -> list:
    return [load_image(path) for path in model_vqa.image_sources(question, image_folder)]


def write_questions(path, questions: list[dict]) -> str:
    path.write_text("".join(json.dumps(q) + "\n" for q in questions))
    return str(path)


@pytest.mark.parametrize("name", FOLDERS)
@pytest.mark.parametrize("family", PROMPT_FAMILIES)
def test_model_vqa_answers_a_batch_as_plain_greedy_generate(
    family, name, outputs, shapes, tmp_path
):
    """One left-padded batch of prompts of different lengths answers as each prompt alone."""
    folders = outputs[family]
    questions = questions_for(family)
    answers_file = tmp_path / "answers.jsonl"
    model_vqa.main(
        [*base_flags(folders, name),
         "--question-file", write_questions(tmp_path / "questions.jsonl", questions),
         "--image-folder", shapes["image_folder"], "--answers-file", str(answers_file),
         "--batch-size", str(len(questions)), "--max-new-tokens", str(MAX_NEW_TOKENS)]
    )  # fmt: skip
    model = plain_model(folders, name)
    processor = AutoProcessor.from_pretrained(folders["base"])
    expected = {
        q["question_id"]: plain_answer(
            family,
            model,
            processor,
            q["text"].replace("<image>\n", ""),
            question_images(q, shapes["image_folder"]),
        )
        for q in questions
    }
    rows = model_vqa.read_jsonl(str(answers_file))
    assert {row["question_id"]: row["text"] for row in rows} == expected
    assert all(expected.values())


@pytest.mark.parametrize("family", PROMPT_FAMILIES)
def test_the_prompt_is_the_processors_and_attended_both_ways(family, outputs, shapes):
    """The prompt's ids are the processor's own for the bare question. Where it has
    token_type_ids (PaliGemma's) they are all 0, so the first image token already sees the
    question after it (causally it could not)."""
    loaded = load_pretrained_model(outputs[family]["base"])
    answerer = answerer_for(loaded)
    assert isinstance(answerer, PromptSuffixAnswerer)
    image = os.path.join(shapes["image_folder"], "000.png")
    processor = loaded.processor
    own = own_inputs(family, processor, "Colour?", [load_image(image)])
    prompt = answerer.question_prompt("<image>\nColour?", [image])
    assert prompt.input_ids == own["input_ids"][0].tolist()
    if "token_type_ids" not in own:
        return  # attention over the prompt is the model's causal one
    assert prompt.inputs["token_type_ids"].tolist() == [[0] * len(prompt.input_ids)]

    def first_logits(question: str, both_ways: bool) -> torch.Tensor:
        batch = answerer.batch([answerer.question_prompt(question, [image])])
        if not both_ways:
            del batch["token_type_ids"]
        with torch.no_grad():
            return loaded.model(**batch).logits[0, 0]

    assert not torch.allclose(first_logits("Colour?", True), first_logits("Shape?", True))
    torch.testing.assert_close(first_logits("Colour?", False), first_logits("Shape?", False))


@pytest.mark.parametrize("family", PROMPT_FAMILIES)
def test_cli_asks_each_question_alone_about_the_image(family, outputs, shapes, monkeypatch, capsys):
    folders = outputs[family]
    image_file = os.path.join(shapes["image_folder"], "000.png")
    monkeypatch.setattr("sys.stdin", io.StringIO("What colour is it?\nIs it a square?\n\n"))
    cli.main(
        [*base_flags(folders, "lora"), "--image-file", image_file, "--temperature", "0",
         "--max-new-tokens", str(MAX_NEW_TOKENS)]
    )  # fmt: skip
    out = capsys.readouterr().out
    streamed = [part.split("\n")[0].strip() for part in out.split("ASSISTANT: ")[1:]]
    model = plain_model(folders, "lora")
    processor = AutoProcessor.from_pretrained(folders["base"])
    images = [load_image(image_file)]
    expected = [
        plain_answer(family, model, processor, question, images)
        for question in ("What colour is it?", "Is it a square?")
    ]
    assert streamed == expected and all(expected)
    assert "takes one question per prompt" in out.split("USER: ")[0]  # said before the chat


@pytest.mark.parametrize("family", PROMPT_FAMILIES)
def test_a_history_a_text_only_question_or_a_template_is_refused_by_name(
    family, outputs, shapes, tmp_path
):
    loaded = load_pretrained_model(outputs[family]["base"])
    answerer = answerer_for(loaded)
    image = os.path.join(shapes["image_folder"], "000.png")
    history = [Turn(USER, "<image>\nColour?"), Turn(ASSISTANT, "red"), Turn(USER, "Shape?")]
    with pytest.raises(ValueError, match="takes one question per prompt"):
        answerer.prompt(history, [image])
    with pytest.raises(ValueError, match="--conv-mode v1: .* takes a bare prompt"):
        answerer_for(loaded, "v1")
    text_only = {"question_id": "t0", "text": "What is two plus one?"}
    with pytest.raises(ValueError, match="question 't0': .* answers questions about images"):
        model_vqa.answer_questions(
            answerer,
            [text_only],
            str(tmp_path / "answers.jsonl"),
            shapes["image_folder"],
            model_id="m",
            batch_size=1,
            generate_kwargs={"max_new_tokens": 1},
        )


def own_loss_perplexity(folders: dict[str, str], name: str, shapes) -> tuple[float, int]:
    processor = AutoProcessor.from_pretrained(folders["base"])
    model = plain_model(folders, name)
    return models_own_perplexity(model, processor, shapes["pretrain"], shapes["image_folder"])


@pytest.mark.parametrize("name", FOLDERS)
@pytest.mark.parametrize("family", PROMPT_FAMILIES)
def test_perplexity_is_the_models_own_loss_over_supervised_tokens(family, name, outputs, shapes):
    folders = outputs[family]
    expected, num_tokens = own_loss_perplexity(folders, name, shapes)
    for batch_size in (1, 4):
        result = perplexity.main(
            [*base_flags(folders, name), "--data_path", shapes["pretrain"],
             "--image_folder", shapes["image_folder"], "--batch-size", str(batch_size)]
        )  # fmt: skip
        assert result.num_samples == 8 and result.num_tokens == num_tokens
        assert result.perplexity == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("family", PROMPT_FAMILIES)
def test_perplexity_on_conversations_names_the_single_turn_rule(family, outputs, shapes):
    with pytest.raises(ValueError, match=r"prompt\+suffix processor takes one user turn"):
        perplexity.main(
            [*base_flags(outputs[family], "base"), "--data_path", shapes["finetune"],
             "--image_folder", shapes["image_folder"]]
        )  # fmt: skip
