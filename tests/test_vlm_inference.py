"""Inference on transformers' image-text-to-text models: a fine-tune's full output, its LoRA
output over the VLM folder, and the plain VLM folder (and a stage-1 connector over it) each load
by their files; model_vqa and the
CLI answer as plain transformers' greedy generate on the processor's own chat template; a merged
LoRA output is a folder plain transformers loads with the unmerged model's logits; perplexity is
the model's own loss over the supervised tokens; a missing or wrong base is named."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import shutil

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForImageTextToText, AutoProcessor

from llava.data.processor_collator import ProcessorCollator, batching_rules
from llava.data.processor_media import load_processor_dataset
from llava.eval import model_vqa, perplexity
from llava.inference import ProcessorAnswerer, answerer_for
from llava.model.builder import checkpoint_kind, load_pretrained_model
from llava.serve import cli
from llava.train.arguments import parse_arguments
from llava.train.train import train
from tests.fixtures.datasets import write_shapes_dataset
from tests.fixtures.tiny_vlms import VLM_FAMILIES, save_tiny_vlm
from tests.test_vlm_training import vlm_flags

FAMILIES = [f for f in ("qwen2_vl", "idefics3", "gemma3") if f in VLM_FAMILIES]
FOLDERS = ("base", "full", "lora")  # the plain VLM, a full fine-tune's output, a LoRA one's
MAX_NEW_TOKENS = 5
QUESTIONS = [
    {"question_id": "q0", "image": "000.png", "text": "What colour is the square?"},
    {"question_id": "q1", "text": "What is two plus one?"},
    {"question_id": "q2", "image": ["001.png", "002.png"], "text": "Which one is red?"},
]


def load_merge_script():
    """scripts/ is not a package: load the merge script from its file."""
    path = os.path.join(
        os.path.dirname(os.path.dirname(__file__)), "scripts", "merge_lora_weights.py"
    )
    spec = importlib.util.spec_from_file_location("merge_lora_weights", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, str]:
    return write_shapes_dataset(str(tmp_path_factory.mktemp("shapes")), num_images=8)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, shapes) -> dict[str, dict[str, str]]:
    """family -> {"base", "full", "lora"}: a tiny VLM and two short fine-tunes of it (a low
    learning rate, so the answers are not yet only the end-of-turn token)."""
    root = tmp_path_factory.mktemp("vlm_outputs")
    folders = {}
    for family in FAMILIES:
        base = save_tiny_vlm(family, str(root / f"{family}_base"))
        short = ("--max_steps", "2", "--learning_rate", "1e-4")
        lora = ("--lora_enable", "True", "--lora_r", "8", "--lora_alpha", "16")
        for name, extra in (("full", short), ("lora", short + lora)):
            train(*parse_arguments(vlm_flags(shapes, base, root / f"{family}_{name}", *extra)))
        folders[family] = {name: str(root / f"{family}_{name}") for name in FOLDERS}
    return folders


def model_base(folders: dict[str, str], name: str) -> str | None:
    return folders["base"] if name == "lora" else None


def plain_model(folders: dict[str, str], name: str) -> torch.nn.Module:
    """The output as plain transformers (and peft, adapters unmerged) open it."""
    if name == "lora":
        base = AutoModelForImageTextToText.from_pretrained(folders["base"])
        return PeftModel.from_pretrained(base, folders["lora"]).eval()
    return AutoModelForImageTextToText.from_pretrained(folders[name]).eval()


def processor_inputs(processor, turns: list[tuple[str, str]], images) -> dict[str, torch.Tensor]:
    """(role, text) turns, the images with the first, through the processor's own template."""
    messages = []
    for k, (role, text) in enumerate(turns):
        parts = [{"type": "image"} for _ in images] if k == 0 else []
        messages.append({"role": role, "content": parts + [{"type": "text", "text": text}]})
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    bos = processor.tokenizer.bos_token
    return processor(
        text=[text],
        images=[images] if images else None,
        return_tensors="pt",
        add_special_tokens=not (bos and text.startswith(bos)),
    )


def plain_answer(model, processor, turns, images) -> str:
    """transformers' greedy generate on the processor's inputs, decoded."""
    inputs = processor_inputs(processor, turns, images)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    new = output[0, inputs["input_ids"].shape[1] :]
    return processor.tokenizer.decode(new, skip_special_tokens=True).strip()


