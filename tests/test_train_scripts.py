"""The shell scripts, run for real: DeepSpeed on 2 CPU processes, both stages, then a resume.

Stage 1 (pretrain.sh) runs under ZeRO-2 with the deepspeed launcher; stage 2 runs under
ZeRO-3, LoRA (finetune_lora.sh) with the deepspeed launcher and full (finetune.sh) with
torchrun. Each run saves at steps 3 and 6; a second run started in a fresh output folder
holding only checkpoint-3 must resume by itself and log the same losses at steps 4 to 6.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from transformers import AutoTokenizer

from llava.compat import save_tokenizer
from llava.constants import IMAGE_PLACEHOLDER_ID
from llava.model.builder import load_pretrained_model
from llava.model.llava import LlavaForCausalLM
from llava.model.weights import read_projector_file
from tests.fixtures.training import DEEPSPEED_HELPERS, logged_losses, run_script

pytestmark = pytest.mark.slow

# What every tokenizer save holds; 4.55 adds special_tokens_map.json and, from a sentencepiece
# source, tokenizer.model (see the tokenizer_files fixture).
CORE_TOKENIZER_FILES = {"chat_template.jinja", "tokenizer.json", "tokenizer_config.json"}
RUN_STATE = {"rng_state_0.pth", "rng_state_1.pth", "scheduler.pt", "trainer_state.json"}
RUN_FILES = {"checkpoint-3", "checkpoint-6", "trainer_state.json"}


def files_in(folder: str) -> set[str]:
    return {name for name in os.listdir(folder) if name not in DEEPSPEED_HELPERS}


def common_flags(max_steps: int = 6) -> list[str]:
    """Small, CPU-friendly overrides of the scripts' paper defaults (appended last)."""
    return [
        "--bf16", "False",
        "--tf32", "False",
        "--model_max_length", "128",
        "--dataloader_num_workers", "0",
        "--gradient_checkpointing", "False",
        "--max_steps", str(max_steps),
        "--save_steps", "3",
        "--save_total_limit", "2",
        "--disable_tqdm", "True",
    ]  # fmt: skip


def run_and_resume(script: str, env: dict[str, str], flags: list[str], root) -> tuple[str, str]:
    """An uninterrupted run, and a second one resuming from a copy of its checkpoint-3."""
    first, second = str(root / "first"), str(root / "resumed")
    run_script(script, {**env, "OUTPUT_DIR": first}, *flags, log=first + ".log")
    os.makedirs(second)
    shutil.copytree(os.path.join(first, "checkpoint-3"), os.path.join(second, "checkpoint-3"))
    run_script(script, {**env, "OUTPUT_DIR": second}, *flags, log=second + ".log")
    return first, second


def check_losses(first: str, second: str) -> None:
    """The loss fell, and the resumed run logged exactly what the uninterrupted one did."""
    losses, resumed = logged_losses(first), logged_losses(second)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert losses[6] < losses[1] - 0.05, losses
    with open(second + ".log") as f:
        log = f.read()
    assert "Resuming from " + os.path.join(second, "checkpoint-3") in log
    assert log.count("'loss':") == 3  # steps 1-3 were not redone
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]  # 1-3 come with the checkpoint's state
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(losses[step], rel=1e-5, abs=1e-6), (step, resumed)


def base_env(assets: dict[str, str], data: str) -> dict[str, str]:
    return {
        "MODEL_NAME_OR_PATH": assets["llm"],
        "VISION_TOWER": assets["clip"],
        "DATA_PATH": assets[data],
        "IMAGE_FOLDER": assets["image_folder"],
        "NUM_GPUS": "2",
        "PER_DEVICE_BATCH": "2",
        "GRAD_ACCUM": "1",
    }


