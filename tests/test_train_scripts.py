"""The shell scripts, run for real: DeepSpeed on 2 CPU processes, both stages, then a resume.

Stage 1 (pretrain.sh) runs under ZeRO-2 with the deepspeed launcher; stage 2 runs under
ZeRO-3, LoRA (finetune_lora.sh) with the deepspeed launcher and full (finetune.sh) with
torchrun (the runs: tests/fixtures/script_runs.py). Each run saves at steps 3 and 6; a second
stage-1 run started in a fresh output folder holding only checkpoint-3 must resume by itself and
log the same losses at steps 4 to 6. (Stage 2 resumes from every point of a save, killed, in
test_kill_resume.py.)
"""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoTokenizer

from llava.compat import save_tokenizer
from llava.constants import IMAGE_PLACEHOLDER_ID
from llava.model.builder import load_pretrained_model
from llava.model.llava import LlavaForCausalLM
from llava.model.weights import read_projector_file
from tests.fixtures.training import DEEPSPEED_HELPERS, logged_losses

pytestmark = pytest.mark.slow

# What every tokenizer save holds; 4.55 adds special_tokens_map.json and, from a sentencepiece
# source, tokenizer.model (see the tokenizer_files fixture).
CORE_TOKENIZER_FILES = {"chat_template.jinja", "tokenizer.json", "tokenizer_config.json"}
RUN_STATE = {"rng_state_0.pth", "rng_state_1.pth", "scheduler.pt", "trainer_state.json"}
COMMIT = {"checkpoint_complete", "run_flags.json"}
RUN_FILES = {"checkpoint-3", "checkpoint-6", "trainer_state.json", "run.lock", "run_complete.json"}


def files_in(folder: str) -> set[str]:
    return {name for name in os.listdir(folder) if name not in DEEPSPEED_HELPERS}


def check_losses(first: str, second: str) -> None:
    """The loss fell, and the resumed run logged exactly what the uninterrupted one did."""
    losses, resumed = logged_losses(first), logged_losses(second)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert losses[6] < losses[1] - 0.05, losses
    with open(second + ".log") as f:
        log = f.read()
    assert "Run: resuming from " + os.path.join(second, "checkpoint-3") + " at step 3" in log
    assert log.count("'loss':") == 3  # steps 1-3 were not redone
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]  # 1-3 come with the checkpoint's state
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(losses[step], rel=1e-5, abs=1e-6), (step, resumed)


def check_loss_fell(run: str) -> None:
    losses = logged_losses(run)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert losses[6] < losses[1] - 0.05, losses


@pytest.fixture(scope="module")
def tokenizer_files(training_assets, tmp_path_factory) -> set[str]:
    """The files a save of the base tokenizer, with a chat template, writes on this line."""
    tokenizer = AutoTokenizer.from_pretrained(training_assets["llm"])
    tokenizer.chat_template = "{{ messages }}"
    folder = str(tmp_path_factory.mktemp("tokenizer"))
    save_tokenizer(tokenizer, folder)
    assert CORE_TOKENIZER_FILES <= files_in(folder)
    return files_in(folder)


def test_stage_one_writes_the_projector_and_resumes(stage_one_runs):
    first, second = stage_one_runs
    assert files_in(first) == RUN_FILES | {"config.json", "mm_projector.bin"}
    checkpoint = os.path.join(first, "checkpoint-3")
    assert files_in(checkpoint) == RUN_STATE | COMMIT | {
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


def test_lora_stage_under_zero3_writes_carryable_checkpoints(
    training_assets, lora_run, tokenizer_files
):
    lora_files = {
        "adapter_config.json",
        "adapter_model.safetensors",
        "config.json",
        "non_lora_trainables.bin",
        "README.md",
    } | tokenizer_files
    assert files_in(lora_run) == RUN_FILES | lora_files | {"training_args.bin"}
    checkpoint = os.path.join(lora_run, "checkpoint-3")
    assert lora_files <= files_in(checkpoint)
    assert {"global_step3"} | RUN_STATE | COMMIT <= files_in(checkpoint)
    check_loss_fell(lora_run)
    # Every checkpoint loads over the base on its own files and answers.
    final = load_pretrained_model(lora_run, model_base=training_assets["llm"]).model
    middle = load_pretrained_model(checkpoint, model_base=training_assets["llm"]).model
    assert not torch.equal(final.projector[0].weight, middle.projector[0].weight)
    assert answer_tokens(middle, 32).shape == (1, 3)


def test_full_stage_under_zero3_with_torchrun_writes_a_model_that_opens_alone(
    full_run, tokenizer_files
):
    model_files = {"config.json", "model.safetensors", "training_args.bin"} | tokenizer_files
    assert files_in(full_run) == RUN_FILES | model_files
    checkpoint = os.path.join(full_run, "checkpoint-3")
    assert model_files | RUN_STATE | COMMIT | {"global_step3"} <= files_in(checkpoint)
    check_loss_fell(full_run)
    model = LlavaForCausalLM.from_pretrained(full_run).eval()
    middle = LlavaForCausalLM.from_pretrained(checkpoint).eval()
    assert not torch.equal(model.projector[0].weight, middle.projector[0].weight)
    assert answer_tokens(model, 32).shape == (1, 3)
