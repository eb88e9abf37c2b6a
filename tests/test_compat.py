"""The two transformers lines behave alike through llava.compat: flags, schedules, tokenizers,
saved weight names."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
import transformers
from transformers import AutoTokenizer

from llava import compat
from llava.model.builder import build_llava_model
from llava.model.weights import NON_LORA_TRAINABLES_FILE
from llava.train.arguments import check_world_size, parse_arguments
from llava.train.checkpoint import load_non_lora_trainables, unwrap_base
from llava.train.resume import FRESH, plan_start
from llava.train.stages import plan_stage
from tests.fixtures.checkpoints import write_lora_checkpoint
from tests.fixtures.tokenizers import save_sentencepiece_llama_tokenizer

REQUIRED = ["--model_name_or_path", "m", "--output_dir", "out", "--report_to", "none"]


def training_arguments(*flags: str):
    return parse_arguments([*REQUIRED, *flags])[2]


def scheduled_learning_rates(args, steps: int) -> list[float]:
    """The learning rates transformers' own Trainer schedules for `args` over `steps` steps."""
    trainer = transformers.Trainer(model=torch.nn.Linear(2, 2), args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=steps)
    rates = []
    for _ in range(steps):
        rates.append(trainer.lr_scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    return rates


@pytest.mark.parametrize(
    ("flags", "warmup"),
    [
        (["--warmup_ratio", "0.25"], 2),  # ceil(8 x 0.25)
        (["--warmup_ratio", "0.3"], 3),  # ceil(2.4)
        (["--warmup_ratio", "0.3", "--warmup_steps", "1"], 1),  # steps win, as in 4.x
        ([], 0),
    ],
)
def test_warmup_ratio_keeps_its_meaning(flags, warmup, tmp_path):
    args = training_arguments(*flags, "--learning_rate", "1.0", "--lr_scheduler_type", "linear")
    assert args.get_warmup_steps(8) == warmup
    rates = scheduled_learning_rates(args, 8)
    assert rates[:warmup] == pytest.approx([step / warmup for step in range(warmup)])
    assert rates[warmup] == pytest.approx(1.0)


def test_warmup_ratio_out_of_range_names_the_flag():
    with pytest.raises(ValueError, match="warmup_ratio"):
        training_arguments("--warmup_ratio", "1.5")


def test_overwrite_output_dir_starts_afresh(tmp_path):
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "checkpoint_complete").write_text("ok\n")
    args = training_arguments("--output_dir", str(tmp_path), "--overwrite_output_dir")
    plan = plan_stage(True, False, False, False, False)
    assert plan_start(args, {}, plan).action == FRESH


def test_the_original_scripts_flags_parse_with_their_meaning():
    args = training_arguments(
        "--evaluation_strategy", "steps", "--eval_steps", "5", "--group_by_length", "True"
    )
    assert args.eval_strategy == "steps" and args.group_by_length
    data_args = parse_arguments([*REQUIRED, "--lazy_preprocess", "True"])[1]
    assert data_args.lazy_preprocess


@pytest.mark.parametrize("legacy", [False, True])
def test_a_saved_tokenizer_keeps_its_legacy_mode(legacy, tmp_path):
    """5.x reads `legacy` but does not write it: save_tokenizer keeps it, so ids stay."""
    source = save_sentencepiece_llama_tokenizer(str(tmp_path / "source"), legacy=legacy)
    tokenizer = AutoTokenizer.from_pretrained(source)
    text = "A cat</s>sat on the mat.</s>\nYes"
    compat.save_tokenizer(tokenizer, str(tmp_path / "saved"))
    with open(os.path.join(tmp_path, "saved", compat.TOKENIZER_CONFIG_FILE)) as f:
        assert json.load(f)["legacy"] is legacy
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_legacy_modes_differ_on_this_line(tmp_path):
    """A control for the test above: the two modes give different ids for that text."""
    texts = {}
    for legacy in (False, True):
        folder = save_sentencepiece_llama_tokenizer(str(tmp_path / str(legacy)), legacy=legacy)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        texts[legacy] = tokenizer("A cat</s>sat")["input_ids"]
    assert texts[False] != texts[True]


def test_a_trained_tower_is_stored_under_the_names_both_lines_load(
    tiny_llama_path, tiny_clip_path, tmp_path
):
    folder = str(tmp_path / "lora")
    trained = unwrap_base(
        write_lora_checkpoint(tiny_llama_path, tiny_clip_path, folder, tune_vision_tower=True)
    )
    stored = torch.load(os.path.join(folder, NON_LORA_TRAINABLES_FILE), weights_only=True)
    tower = [key for key in stored if ".vision_tower." in key]
    assert tower and all(
        key.startswith("base_model.model.vision_tower.vision_model.vision_model.") for key in tower
    )
    fresh = build_llava_model(tiny_llama_path, tiny_clip_path)
    load_non_lora_trainables(fresh, os.path.join(folder, NON_LORA_TRAINABLES_FILE))
    for name, value in trained.vision_tower.state_dict().items():
        assert torch.equal(fresh.vision_tower.state_dict()[name], value), name


def test_a_launch_the_arguments_miscount_is_a_clear_error(monkeypatch):
    miscounted = SimpleNamespace(deepspeed="scripts/zero2.json", world_size=1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="started 2 processes .* see 1"):
        check_world_size(miscounted)
    check_world_size(SimpleNamespace(deepspeed="scripts/zero2.json", world_size=2))
    check_world_size(SimpleNamespace(deepspeed=None, world_size=1))