def question_images(question: dict, image_folder: str) -> list:
    from llava.data.images import load_image

    return [load_image(path) for path in model_vqa.image_sources(question, image_folder)]


@pytest.mark.parametrize("family", FAMILIES)
def test_each_output_loads_by_its_files_with_the_plain_models_logits(family, outputs, shapes):
    folders = outputs[family]
    assert [checkpoint_kind(folders[name]) for name in FOLDERS] == ["full", "full", "lora"]
    for name in FOLDERS:
        loaded = load_pretrained_model(folders[name], model_base(folders, name))
        assert loaded.processor is not None and loaded.tokenizer is loaded.processor.tokenizer
        assert isinstance(answerer_for(loaded), ProcessorAnswerer)
        assert loaded.context_length == 2048
        plain = plain_model(folders, name)
        assert type(loaded.model) is type(plain.get_base_model() if name == "lora" else plain)
        images = question_images(QUESTIONS[0], shapes["image_folder"])
        inputs = processor_inputs(loaded.processor, [("user", "Colour?")], images)
        with torch.no_grad():
            ours, theirs = loaded.model(**inputs).logits, plain(**inputs).logits
        assert torch.allclose(ours, theirs, atol=1e-5), name


@pytest.mark.parametrize("name", FOLDERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_model_vqa_answers_as_plain_greedy_generate(family, name, outputs, shapes, tmp_path):
    folders = outputs[family]
    question_file, answers_file = tmp_path / "questions.jsonl", tmp_path / "answers.jsonl"
    question_file.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    base = model_base(folders, name)
    model_vqa.main(
        ["--model-path", folders[name], *(["--model-base", base] if base else []),
         "--question-file", str(question_file), "--image-folder", shapes["image_folder"],
         "--answers-file", str(answers_file), "--batch-size", "2",
         "--max-new-tokens", str(MAX_NEW_TOKENS)]
    )  # fmt: skip
    model = plain_model(folders, name)
    processor = AutoProcessor.from_pretrained(folders[name])
    expected = {
        q["question_id"]: plain_answer(
            model, processor, [("user", q["text"])], question_images(q, shapes["image_folder"])
        )
        for q in QUESTIONS
    }
    rows = model_vqa.read_jsonl(str(answers_file))
    assert {row["question_id"]: row["text"] for row in rows} == expected
    assert any(expected.values())  # not only end-of-turn tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_cli_chats_as_plain_greedy_generate_with_the_history(
    family, outputs, shapes, monkeypatch, capsys
):
    folders = outputs[family]
    image_file = os.path.join(shapes["image_folder"], "000.png")
    answers = []
    generate = ProcessorAnswerer.generate

    def recording_generate(self, batch, **kwargs):
        answers.extend(generate(self, batch, **kwargs))
        return answers[-len(batch) :]

    monkeypatch.setattr(ProcessorAnswerer, "generate", recording_generate)
    monkeypatch.setattr("sys.stdin", io.StringIO("What colour is it?\nIs it a square?\n\n"))
    cli.main(
        ["--model-path", folders["lora"], "--model-base", folders["base"],
         "--image-file", image_file, "--temperature", "0",
         "--max-new-tokens", str(MAX_NEW_TOKENS)]
    )  # fmt: skip
    out = capsys.readouterr().out
    model = plain_model(folders, "lora")
    processor = AutoProcessor.from_pretrained(folders["lora"])
    images = question_images({"image": "000.png"}, shapes["image_folder"])
    first = plain_answer(model, processor, [("user", "What colour is it?")], images)
    turns = [("user", "What colour is it?"), ("assistant", first), ("user", "Is it a square?")]
    second = plain_answer(model, processor, turns, images)
    assert answers == [first, second] and first and second
    assert out.count(first) >= 1 and out.count(second) >= 1  # streamed as generated


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_lora_output_loads_in_plain_transformers_with_the_same_logits(
    family, outputs, shapes, tmp_path
):
    folders = outputs[family]
    merged = str(tmp_path / "merged")
    load_merge_script().merge(folders["lora"], folders["base"], merged)
    model = AutoModelForImageTextToText.from_pretrained(merged).eval()
    processor = AutoProcessor.from_pretrained(merged)
    images = question_images(QUESTIONS[2], shapes["image_folder"])
    inputs = processor_inputs(processor, [("user", "Which one?")], images)
    with torch.no_grad():
        ours, theirs = model(**inputs).logits, plain_model(folders, "lora")(**inputs).logits
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert checkpoint_kind(merged) == "full"
    assert load_pretrained_model(merged).processor.chat_template == processor.chat_template


