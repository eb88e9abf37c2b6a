"""Stages, LoRA targeting, partial checkpoints and the scripts' flags, without a training run."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
import transformers

from llava.model.builder import build_llava_model
from llava.model.config import LlavaConfig
from llava.model.kinds import ROLES
from llava.model.weights import (
    NON_LORA_TRAINABLES_FILE,
    PROJECTOR_FILE,
    read_non_lora_trainables,
    read_projector_file,
)
from llava.train.arguments import DataArguments, ModelArguments, TrainingArguments
from llava.train.checkpoint import (
    load_projector,
    non_lora_trainables,
    save_non_lora_trainables,
    save_projector,
)
from llava.train.lora import add_lora, language_model_linear_names, quantization_config
from llava.train.stages import (
    ADAPTERS,
    FROZEN,
    FULL_MODEL,
    LORA,
    PROJECTOR,
    TRAINS,
    apply_stage,
    plan_stage,
    record_stage_plan,
    saved_stage_plan,
    trainable_table,
)
from llava.train.throughput import ThroughputCallback
from llava.train.trainer import LlavaTrainer
from tests.fixtures.training import dry_run_arguments

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["pretrain.sh", "finetune.sh", "finetune_lora.sh"]


@pytest.fixture
def model(tiny_llama_path, tiny_clip_path):
    return build_llava_model(tiny_llama_path, tiny_clip_path)


def trainable_parts(model) -> dict[str, bool]:
    return {
        part: any(p.requires_grad for p in getattr(model, part).parameters())
        for part in ("vision_tower", "projector", "language_model")
    }


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (dict(tune_mm_mlp_adapter=True), (True, False, False)),
        (dict(), (True, True, False)),
        (dict(freeze_backbone=True), (True, False, False)),
        (dict(freeze_mm_mlp_adapter=True), (False, True, False)),
        (dict(lora_enable=True), (True, False, False)),
        (dict(tune_vision_tower=True), (True, True, True)),
    ],
)
def test_flags_map_onto_what_trains(model, flags, expected):
    arguments = dict(
        tune_mm_mlp_adapter=False,
        lora_enable=False,
        freeze_backbone=False,
        freeze_mm_mlp_adapter=False,
        tune_vision_tower=False,
    )
    plan = plan_stage(**{**arguments, **flags})
    apply_stage(model, plan)
    projector, language_model, vision_tower = expected
    assert trainable_parts(model) == {
        "vision_tower": vision_tower,
        "projector": projector,
        "language_model": language_model,
    }


F, T, L = FROZEN, TRAINS, LORA


@pytest.mark.parametrize(
    ("flags", "expected"),
    [  # (vision, connector, language model, head), what checkpoints hold
        (dict(tune_mm_mlp_adapter=True), ((F, T, F, F), PROJECTOR)),
        (dict(), ((F, T, T, T), FULL_MODEL)),
        (dict(freeze_backbone=True), ((F, T, F, F), FULL_MODEL)),
        (dict(freeze_mm_mlp_adapter=True), ((F, F, T, T), FULL_MODEL)),
        (dict(tune_vision_tower=True), ((T, T, T, T), FULL_MODEL)),
        (dict(lora_enable=True), ((F, T, L, F), ADAPTERS)),
        (dict(lora_enable=True, freeze_backbone=True), ((F, T, L, F), ADAPTERS)),
        (dict(lora_enable=True, freeze_mm_mlp_adapter=True), ((F, F, L, F), ADAPTERS)),
        (dict(lora_enable=True, tune_vision_tower=True), ((T, T, L, F), ADAPTERS)),
    ],
)
def test_flags_map_onto_a_plan_by_role(flags, expected):
    plan = plan_stage(**flags)
    modes, checkpoint = expected
    assert tuple(plan.mode(role) for role in ROLES) == modes
    assert plan.checkpoint == checkpoint
    assert plan.lora == (LORA in modes)


def test_the_plan_round_trips_through_a_saved_config(model, tmp_path):
    plan = plan_stage(lora_enable=True, tune_vision_tower=True)
    record_stage_plan(model.config, plan)
    model.config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["stage_plan"] == {
        "name": "finetune (LoRA)",
        "parts": {"vision": "trains", "connector": "trains", "language_model": "lora",
                  "head": "frozen"},
        "checkpoint": "adapters",
    }  # fmt: skip
    assert saved_stage_plan(saved) == plan
    assert saved_stage_plan(LlavaConfig.from_pretrained(tmp_path).to_dict()) == plan
    assert saved_stage_plan({"model_type": "llava_composed"}) is None  # saved before plans


def test_stage_one_cannot_be_combined_with_lora_or_a_trained_tower():
    with pytest.raises(ValueError, match="only the projector"):
        plan_stage(True, True, False, False, False)
    # The tower would train and then be lost: stage 1 saves only mm_projector.bin.
    with pytest.raises(ValueError, match="--tune_vision_tower .*would not be saved"):
        plan_stage(tune_mm_mlp_adapter=True, tune_vision_tower=True)


def test_lora_goes_on_every_language_model_linear_and_nowhere_else(model):
    expected = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert set(language_model_linear_names(model)) == expected
    apply_stage(model, plan_stage(False, True, False, False, False))
    wrapped = add_lora(model, r=4, alpha=8, dropout=0.0, bias="none")
    lora_modules = {name for name, _ in wrapped.named_modules() if name.endswith("lora_A")}
    assert len(lora_modules) == 2 * len(expected)  # two layers
    assert all(".language_model." in name for name in lora_modules)
    trainable = {name for name, p in wrapped.named_parameters() if p.requires_grad}
    assert all("lora_" in name or ".projector." in name for name in trainable)
    table = trainable_table(wrapped)
    assert "language_model (LoRA)" in table and "projector" in table


def test_lora_target_modules_flag_is_checked(model):
    wrapped = add_lora(
        model, r=4, alpha=8, dropout=0.0, bias="none", target_modules="q_proj,v_proj"
    )
    names = {
        name.rsplit(".", 2)[-2] for name, _ in wrapped.named_modules() if name.endswith("lora_A")
    }
    assert names == {"q_proj", "v_proj"}
    with pytest.raises(ValueError, match="not linear layers of the language model"):
        add_lora(model, r=4, alpha=8, dropout=0.0, bias="none", target_modules="fc9")


def test_qlora_without_a_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="needs bitsandbytes on a CUDA GPU"):
        quantization_config(4, True, "nf4", torch.bfloat16)


def test_projector_file_round_trips_with_original_keys(
    model, tiny_llama_path, tiny_clip_path, tmp_path
):
    save_projector(model, str(tmp_path), write=True)
    raw = torch.load(tmp_path / PROJECTOR_FILE, weights_only=True)
    assert sorted(raw) == [
        f"model.mm_projector.{k}" for k in ("0.bias", "0.weight", "2.bias", "2.weight")
    ]
    other = build_llava_model(tiny_llama_path, tiny_clip_path)
    assert not torch.equal(other.projector[0].weight, model.projector[0].weight)
    load_projector(other, str(tmp_path / PROJECTOR_FILE))
    for a, b in zip(model.projector.parameters(), other.projector.parameters()):
        assert torch.equal(a, b)
    assert set(read_projector_file(str(tmp_path / PROJECTOR_FILE))) == set(
        model.projector.state_dict()
    )


def test_projector_of_another_shape_is_refused(model, tiny_llama_path, tiny_clip_path, tmp_path):
    linear = build_llava_model(tiny_llama_path, tiny_clip_path, mm_projector_type="linear")
    save_projector(linear, str(tmp_path), write=True)
    with pytest.raises(ValueError, match="mlp2x_gelu projector has"):
        load_projector(model, str(tmp_path / PROJECTOR_FILE))
    with pytest.raises(FileNotFoundError, match="No projector weights"):
        load_projector(model, str(tmp_path / "missing.bin"))


def test_non_lora_trainables_hold_the_projector(model, tmp_path):
    plan = plan_stage(lora_enable=True)
    apply_stage(model, plan)
    wrapped = add_lora(model, r=4, alpha=8, dropout=0.0, bias="none")
    save_non_lora_trainables(wrapped, plan, str(tmp_path), write=True)
    state = read_non_lora_trainables(str(tmp_path / NON_LORA_TRAINABLES_FILE), model)
    assert set(state) == {f"projector.{k}" for k in model.projector.state_dict()}
    assert torch.equal(state["projector.0.weight"], model.projector[0].weight)


def test_non_lora_trainables_are_the_parts_the_plan_trains(model, tmp_path):
    plan = plan_stage(lora_enable=True, tune_vision_tower=True)
    apply_stage(model, plan)
    wrapped = add_lora(model, r=4, alpha=8, dropout=0.0, bias="none")
    names = {name for name, _ in non_lora_trainables(wrapped, plan)}
    expected = {f"projector.{k}" for k in model.projector.state_dict()}
    expected |= {f"vision_tower.{k}" for k, _ in model.vision_tower.named_parameters()}
    assert names == expected
    # ... which are exactly the trainable parameters that are not adapters.
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert names == trainable


def test_image_token_check_raises_at_a_training_log_without_the_throughput_callback(
    model, tmp_path
):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    plan = plan_stage(tune_mm_mlp_adapter=True)
    trainer = LlavaTrainer(model=model, args=args, stage_plan=plan)
    assert model.config.stage_plan == plan.to_dict()  # what its saved configs will say
    trainer.remove_callback(ThroughputCallback)
    assert trainer.throughput_callback() is None
    trainer.log({"loss": 1.0})  # nothing pending
    # What check_image_tokens counts on an accelerator instead of waiting for the device.
    model.deferred_image_errors = torch.tensor(1)
    trainer.log({"learning_rate": 1e-3})  # not a training log: the check waits for one
    with pytest.raises(ValueError, match="did not match in 1 batch"):
        trainer.log({"loss": 1.0})
    # A mismatch after the last logging step raises at the end-of-training log.
    model.deferred_image_errors = torch.tensor(2)
    with pytest.raises(ValueError, match="did not match in 2 batch"):
        trainer.log({"train_runtime": 1.0, "train_loss": 1.0})


@pytest.mark.parametrize("per_image, features, wrong", [(4, 2, 0), (None, 8, 0), (None, 7, 1)])
def test_on_an_accelerator_the_image_token_check_counts_without_waiting(
    model, per_image, features, wrong
):
    """On a device (meta here, as any accelerator) in training, a mismatch is counted, not
    read: fixed-size images (N images x P tokens) and AnyRes features (M rows in all)."""
    image_mask = torch.zeros(2, 6, dtype=torch.bool, device="meta")
    model.train()
    model.deferred_image_errors = None
    model.check_image_tokens(image_mask, features, per_image)
    assert model.deferred_image_errors.device.type == "meta"  # nothing was read back
    model.deferred_image_errors = None
    cpu_mask = torch.zeros(2, 6, dtype=torch.bool)
    cpu_mask[:, :4] = True  # 8 placeholders
    if wrong:
        with pytest.raises(ValueError, match="tokens: 8, features: 7"):
            model.check_image_tokens(cpu_mask, features, per_image)
    else:
        model.check_image_tokens(cpu_mask, features, per_image)


def script_arguments(script: str) -> list[str]:
    """The arguments a script passes to train.py."""
    lines = dry_run_arguments(script, {"LAUNCHER": "python"})
    assert lines[:3] == ["python", "-m", "llava.train.train"]
    return lines[3:]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_in_the_scripts_parses(script, tmp_path, monkeypatch):
    # --deepspeed makes TrainingArguments set ACCELERATE_USE_DEEPSPEED in os.environ, which
    # would turn DeepSpeed on for every later trainer in this process: undone after the test.
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    argv = script_arguments(script)
    parser = transformers.HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    namespace, unknown = parser.parse_known_args(argv)
    assert unknown == []
    assert namespace.model_max_length == 2048 and namespace.mm_vision_select_layer == -2
    assert namespace.mm_projector_type == "mlp2x_gelu"
    # The dataclasses' own checks pass too, with the GPU-only precision flags turned off.
    parser.parse_args_into_dataclasses(
        argv + ["--bf16", "False", "--tf32", "False", "--output_dir", str(tmp_path)]
    )


def test_scripts_carry_the_llava_recipe():
    pretrain = script_arguments("pretrain.sh")
    lora = script_arguments("finetune_lora.sh")
    pairs = lambda argv: dict(zip(argv[::2], argv[1::2]))  # noqa: E731
    assert pairs(pretrain)["--learning_rate"] == "1e-3"
    assert pairs(pretrain)["--version"] == "plain"
    assert pairs(lora)["--lora_r"] == "128" and pairs(lora)["--lora_alpha"] == "256"
    assert pairs(lora)["--mm_projector_lr"] == "2e-5"
    assert pairs(lora)["--image_aspect_ratio"] == "pad"


def test_script_arguments_override_defaults_and_environment_sets_paths():
    env = {**os.environ, "DRY_RUN": "1", "LAUNCHER": "python", "DATA_PATH": "/data/x.json"}
    out = subprocess.run(
        ["bash", os.path.join(REPO, "scripts", "pretrain.sh"), "--learning_rate", "5e-4"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert out[out.index("--data_path") + 1] == "/data/x.json"
    assert out[-2:] == ["--learning_rate", "5e-4"]  # last wins in argparse
