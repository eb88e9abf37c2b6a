"""The training entry in-process (one CPU process, no DeepSpeed): what trains, what reloads."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch
import transformers

from llava.constants import IGNORE_INDEX
from llava.data.dataset import load_supervised_dataset, split_for_validation
from llava.model.builder import load_pretrained_model, load_tokenizer
from llava.train.arguments import parse_arguments
from llava.train.evaluation import PaddedShard
from llava.train.stages import ADAPTERS, plan_stage, saved_stage_plan
from llava.train.train import build_model, train
from tests.fixtures.training import STAGE_ONE_FILES, logits_on_training_batch, training_flags


def state_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def test_stage_one_changes_the_projector_and_nothing_else(training_assets, tmp_path):
    flags = training_flags(
        training_assets,
        tmp_path,
        "--version", "plain",
        "--data_path", training_assets["pretrain"],
        "--tune_mm_mlp_adapter", "True",
    )  # fmt: skip
    model_args, data_args, args = parse_arguments(flags)
    transformers.set_seed(args.seed)  # as train() does: the same fresh projector
    before, _ = build_model(model_args, args)
    trainer = train(model_args, data_args, args)
    after = trainer.model
    for part in ("vision_tower", "language_model"):
        old, new = state_of(getattr(before, part)), state_of(getattr(after, part))
        assert old.keys() == new.keys()
        assert all(torch.equal(old[k], new[k]) for k in old), part
    old, new = state_of(before.projector), state_of(after.projector)
    assert all(not torch.equal(old[k], new[k]) for k in old)
    assert sorted(os.listdir(tmp_path)) == STAGE_ONE_FILES
    with open(tmp_path / "config.json") as f:  # the plan says what the folder holds
        assert saved_stage_plan(json.load(f)) == plan_stage(tune_mm_mlp_adapter=True)


def test_lora_checkpoint_reloads_into_the_same_outputs(training_assets, tmp_path):
    flags = training_flags(
        training_assets,
        tmp_path,
        "--version", "v1",
        "--data_path", training_assets["finetune"],
        "--lora_enable", "True",
        "--lora_r", "4",
        "--lora_alpha", "8",
        "--save_strategy", "steps",
        "--save_steps", "3",
    )  # fmt: skip
    trainer = train(*parse_arguments(flags))
    with open(tmp_path / "checkpoint-3" / "config.json") as f:
        assert saved_stage_plan(json.load(f)).checkpoint == ADAPTERS
    loaded = load_pretrained_model(
        str(tmp_path / "checkpoint-3"), model_base=training_assets["llm"]
    ).model
    expected, actual = logits_on_training_batch(trainer, loaded)
    assert torch.allclose(actual, expected, atol=1e-5)


def reference_loss(model, dataset) -> float:
    """Mean next-token cross-entropy over every supervised token, from full logits, one by one."""
    total, count = 0.0, 0
    model.eval()
    for i in range(len(dataset)):
        sample = dataset[i]
        pixels = sample["pixel_values"]
        with torch.no_grad():
            logits = model(input_ids=sample["input_ids"][None], pixel_values=pixels).logits[0]
        targets = sample["labels"][1:]
        supervised = targets != IGNORE_INDEX
        total += torch.nn.functional.cross_entropy(
            logits[:-1][supervised].float(), targets[supervised], reduction="sum"
        ).item()
        count += int(supervised.sum())
    return total / count


def test_validation_split_reports_the_token_mean_loss_and_perplexity(training_assets, tmp_path):
    flags = training_flags(
        training_assets,
        tmp_path,
        "--version", "v1",
        "--data_path", training_assets["finetune"],
        "--validation_split_percentage", "25",
        "--per_device_eval_batch_size", "3",
    )  # fmt: skip
    trainer = train(*parse_arguments(flags))
    assert len(trainer.eval_dataset) == 7 and len(trainer.train_dataset) == 23  # 25% of 30
    metrics = trainer.state.log_history[-1]
    expected = reference_loss(trainer.model, trainer.eval_dataset)
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)


def test_split_for_validation_is_seeded_disjoint_and_complete(training_assets):
    from transformers import CLIPImageProcessor

    tokenizer = load_tokenizer(training_assets["llm"])
    processor = CLIPImageProcessor.from_pretrained(training_assets["clip"])
    dataset = load_supervised_dataset(
        training_assets["finetune"],
        tokenizer,
        "v1",
        128,
        image_processor=processor,
        num_image_tokens=16,
        image_folder=training_assets["image_folder"],
    )
    train_a, validation_a = split_for_validation(dataset, 10, seed=3)
    train_b, validation_b = split_for_validation(dataset, 10, seed=3)
    _, validation_c = split_for_validation(dataset, 10, seed=4)
    ids = lambda part: [record.id for record, _ in part.samples]  # noqa: E731
    assert ids(validation_a) == ids(validation_b) and ids(validation_a) != ids(validation_c)
    assert len(validation_a) == 3 and len(train_a) == 27
    assert sorted(ids(train_a) + ids(validation_a)) == sorted(ids(dataset))
    assert validation_a.lengths == [
        dataset.lengths[ids(dataset).index(i)] for i in ids(validation_a)
    ]
    with pytest.raises(ValueError, match="validation_split_percentage"):
        split_for_validation(dataset, 100, seed=0)

    shards = [PaddedShard(validation_a, rank, 2) for rank in range(2)]
    assert [len(shard) for shard in shards] == [2, 2]
    seen = [shards[r][i]["input_ids"].tolist() for r in range(2) for i in range(2)]
    expected = [validation_a[i]["input_ids"].tolist() for i in (0, 2, 1)]
    assert sorted(seen[:3]) == sorted(expected)  # ranks hold disjoint samples, all of them
    assert (shards[1][1]["labels"] == IGNORE_INDEX).all()  # the pad adds no token


def test_optimizer_groups_spare_biases_and_norms_and_give_the_projector_its_lr(
    training_assets, tmp_path
):
    flags = training_flags(
        training_assets,
        tmp_path,
        "--version", "v1",
        "--data_path", training_assets["finetune"],
        "--max_steps", "1",
        "--weight_decay", "0.1",
        "--mm_projector_lr", "2e-5",
        "--freeze_backbone", "True",
    )  # fmt: skip
    trainer = train(*parse_arguments(flags))
    names = {id(p): name for name, p in trainer.model.named_parameters()}
    groups = {}
    for group in trainer.optimizer.param_groups:
        for parameter in group["params"]:
            groups[names[id(parameter)]] = (group["weight_decay"], group["initial_lr"])
    assert sorted(groups) == [
        f"projector.{k}" for k in ("0.bias", "0.weight", "2.bias", "2.weight")
    ]
    assert groups["projector.0.weight"] == (0.1, 2e-5)
    assert groups["projector.0.bias"] == (0.0, 2e-5)


@pytest.mark.parametrize("stage", ["pretrain", "lora"])
def test_a_single_process_run_resumes_with_the_same_losses(training_assets, tmp_path, stage):
    """Without DeepSpeed the trainer loads our partial checkpoints itself (projector, LoRA)."""
    stage_flags = {
        "pretrain": ["--version", "plain", "--data_path", training_assets["pretrain"],
                     "--tune_mm_mlp_adapter", "True"],
        "lora": ["--version", "v1", "--data_path", training_assets["finetune"],
                 "--lora_enable", "True", "--lora_r", "4", "--lora_alpha", "8"],
    }[stage]  # fmt: skip

    def run(output_dir):
        flags = training_flags(
            training_assets,
            output_dir,
            *stage_flags,
            "--max_steps", "4",
            "--save_strategy", "steps",
            "--save_steps", "2",
            "--per_device_train_batch_size", "2",
        )  # fmt: skip
        trainer = train(*parse_arguments(flags))
        return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}

    def resume(name: str, zero_file: str | None = None) -> dict[int, float]:
        checkpoint = tmp_path / name / "checkpoint-2"
        shutil.copytree(tmp_path / "first" / "checkpoint-2", checkpoint)
        if zero_file:  # the resumed run must really read the checkpoint's weights
            state = torch.load(checkpoint / zero_file, weights_only=True)
            torch.save(
                {key: torch.zeros_like(value) for key, value in state.items()},
                checkpoint / zero_file,
            )
        return run(tmp_path / name)

    first = run(tmp_path / "first")
    resumed = resume("resumed")
    assert sorted(first) == [1, 2, 3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(first[step], rel=1e-5), (step, first, resumed)
    weights = {"pretrain": "mm_projector.bin", "lora": "non_lora_trainables.bin"}[stage]
    assert resume("zeroed", zero_file=weights)[3] != pytest.approx(first[3], rel=1e-3)


def test_packed_runs_log_the_losses_of_padded_ones_and_throughput(training_assets, tmp_path):
    """--packing rows / flat change the batch layout, not what is learned."""
    runs = {
        "none": [],
        "rows": ["--packing", "rows"],
        "flat": ["--packing", "flat", "--attn_implementation", "sdpa_packed"],
    }
    losses, logs = {}, {}
    for name, extra in runs.items():
        flags = training_flags(
            training_assets,
            tmp_path / name,
            "--version", "v1",
            "--data_path", training_assets["finetune"],
            "--freeze_backbone", "True",
            *extra,
        )  # fmt: skip
        history = train(*parse_arguments(flags)).state.log_history
        losses[name] = [h["loss"] for h in history if "loss" in h]
        logs[name] = next(h for h in history if "loss" in h)
    assert losses["rows"] == pytest.approx(losses["none"], rel=1e-5)
    assert losses["flat"] == pytest.approx(losses["none"], rel=1e-5)
    for entry in logs.values():
        assert entry["samples_per_second"] > 0 and 0 < entry["mfu"] < 1
    assert logs["none"]["padding_fraction"] > 0 and logs["flat"]["padding_fraction"] == 0
    with pytest.raises(ValueError, match="--packing flat needs --attn_implementation"):
        parse_arguments(training_flags(training_assets, tmp_path, "--packing", "flat"))