@pytest.fixture(scope="module")
def stage_one(training_assets, tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("stage_one")
    env = {**base_env(training_assets, "pretrain"), "LAUNCHER": "deepspeed"}
    flags = [*common_flags(), "--learning_rate", "1e-2"]
    return run_and_resume("pretrain.sh", env, flags, root)


@pytest.fixture(scope="module")
def tokenizer_files(training_assets, tmp_path_factory) -> set[str]:
    """The files a save of the base tokenizer, with a chat template, writes on this line."""
    tokenizer = AutoTokenizer.from_pretrained(training_assets["llm"])
    tokenizer.chat_template = "{{ messages }}"
    folder = str(tmp_path_factory.mktemp("tokenizer"))
    save_tokenizer(tokenizer, folder)
    assert CORE_TOKENIZER_FILES <= files_in(folder)
    return files_in(folder)


def stage_two_env(training_assets, stage_one, launcher: str) -> dict[str, str]:
    projector = os.path.join(stage_one[0], "mm_projector.bin")
    return {
        **base_env(training_assets, "finetune"),
        "PRETRAIN_MM_MLP_ADAPTER": projector,
        "LAUNCHER": launcher,
    }


def test_stage_one_writes_the_projector_and_resumes(stage_one):
    first, second = stage_one
    assert files_in(first) == RUN_FILES | {"config.json", "mm_projector.bin"}
    checkpoint = os.path.join(first, "checkpoint-3")
    assert files_in(checkpoint) == RUN_STATE | {
        "checkpoint_complete",
        "config.json",
        "global_step3",
        "latest",
        "mm_projector.bin",
    }
    # The engine's checkpoint holds the projector, not the frozen language model.
    engine_state = torch.load(
        os.path.join(checkpoint, "global_step3", "mp_rank_00_model_states.pt"),
        map_location="cpu",
        weights_only=False,
    )
    assert {key.split(".")[0] for key in engine_state["module"]} == {"projector"}
    check_losses(first, second)
    final = read_projector_file(os.path.join(first, "mm_projector.bin"))
    resumed = read_projector_file(os.path.join(second, "mm_projector.bin"))
    for key in final:
        assert torch.allclose(final[key], resumed[key], atol=1e-6)


def answer_tokens(model: LlavaForCausalLM, image_size: int) -> torch.Tensor:
    """Three greedy tokens for a fixed prompt with one image (the loaded model must run end to
    end; an early end-of-sequence from the briefly trained model would not count)."""
    input_ids = torch.tensor([[1, 40, 41] + [IMAGE_PLACEHOLDER_ID] * model.num_image_tokens])
    pixels = torch.zeros(1, 3, image_size, image_size)
    return model.generate(
        input_ids=input_ids, pixel_values=pixels, min_new_tokens=3, max_new_tokens=3
    )


def test_lora_stage_under_zero3_writes_carryable_checkpoints_and_resumes(
    training_assets, stage_one, tokenizer_files, tmp_path
):
    env = stage_two_env(training_assets, stage_one, "deepspeed")
    flags = [*common_flags(), "--learning_rate", "1e-2", "--lora_r", "8", "--lora_alpha", "16"]
    first, second = run_and_resume("finetune_lora.sh", env, flags, tmp_path)
    lora_files = {
        "adapter_config.json",
        "adapter_model.safetensors",
        "config.json",
        "non_lora_trainables.bin",
        "README.md",
    } | tokenizer_files
    assert files_in(first) == RUN_FILES | lora_files | {"training_args.bin"}
    checkpoint = os.path.join(first, "checkpoint-3")
    assert lora_files <= files_in(checkpoint)
    assert {"checkpoint_complete", "global_step3"} | RUN_STATE <= files_in(checkpoint)
    check_losses(first, second)
    # Every checkpoint loads over the base on its own files and answers.
    final = load_pretrained_model(first, model_base=training_assets["llm"]).model
    middle = load_pretrained_model(checkpoint, model_base=training_assets["llm"]).model
    assert not torch.equal(final.projector[0].weight, middle.projector[0].weight)
    assert answer_tokens(middle, 32).shape == (1, 3)


def test_full_stage_under_zero3_with_torchrun_writes_a_model_that_opens_alone(
    training_assets, stage_one, tokenizer_files, tmp_path
):
    env = stage_two_env(training_assets, stage_one, "torchrun")
    flags = [*common_flags(), "--learning_rate", "1e-3"]
    first, second = run_and_resume("finetune.sh", env, flags, tmp_path)
    model_files = {"config.json", "model.safetensors", "training_args.bin"} | tokenizer_files
    assert files_in(first) == RUN_FILES | model_files
    checkpoint = os.path.join(first, "checkpoint-3")
    assert model_files | RUN_STATE | {"checkpoint_complete", "global_step3"} <= files_in(checkpoint)
    check_losses(first, second)
    model = LlavaForCausalLM.from_pretrained(first).eval()
    resumed = LlavaForCausalLM.from_pretrained(second).eval()
    for (name, a), (_, b) in zip(model.named_parameters(), resumed.named_parameters()):
        assert torch.allclose(a, b, atol=1e-5), name
    assert answer_tokens(model, 32).shape == (1, 3)
