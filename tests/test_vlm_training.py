"""Fine-tuning transformers' image-text-to-text models through the training entry: the loss
falls, a full run saves the model's own class and processor (plain from_pretrained reloads it
and generates the same greedy tokens), a LoRA run saves a peft adapter that plain peft loads
with the connector trained beside it, and flags that describe composed models are refused."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from llava.model.kinds import CONNECTOR, parts_by_role
from llava.train.arguments import parse_arguments
from llava.train.train import train
from tests.fixtures.tiny_vlms import PROMPT_FAMILIES, VLM_FAMILIES, tiny_image

TRAINED = [f for f in ("qwen2_vl", "idefics3", "gemma3", "qwen3_vl", "molmo2") if f in VLM_FAMILIES]


def vlm_flags(assets: dict[str, str], model: str, output_dir, *extra: str) -> list[str]:
    """A short single-process CPU run of a complete VLM on the shapes dataset (--version left
    out: a model with its own processor renders with its own chat template by default)."""
    return [
        "--model_name_or_path", model,
        "--data_path", assets["finetune"],
        "--image_folder", assets["image_folder"],
        "--output_dir", str(output_dir),
        "--per_device_train_batch_size", "4",
        "--max_steps", "6",
        "--learning_rate", "3e-3",
        "--logging_steps", "1",
        "--save_strategy", "no",
        "--report_to", "none",
        "--disable_tqdm", "True",
        "--use_cpu", "True",
        "--seed", "0",
        *extra,
    ]  # fmt: skip


def losses_of(trainer) -> list[float]:
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


def greedy_tokens(model, processor) -> torch.Tensor:
    """Greedy continuation of a one-image question through the processor's own template."""
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}
    ]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = processor.tokenizer.bos_token
    inputs = processor(
        text=[text],
        images=[[tiny_image((48, 40), seed=3)]],
        return_tensors="pt",
        add_special_tokens=not (bos and text.startswith(bos)),
    )
    model.eval()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    return out[:, inputs["input_ids"].shape[1] :]


@pytest.mark.parametrize("family", TRAINED)
def test_full_finetune_saves_the_models_own_class(
    family, training_assets, tiny_vlm_paths, tmp_path
):
    output_dir = tmp_path / "out"
    trainer = train(
        *parse_arguments(vlm_flags(training_assets, tiny_vlm_paths[family], output_dir))
    )
    losses = losses_of(trainer)
    assert len(losses) == 6 and losses[-1] < losses[0]
    reloaded = AutoModelForImageTextToText.from_pretrained(output_dir)
    processor = AutoProcessor.from_pretrained(output_dir)
    assert type(reloaded) is type(trainer.model)
    assert json.loads((output_dir / "config.json").read_text())["stage_plan"]["checkpoint"] == (
        "full model"
    )
    assert torch.equal(greedy_tokens(trainer.model, processor), greedy_tokens(reloaded, processor))


@pytest.mark.parametrize("family", PROMPT_FAMILIES)
def test_a_prompt_suffix_model_trains_on_single_turn_records(
    family, training_assets, tiny_vlm_paths, tmp_path
):
    """PaliGemma (no chat template: a prompt and a suffix to learn) on the one-turn captions:
    the loss falls and plain transformers reloads the result, generating the same tokens."""
    output_dir = tmp_path / "out"
    assets = {**training_assets, "finetune": training_assets["pretrain"]}
    eager = ["--attn_implementation", "eager"]  # its Gemma 2 takes no sdpa
    trainer = train(*parse_arguments(vlm_flags(assets, tiny_vlm_paths[family], output_dir, *eager)))
    losses = losses_of(trainer)
    assert len(losses) == 6 and losses[-1] < losses[0]
    reloaded = AutoModelForImageTextToText.from_pretrained(output_dir)
    processor = AutoProcessor.from_pretrained(output_dir)
    assert type(reloaded) is type(trainer.model)
    image = tiny_image((48, 40), seed=3)
    inputs = processor(text=["Describe the image."], images=[image], return_tensors="pt")
    tokens = []
    for model in (trainer.model.eval(), reloaded.eval()):
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        tokens.append(out[:, inputs["input_ids"].shape[1] :])
    assert torch.equal(*tokens)


def test_lora_result_loads_with_plain_peft_connector_included(
    training_assets, tiny_vlm_paths, tmp_path
):
    from peft import PeftModel

    family = TRAINED[0]
    output_dir = tmp_path / "lora"
    flags = vlm_flags(training_assets, tiny_vlm_paths[family], output_dir, "--lora_enable", "True")
    trainer = train(*parse_arguments(flags + ["--lora_r", "8", "--lora_alpha", "16"]))
    assert losses_of(trainer)[-1] < losses_of(trainer)[0]
    names = set(os.listdir(output_dir))
    assert {"adapter_config.json", "adapter_model.safetensors", "non_lora_trainables.bin"} <= names
    base = AutoModelForImageTextToText.from_pretrained(tiny_vlm_paths[family])
    connector_before = [p.clone() for p in parts_by_role(base)[CONNECTOR].parameters()]
    reloaded = PeftModel.from_pretrained(base, output_dir)
    processor = AutoProcessor.from_pretrained(tiny_vlm_paths[family])
    trained = greedy_tokens(trainer.model, processor)
    assert torch.equal(trained, greedy_tokens(reloaded, processor))
    merged = reloaded.merge_and_unload()
    connector_after = list(parts_by_role(merged)[CONNECTOR].parameters())
    assert any(not torch.equal(a, b) for a, b in zip(connector_before, connector_after))


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--version", "v1"],
            "--version v1: .* own chat template; pass --version auto \\(or leave --version out\\)",
        ),
        (["--mm_use_im_start_end", "True"], "--mm_use_im_start_end"),
        (["--packing", "rows"], "--packing rows: not implemented"),
        (["--vision_tower", "openai/clip-vit-large-patch14-336"], "leave out --vision_tower"),
    ],
)
def test_flags_of_composed_models_are_refused(
    extra, message, training_assets, tiny_vlm_paths, tmp_path
):
    flags = vlm_flags(training_assets, tiny_vlm_paths["qwen2_vl"], tmp_path / "out", *extra)
    with pytest.raises(ValueError, match=message):
        train(*parse_arguments(flags))
