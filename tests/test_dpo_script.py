"""scripts/dpo.sh end to end: DeepSpeed ZeRO-3 (the script's default) with 2 CPU processes on tiny models, from a LoRA
stage-2 output over its base LLM (MODEL_BASE), and a resume from a mid-run checkpoint that
reproduces the uninterrupted run's losses."""

from __future__ import annotations

import os
import shutil

import pytest
import transformers

from llava.train.arguments import DataArguments, ModelArguments, TrainingArguments
from llava.train.dpo import DPOArguments
from tests.fixtures.checkpoints import write_lora_checkpoint
from tests.fixtures.training import dry_run_arguments, logged_losses, run_script
from tests.test_dpo import colour_pairs, write_rows

pytestmark = pytest.mark.slow

STEPS = 4


def small_flags() -> list[str]:
    """CPU-sized overrides of the script's defaults (appended last)."""
    return [
        "--bf16", "False",
        "--tf32", "False",
        "--model_max_length", "128",
        "--dataloader_num_workers", "0",
        "--gradient_checkpointing", "False",
        "--lora_r", "8",
        "--lora_alpha", "16",
        "--learning_rate", "1e-2",
        "--warmup_ratio", "0",
        "--max_steps", str(STEPS),
        "--save_steps", "2",
        "--save_total_limit", "2",
        "--disable_tqdm", "True",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def dpo_env(training_assets, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("dpo_script")
    stage_two = str(root / "stage_two_lora")
    write_lora_checkpoint(training_assets["llm"], training_assets["clip"], stage_two)
    return {
        "MODEL_NAME_OR_PATH": stage_two,
        "MODEL_BASE": training_assets["llm"],
        "DATA_PATH": write_rows(str(root / "pairs.json"), colour_pairs(range(8))),
        "IMAGE_FOLDER": training_assets["image_folder"],
        "NUM_GPUS": "2",
        "PER_DEVICE_BATCH": "2",
        "GRAD_ACCUM": "1",
        "LAUNCHER": "deepspeed",
        "DEEPSPEED_CONFIG": "scripts/zero3.json",
    }


def test_every_flag_of_the_script_parses(dpo_env, tmp_path, monkeypatch):
    # --deepspeed sets ACCELERATE_USE_DEEPSPEED in os.environ (see test_train_pieces.py)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    for full in ("0", "1"):
        env = {**dpo_env, "FULL": full, "LAUNCHER": "python", "OUTPUT_DIR": str(tmp_path)}
        command = dry_run_arguments("dpo.sh", env)
        assert command[:3] == ["python", "-m", "llava.train.dpo"]
        parser = transformers.HfArgumentParser(
            (ModelArguments, DataArguments, TrainingArguments, DPOArguments)
        )
        namespace, unknown = parser.parse_known_args(command[3:])
        assert unknown == []
        assert namespace.lora_enable is (full == "0") and namespace.freeze_mm_mlp_adapter
        assert namespace.beta == 0.1 and namespace.dpo_loss == "sigmoid"
        assert namespace.model_base == dpo_env["MODEL_BASE"]
        parser.parse_args_into_dataclasses([*command[3:], "--bf16", "False", "--tf32", "False"])


def test_script_runs_under_zero3_and_resumes_with_the_same_losses(dpo_env, tmp_path):
    first = str(tmp_path / "first")
    run_script("dpo.sh", {**dpo_env, "OUTPUT_DIR": first}, *small_flags(), log=first + ".log")
    assert {"adapter_config.json", "non_lora_trainables.bin", "run_complete.json"} <= set(
        os.listdir(first)
    )
    losses = logged_losses(first)
    assert sorted(losses) == list(range(1, STEPS + 1))
    with open(first + ".log") as f:
        log = f.read()
    for field in ("rewards/margins", "rewards/accuracies", "logps/rejected", "pairs_per_second"):
        assert field in log

    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copytree(os.path.join(first, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    run_script("dpo.sh", {**dpo_env, "OUTPUT_DIR": resumed}, *small_flags(), log=resumed + ".log")
    resumed_losses = logged_losses(resumed)
    for step in range(3, STEPS + 1):
        assert resumed_losses[step] == pytest.approx(losses[step], rel=1e-5, abs=1e-6), step
    with open(resumed + ".log") as f:
        assert "checkpoint-2" in f.read()