def models_own_perplexity(model, processor, data_path: str, image_folder: str) -> tuple[float, int]:
    """exp of the mean of the model's own loss (labels given to its forward), weighted by each
    sample's supervised tokens, one sample at a time; and the supervised-token count."""
    dataset = load_processor_dataset(data_path, processor, "auto", 2048, image_folder=image_folder)
    collate = ProcessorCollator(processor.tokenizer.pad_token_id, batching_rules(dataset.media))
    total, count = 0.0, 0
    with torch.no_grad():
        for index in range(len(dataset)):
            batch = collate([dataset[index]])
            tokens = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch).loss) * tokens
            count += tokens
    return math.exp(total / count), count


def own_loss_perplexity(folders: dict[str, str], name: str, shapes) -> tuple[float, int]:
    processor = AutoProcessor.from_pretrained(folders[name])
    model = plain_model(folders, name)
    return models_own_perplexity(model, processor, shapes["finetune"], shapes["image_folder"])


@pytest.mark.parametrize("name", ["full", "lora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_perplexity_is_the_models_own_loss_over_supervised_tokens(family, name, outputs, shapes):
    folders = outputs[family]
    expected, num_tokens = own_loss_perplexity(folders, name, shapes)
    base = model_base(folders, name)
    for batch_size in (1, 4):
        result = perplexity.main(
            ["--model-path", folders[name], *(["--model-base", base] if base else []),
             "--data_path", shapes["finetune"], "--image_folder", shapes["image_folder"],
             "--batch-size", str(batch_size)]
        )  # fmt: skip
        assert result.num_samples == 10 and result.num_tokens == num_tokens
        assert result.perplexity == pytest.approx(expected, rel=1e-5)


def test_a_connector_only_output_loads_over_its_base(outputs, shapes, tmp_path):
    """Stage 1 (--tune_mm_mlp_adapter) writes mm_projector.bin: the base with that connector."""
    base = outputs[FAMILIES[0]]["base"]
    flags = vlm_flags(shapes, base, tmp_path / "stage1", "--max_steps", "2")
    trainer = train(*parse_arguments(flags + ["--tune_mm_mlp_adapter", "True"]))
    assert checkpoint_kind(str(tmp_path / "stage1")) == "projector"
    with pytest.raises(ValueError, match="holds a connector of a .*; pass --model-base"):
        load_pretrained_model(str(tmp_path / "stage1"))
    loaded = load_pretrained_model(str(tmp_path / "stage1"), base)
    trained = dict(trainer.model.named_parameters())
    assert loaded.processor is not None
    assert all(torch.equal(p, trained[n]) for n, p in loaded.model.named_parameters())


def test_a_lora_output_without_its_base_names_the_flag(outputs):
    lora = outputs[FAMILIES[0]]["lora"]
    with pytest.raises(ValueError, match="holds LoRA adapters of a .*; pass --model-base"):
        load_pretrained_model(lora)


def test_a_base_other_than_the_trained_one_is_named(outputs, tmp_path):
    first, second = FAMILIES[:2]
    lora = outputs[first]["lora"]
    with pytest.raises(ValueError, match=r"is not the model .* trained from: its config names"):
        load_pretrained_model(lora, outputs[second]["base"])
    resized = shutil.copytree(outputs[first]["base"], tmp_path / "resized")
    config = json.loads((resized / "config.json").read_text())
    size = config["text_config"]["intermediate_size"]
    config["text_config"]["intermediate_size"] = size * 2
    (resized / "config.json").write_text(json.dumps(config))
    message = f"its text model has intermediate_size {size * 2}, the checkpoint's {size}"
    with pytest.raises(ValueError, match=message):
        load_pretrained_model(lora, str(resized))


def test_a_template_other_than_the_models_own_is_refused(outputs, tmp_path):
    loaded = load_pretrained_model(outputs[FAMILIES[0]]["full"])
    with pytest.raises(ValueError, match="--conv-mode v1: .* own chat template"):
        answerer_for(loaded, "v1")
    assert answerer_for(loaded, "auto").conversation.template.name == "auto"
