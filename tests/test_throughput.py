"""The FLOP model against a hand count, batch statistics, and the rates the trainer logs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from llava.constants import IGNORE_INDEX
from llava.data.collator import SupervisedCollator
from llava.data.packing import PackingCollator
from llava.model.builder import build_llava_model
from llava.train import throughput
from llava.train.arguments import parse_arguments
from llava.train.lora import add_lora, lora_rank
from llava.train.stages import apply_stage, plan_stage
from llava.train.throughput import (
    StageGrads,
    ThroughputCallback,
    ThroughputMeter,
    batch_statistics,
    flop_model_for,
    stage_grads,
)
from llava.train.train import train

# The tiny fixtures: CLIP 32 px, patch 8 (16 patches + CLS), width 32, MLP 64, 3 layers;
# projector mlp2x_gelu 32 -> 64 -> 64; Llama width 64, MLP 128, 4 heads of 16, 2 KV heads,
# 2 layers, vocabulary 1024.
TOWER_FORWARD = (
    2 * 3 * 8 * 8 * 32 * 16  # patch embedding: 196,608
    + 3 * (2 * 17 * (4 * 32 * 32 + 2 * 32 * 64) + 4 * 17 * 17 * 32)  # layers: 946,560
)
PROJECTOR_FORWARD = (2 * 32 * 64 * 16, 2 * 64 * 64 * 16)  # per image: 65,536 and 131,072
LLM_TOKEN_FORWARD = 2 * 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128)  # 147,456
ATTENTION_FORWARD = 4 * 2 * 4 * 16  # per squared sample length: 512
HEAD_FORWARD = 2 * 64 * 1024  # per supervised token: 131,072
LORA_TOKEN_FORWARD = 2 * 2 * 4 * (2 * (64 + 64) + 2 * (64 + 32) + 2 * (64 + 128) + (128 + 64))
BATCH = {"samples": 2, "images": 2, "tokens": 40, "squared_lengths": 800, "supervised": 10}


@pytest.fixture(scope="module")
def model(tiny_llama_path, tiny_clip_path):
    return build_llava_model(tiny_llama_path, tiny_clip_path)


def test_stage_one_flops_match_a_hand_count(model):
    # frozen tower: forward only; projector: forward + weight grads (+ input grads for the 2nd
    # linear); frozen LM: forward + input grads; head at supervised positions, input grads.
    image = TOWER_FORWARD + 2 * PROJECTOR_FORWARD[0] + 3 * PROJECTOR_FORWARD[1]
    hand = (
        2 * image + 40 * 2 * LLM_TOKEN_FORWARD + 800 * 3 * ATTENTION_FORWARD
        + 10 * 2 * HEAD_FORWARD
    )  # fmt: skip
    grads = stage_grads(plan_stage(tune_mm_mlp_adapter=True))
    flops = flop_model_for(model.config, grads).step_flops(BATCH)
    assert flops == hand == 18_981_632


def test_full_and_lora_finetune_flops_match_a_hand_count(model):
    image = TOWER_FORWARD + 2 * PROJECTOR_FORWARD[0] + 3 * PROJECTOR_FORWARD[1]
    full = stage_grads(plan_stage())
    hand_full = (
        2 * image + 40 * 3 * LLM_TOKEN_FORWARD + 800 * 3 * ATTENTION_FORWARD
        + 10 * 3 * HEAD_FORWARD
    )  # fmt: skip
    assert flop_model_for(model.config, full).step_flops(BATCH) == hand_full
    lora = stage_grads(plan_stage(lora_enable=True), lora_rank=4)
    hand_lora = (
        2 * image + 40 * (2 * LLM_TOKEN_FORWARD + 3 * LORA_TOKEN_FORWARD)
        + 800 * 3 * ATTENTION_FORWARD + 10 * 2 * HEAD_FORWARD
    )  # fmt: skip
    assert flop_model_for(model.config, lora).step_flops(BATCH) == hand_lora


def grads_from_requires_grad(model) -> StageGrads:
    """What trains, read from the parameters (as the FLOP model's input once was)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model

    def trains(part, lora=False):
        named = part.named_parameters()
        return any(p.requires_grad and (("lora_" in name) == lora) for name, p in named)

    lm = base.language_model
    return StageGrads(
        tower=trains(base.vision_tower),
        projector=trains(base.projector),
        language_model=trains(lm),
        head=trains(lm.get_output_embeddings()),
        lora_rank=4 if trains(lm, lora=True) else 0,
    )


@pytest.mark.parametrize(
    "flags",
    [
        dict(tune_mm_mlp_adapter=True),
        dict(),
        dict(freeze_backbone=True, tune_vision_tower=True),
        dict(lora_enable=True),
        dict(lora_enable=True, freeze_mm_mlp_adapter=True),
    ],
)
def test_stage_grads_from_the_plan_are_what_its_application_trains(
    tiny_llama_path, tiny_clip_path, flags
):
    plan = plan_stage(**flags)
    model = build_llava_model(tiny_llama_path, tiny_clip_path)
    apply_stage(model, plan)
    if plan.lora:
        model = add_lora(model, r=4, alpha=8, dropout=0.0, bias="none")
    assert stage_grads(plan, lora_rank=lora_rank(model)) == grads_from_requires_grad(model)


def test_the_callback_counts_the_plan_with_the_lora_configs_rank(tiny_llama_path, tiny_clip_path):
    model = build_llava_model(tiny_llama_path, tiny_clip_path)
    wrapped = add_lora(model, r=4, alpha=8, dropout=0.0, bias="none")
    callback = ThroughputCallback(plan_stage(lora_enable=True))
    args = SimpleNamespace(device="cpu", bf16=False, fp16=False, peak_tflops=None)
    callback.on_train_begin(args, None, None, model=wrapped)
    expected = StageGrads(projector=True, lora_rank=4)  # the figures of the hand count above
    assert callback.meter.flop_model == flop_model_for(model.config, expected)
    assert stage_grads(plan_stage(), lora_rank=4).lora_rank == 0  # no LoRA in the plan


def samples() -> list[dict]:
    def sample(ids, first_supervised):
        labels = [IGNORE_INDEX] * first_supervised + ids[first_supervised:]
        return {
            "input_ids": torch.tensor(ids),
            "labels": torch.tensor(labels),
            "pixel_values": None,
        }

    return [sample([1, 2, 3, 4, 5, 6], 3), sample([1, 7, 8], 1), sample([1, 9, 10, 11], 2)]


def test_padded_and_packed_batches_have_the_same_statistics():
    padded = batch_statistics(SupervisedCollator(pad_token_id=0)(samples()))
    packed = batch_statistics(PackingCollator(pad_token_id=0, flatten=True)(samples()))
    assert padded[0] == [3, 18, 0, 0]  # samples, slots (3 x 6), images, cached images
    assert packed[0] == [3, 13, 0, 0]
    assert padded[1].tolist() == packed[1].tolist() == [13, 36 + 9 + 16, 3 + 2 + 2]


def test_cached_features_count_the_projector_not_the_tower(model):
    """A batch of features read from a feature cache: its images cost the projector's FLOPs
    (forward and backward in stage 1), the tower's none; pixel images cost both."""
    grads = StageGrads(projector=True)
    flop_model = flop_model_for(model.config, grads)
    batch = SupervisedCollator(pad_token_id=0)(samples())
    host, _ = batch_statistics({**batch, "image_features": torch.zeros(2, 4, 8)})
    assert host == [3, 18, 0, 2]
    stats = {**BATCH, "images": 0, "cached_images": 2}
    pixels = {**BATCH, "images": 2, "cached_images": 0}
    # the projector's first layer: forward and weight gradients; its second: input gradients too
    assert flop_model.cached_image_flops == 2 * PROJECTOR_FORWARD[0] + 3 * PROJECTOR_FORWARD[1]
    difference = flop_model.step_flops(pixels) - flop_model.step_flops(stats)
    assert difference == pytest.approx(2 * TOWER_FORWARD)  # the frozen tower: forward only


def test_meter_rates(monkeypatch):
    flop_model = throughput.FlopModel(0.0, 10.0, 1.0, 100.0)
    meter = ThroughputMeter(flop_model, peak_flops=1000.0)
    batch = SupervisedCollator(pad_token_id=0)(samples())
    meter.start()
    meter.record(batch)
    meter.record(batch)
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: meter.window_start + 2.0)
    rates = meter.rates()
    flops = 2 * (13 * 10 + 61 * 1 + 7 * 100)  # per batch: tokens, squared lengths, supervised
    assert rates["samples_per_second"] == 3.0
    assert rates["tokens_per_second"] == 13.0
    assert rates["padding_fraction"] == round(1 - 26 / 36, 4)
    assert rates["mfu"] == round(flops / 2.0 / 1000.0, 4)
    assert meter.rates() == {}  # the window restarted


def test_training_logs_carry_throughput(training_assets, tmp_path):
    flags = [
        "--model_name_or_path", training_assets["llm"],
        "--vision_tower", training_assets["clip"],
        "--image_folder", training_assets["image_folder"],
        "--data_path", training_assets["pretrain"],
        "--version", "plain",
        "--tune_mm_mlp_adapter", "True",
        "--mm_projector_type", "mlp2x_gelu",
        "--output_dir", str(tmp_path),
        "--per_device_train_batch_size", "4",
        "--max_steps", "2",
        "--logging_steps", "1",
        "--save_strategy", "no",
        "--report_to", "none",
        "--disable_tqdm", "True",
        "--use_cpu", "True",
    ]  # fmt: skip
    trainer = train(*parse_arguments(flags))
    steps = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(steps) == 2
    for entry in steps:
        assert entry["samples_per_second"] > 0 and entry["tokens_per_second"] > 0
        assert 0 <= entry["padding_fraction"] < 1
        assert 0 < entry["mfu"] < 1
