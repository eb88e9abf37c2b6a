"""The stage-2 scripts on transformers' image-text-to-text models, under DeepSpeed with 2 CPU
processes: `VISION_TOWER= PRETRAIN_MM_MLP_ADAPTER= bash scripts/finetune_lora.sh --version auto`
(and finetune.sh) on tiny Qwen2-VL, Idefics3, Gemma 3 and Qwen3-VL checkpoints. The loss falls,
the folder holds exactly the model's own files, plain transformers (and peft) reload the result
and generate, and a run resumed from its mid-run checkpoint logs the same losses."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from tests.fixtures.script_runs import common_flags
from tests.fixtures.tiny_vlms import VLM_FAMILIES, save_tiny_vlm
from tests.fixtures.training import logged_losses, run_script
from tests.test_vlm_training import greedy_tokens

pytestmark = pytest.mark.slow

PROCESSOR_FILES = {
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
}
RUN_FILES = {"run.lock", "run_complete.json", "trainer_state.json", "training_args.bin"}
CHECKPOINTS = {"checkpoint-3", "checkpoint-6"}
FULL_FILES = {"config.json", "generation_config.json", "model.safetensors"}
LORA_FILES = {
    "README.md",
    "adapter_config.json",
    "adapter_model.safetensors",
    "config.json",
    "non_lora_trainables.bin",
}
# What a family's processor saves besides (Qwen's have a video processor).
EXTRA_PROCESSOR_FILES = {"qwen2_vl": {"video_preprocessor_config.json"}}
EXTRA_PROCESSOR_FILES["qwen3_vl"] = EXTRA_PROCESSOR_FILES["qwen2_vl"]

# family, stage, launcher, DeepSpeed config
RUNS = [
    ("qwen2_vl", "lora", "deepspeed", "scripts/zero3.json"),
    ("idefics3", "full", "torchrun", "scripts/zero3.json"),
    ("gemma3", "lora", "torchrun", "scripts/zero2.json"),
    ("qwen3_vl", "full", "torchrun", "scripts/zero3.json"),
]
SCRIPTS = {"lora": "finetune_lora.sh", "full": "finetune.sh"}


def run_vlm_script(assets, model: str, stage: str, launcher: str, config: str, output: str):
    env = {
        "MODEL_NAME_OR_PATH": model,
        "VISION_TOWER": "",
        "PRETRAIN_MM_MLP_ADAPTER": "",
        "DATA_PATH": assets["finetune"],
        "IMAGE_FOLDER": assets["image_folder"],
        "OUTPUT_DIR": output,
        "NUM_GPUS": "2",
        "PER_DEVICE_BATCH": "2",
        "GRAD_ACCUM": "1",
        "LAUNCHER": launcher,
        "DEEPSPEED_CONFIG": config,
    }
    flags = [*common_flags(stage), "--version", "auto", "--model_max_length", "256"]
    run_script(SCRIPTS[stage], env, *flags, log=output + ".log")


def reload(stage: str, base: str, output: str):
    """The result as a user opens it: transformers alone, or transformers and peft."""
    if stage == "full":
        return AutoModelForImageTextToText.from_pretrained(output)
    from peft import PeftModel

    return PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base), output)


@pytest.mark.parametrize(
    "family, stage, launcher, config", [r for r in RUNS if r[0] in VLM_FAMILIES]
)
def test_stage_two_script_on_an_existing_vlm(
    family, stage, launcher, config, training_assets, tmp_path
):
    base = save_tiny_vlm(family, str(tmp_path / "base"))
    output = str(tmp_path / "run")
    run_vlm_script(training_assets, base, stage, launcher, config, output)
    losses = logged_losses(output)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert losses[6] < losses[1]
    expected = RUN_FILES | CHECKPOINTS | PROCESSOR_FILES | EXTRA_PROCESSOR_FILES.get(family, set())
    expected |= FULL_FILES if stage == "full" else LORA_FILES
    assert set(os.listdir(output)) == expected

    model = reload(stage, base, output)
    processor = AutoProcessor.from_pretrained(output)
    tokens = greedy_tokens(model, processor)
    assert tokens.shape[0] == 1 and 1 <= tokens.shape[1] <= 5
    assert torch.equal(tokens, greedy_tokens(model, processor))

    if family == "qwen2_vl":  # resume: a fresh folder holding only checkpoint-3
        resumed = str(tmp_path / "resumed")
        os.makedirs(resumed)
        shutil.copytree(os.path.join(output, "checkpoint-3"), os.path.join(resumed, "checkpoint-3"))
        run_vlm_script(training_assets, base, stage, launcher, config, resumed)
        again = logged_losses(resumed)
        for step in (4, 5, 6):
            assert again[step] == pytest.approx(losses[step], rel=1e-5)
