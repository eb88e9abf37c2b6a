"""Each checkpoint kind loads from its files and answers; merge and export keep the outputs."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from llava.constants import IMAGE_PLACEHOLDER_ID
from llava.conversation import (
    ASSISTANT,
    SYSTEM,
    TEMPLATES,
    USER,
    Turn,
    get_template,
    render_text,
)
from llava.eval import model_vqa
from llava.export_hf import export
from llava.inference import Answerer
from llava.model.builder import (
    LoadedModel,
    build_llava_model,
    checkpoint_kind,
    load_pretrained_model,
    load_tokenizer,
)
from llava.model.hf_llava import jinja_chat_template
from tests.fixtures.checkpoints import (
    logits_of,
    perturb,
    prompt_inputs,
    saved_weight_names,
    write_lora_checkpoint,
    write_projector_checkpoint,
)
from tests.fixtures.datasets import write_shapes_dataset
from tests.fixtures.models import TINY_IMAGE_SIZE, save_tiny_llm
from tests.fixtures.tokenizers import save_sentencepiece_llama_tokenizer
from tests.test_eval import greedy_answer


def load_merge_script():
    """scripts/ is not a package: load the merge script from its file."""
    path = os.path.join(
        os.path.dirname(os.path.dirname(__file__)), "scripts", "merge_lora_weights.py"
    )
    spec = importlib.util.spec_from_file_location("merge_lora_weights", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


merge = load_merge_script().merge


@pytest.fixture(scope="module")
def base_llm(tmp_path_factory) -> str:
    """A tiny Llama with its tokenizer beside it, as a real base model folder has."""
    folder = str(tmp_path_factory.mktemp("base_llm"))
    save_tiny_llm(folder, "llama")
    save_sentencepiece_llama_tokenizer(folder, legacy=False)
    return folder


def test_full_checkpoint_loads_on_its_own(base_llm, tiny_clip_path, tmp_path):
    model = build_llava_model(base_llm, tiny_clip_path).eval()
    perturb(model.projector, 1)
    model.save_pretrained(tmp_path)
    assert checkpoint_kind(str(tmp_path)) == "full"
    with pytest.raises(ValueError, match="has no tokenizer"):
        load_pretrained_model(str(tmp_path))
    loaded = load_pretrained_model(str(tmp_path), model_base=base_llm)
    inputs = prompt_inputs(model)
    assert torch.equal(logits_of(loaded.model, inputs), logits_of(model, inputs))
    assert loaded.context_length == 512


def test_projector_checkpoint_loads_over_its_base(base_llm, tiny_clip_path, tmp_path):
    model = write_projector_checkpoint(base_llm, tiny_clip_path, str(tmp_path))
    assert checkpoint_kind(str(tmp_path)) == "projector"
    with pytest.raises(ValueError, match="pass --model-base"):
        load_pretrained_model(str(tmp_path))
    loaded = load_pretrained_model(str(tmp_path), model_base=base_llm)
    inputs = prompt_inputs(model)
    assert torch.equal(logits_of(loaded.model, inputs), logits_of(model, inputs))


@pytest.fixture
def lora_checkpoint(base_llm, tiny_clip_path, tmp_path):
    """A LoRA checkpoint as training writes it, and the peft model it came from."""
    folder = str(tmp_path / "lora")
    return folder, write_lora_checkpoint(base_llm, tiny_clip_path, folder)


def test_lora_checkpoint_loads_with_the_same_outputs(lora_checkpoint, base_llm):
    folder, wrapped = lora_checkpoint
    assert checkpoint_kind(folder) == "lora"
    loaded = load_pretrained_model(folder, model_base=base_llm)
    inputs = prompt_inputs(loaded.model)
    expected = logits_of(wrapped, inputs)
    assert torch.allclose(logits_of(loaded.model, inputs), expected, atol=1e-5)


def test_model_vqa_answers_from_a_lora_checkpoint_over_its_base(
    lora_checkpoint, base_llm, tmp_path
):
    """End to end: the answers file holds the greedy answers of base + adapter (unmerged)."""
    folder, wrapped = lora_checkpoint
    image_folder = write_shapes_dataset(str(tmp_path / "shapes"), num_images=1)["image_folder"]
    questions = [
        {"question_id": 0, "image": "000.png", "text": "What colour is the square?"},
        {"question_id": 1, "text": "What is four plus one?"},
    ]
    question_file, answers_file = tmp_path / "questions.jsonl", tmp_path / "answers.jsonl"
    question_file.write_text("".join(json.dumps(q) + "\n" for q in questions))
    model_vqa.main(
        ["--model-path", folder, "--model-base", base_llm, "--question-file", str(question_file),
         "--image-folder", image_folder, "--answers-file", str(answers_file),
         "--batch-size", "2", "--max-new-tokens", "6"]
    )  # fmt: skip
    unmerged = wrapped.get_base_model()  # the LoRA layers still in place, not merged
    tokenizer = load_tokenizer(base_llm)
    answerer = Answerer(
        LoadedModel(tokenizer, unmerged, unmerged.vision_tower.image_processor, 0), "v1"
    )
    expected = {
        q["question_id"]: greedy_answer(
            wrapped,
            tokenizer,
            answerer.question_prompt(q["text"], model_vqa.image_sources(q, image_folder)),
        )
        for q in questions
    }
    rows = model_vqa.read_jsonl(str(answers_file))
    assert {row["question_id"]: row["text"] for row in rows} == expected
    assert {row["model_id"] for row in rows} == {"lora"}


def test_merge_then_load_equals_base_plus_adapter(lora_checkpoint, base_llm, tmp_path):
    folder, wrapped = lora_checkpoint
    merged = str(tmp_path / "merged")
    merge(folder, base_llm, merged)
    assert checkpoint_kind(merged) == "full"
    loaded = load_pretrained_model(merged)  # no base needed any more
    inputs = prompt_inputs(loaded.model)
    assert torch.allclose(logits_of(loaded.model, inputs), logits_of(wrapped, inputs), atol=1e-5)
    with pytest.raises(FileExistsError, match="nothing was written"):
        merge(folder, base_llm, merged)


def test_a_folder_without_a_checkpoint_is_named(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"not a checkpoint .*files: \['notes.txt'\]"):
        checkpoint_kind(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        checkpoint_kind(str(tmp_path / "absent"))


@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_export_loads_in_plain_transformers_with_the_same_logits(
    tower, base_llm, tiny_towers, tmp_path
):
    model = build_llava_model(base_llm, tiny_towers[tower]).eval()
    perturb(model.projector, 5)
    source = tmp_path / "model"
    model.save_pretrained(source)
    # Tower weights under the 4.x names, which both transformers lines load (5.x flattens them).
    tower_names = [n for n in saved_weight_names(str(source)) if n.startswith("vision_tower.")]
    assert tower_names and all(
        n.startswith("vision_tower.vision_model.vision_model.") for n in tower_names
    )
    loaded_tokenizer = load_pretrained_model(str(source), model_base=base_llm).tokenizer
    loaded_tokenizer.save_pretrained(source)
    out = tmp_path / "hf"
    export(str(source), str(out))

    exported_tower = [n for n in saved_weight_names(str(out)) if n.startswith("vision_tower.")]
    assert exported_tower and all(
        n.startswith("vision_tower.vision_model.") for n in exported_tower
    )
    hf_model = LlavaForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    image = (torch.rand(TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3) * 255).to(torch.uint8).numpy()
    batch = processor(images=image, text="look <image> here", return_tensors="pt")
    image_token_id = hf_model.config.image_token_index
    ours_ids = batch["input_ids"].masked_fill(
        batch["input_ids"] == image_token_id, IMAGE_PLACEHOLDER_ID
    )
    assert int((ours_ids == IMAGE_PLACEHOLDER_ID).sum()) == model.num_image_tokens
    with torch.no_grad():
        theirs = hf_model(**batch).logits
        ours = model(input_ids=ours_ids, pixel_values=batch["pixel_values"]).logits
    vocab = ours.shape[-1]
    assert torch.allclose(theirs[..., :vocab], ours, atol=1e-5)
    their_answer = hf_model.generate(**batch, max_new_tokens=5, do_sample=False)
    our_answer = model.generate(
        input_ids=ours_ids, pixel_values=batch["pixel_values"], max_new_tokens=5, do_sample=False
    )
    assert torch.equal(their_answer[:, batch["input_ids"].shape[1] :], our_answer)
    assert os.path.exists(out / "preprocessor_config.json")


def test_export_carries_the_chat_template_of_its_conv_mode(base_llm, tiny_clip_path, tmp_path):
    model = build_llava_model(base_llm, tiny_clip_path)
    source, out = tmp_path / "model", tmp_path / "hf"
    model.save_pretrained(source)
    tokenizer = load_pretrained_model(str(source), model_base=base_llm).tokenizer
    tokenizer.save_pretrained(source)
    with pytest.raises(ValueError, match="unknown --version 'nope'"):
        export(str(source), str(out), conv_mode="nope")
    export(str(source), str(out), conv_mode="v1")
    with pytest.raises(FileExistsError, match="not empty; nothing was written"):
        export(str(source), str(out), conv_mode="v1")
    processor = AutoProcessor.from_pretrained(out)

    v1 = get_template("v1")
    turns = [
        Turn(USER, "<image>\nWhat is it?"),
        Turn(ASSISTANT, "a red square"),
        Turn(USER, "Is it big?"),
    ]
    messages = [
        {"role": USER, "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": ASSISTANT, "content": [{"type": "text", "text": "a red square"}]},
        {"role": USER, "content": [{"type": "text", "text": "Is it big?"}]},
    ]
    for generation_prompt in (True, False):
        expected = render_text(v1, turns, tokenizer, add_generation_prompt=generation_prompt)
        rendered = processor.apply_chat_template(messages, add_generation_prompt=generation_prompt)
        assert rendered == expected
    assert expected.endswith(
        " USER: <image>\nWhat is it? ASSISTANT: a red square</s>USER: Is it big?"
    )
    system_turns = [Turn(SYSTEM, "Be brief."), Turn(USER, "Hi?")]
    system_messages = [
        {"role": t.role, "content": [{"type": "text", "text": t.text}]} for t in system_turns
    ]
    expected = render_text(v1, system_turns, tokenizer, add_generation_prompt=True)
    assert expected == "Be brief. USER: Hi? ASSISTANT:"
    assert processor.apply_chat_template(system_messages, add_generation_prompt=True) == expected
    plain_messages = [{"role": t.role, "content": t.text} for t in system_turns]
    assert (
        processor.tokenizer.apply_chat_template(
            plain_messages, tokenize=False, add_generation_prompt=True
        )
        == expected
    )  # the tokenizer carries the same template, for string contents too
    # Without an image the exported processor also tokenizes as training does (BOS included).
    ids = processor.apply_chat_template(
        system_messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"][0]
    assert (
        list(ids)
        == Answerer(load_pretrained_model(str(source)), "v1").prompt(system_turns).input_ids
    )


CONVERSATIONS = [
    [Turn(USER, "<image>\nWhat is it?"), Turn(ASSISTANT, "a cat"), Turn(USER, "And {eos}?")],
    [Turn(SYSTEM, "Be brief."), Turn(USER, "<image>\nWhat is it?"), Turn(ASSISTANT, "a cat")],
    [Turn(SYSTEM, ""), Turn(USER, "Hi")],
]


def processor_messages(turns: list[Turn]) -> list[dict]:
    """Turns as a processor takes them: an image item, then the text."""
    messages = []
    for turn in turns:
        text = turn.text.removeprefix("<image>\n")
        items = [{"type": "image"}] if text != turn.text else []
        messages.append({"role": turn.role, "content": items + [{"type": "text", "text": text}]})
    return messages


@pytest.mark.parametrize(
    "name", sorted({t.name for t in TEMPLATES.values() if not t.uses_tokenizer_template})
)
def test_every_fixed_template_has_a_jinja_twin(name, sp_llama_tokenizer_path):
    tokenizer = load_tokenizer(sp_llama_tokenizer_path)
    template = get_template(name)
    jinja = jinja_chat_template(template, tokenizer.bos_token, tokenizer.eos_token)
    for turns in CONVERSATIONS:
        for generation_prompt in (True, False):
            expected = render_text(template, turns, tokenizer, generation_prompt)
            for messages in (
                [{"role": t.role, "content": t.text} for t in turns],
                processor_messages(turns),
            ):
                rendered = tokenizer.apply_chat_template(
                    messages,
                    chat_template=jinja,
                    tokenize=False,
                    add_generation_prompt=generation_prompt,
                )
                assert rendered == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
@pytest.mark.parametrize("flag", ["--load-8bit", "--load-4bit"])
def test_quantized_loading_without_a_gpu_is_a_clear_error(
    flag, lora_checkpoint, base_llm, tmp_path
):
    from llava.eval.model_vqa import main

    folder, _ = lora_checkpoint
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question_id": 1, "text": "hi"}\n')
    argv = ["--model-path", folder, "--model-base", base_llm, "--question-file", str(questions)]
    with pytest.raises(ValueError, match="need bitsandbytes on a CUDA GPU"):
        main([*argv, "--answers-file", str(tmp_path / "a.jsonl"), flag])
