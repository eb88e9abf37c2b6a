"""The model-kind registry: a saved composed checkpoint is recognised from its config (not its
folder's name), its parts are reported by role, and loaders read what it holds from its plan."""

from __future__ import annotations

import json

import pytest
import torch

from llava.files import MissingFileError
from llava.model.builder import build_llava_model, checkpoint_kind, load_pretrained_model
from llava.model.kinds import (
    CONNECTOR,
    HEAD,
    LANGUAGE_MODEL,
    MODEL_KINDS,
    VISION,
    kind_of,
    parameter_roles,
    parts_by_role,
    recognise_checkpoint,
)
from llava.train.lora import add_lora
from llava.train.stages import plan_stage, record_stage_plan


@pytest.fixture
def model(tiny_llama_path, tiny_clip_path):
    return build_llava_model(tiny_llama_path, tiny_clip_path)


def test_a_saved_composed_checkpoint_is_recognised_from_its_config(model, tmp_path):
    folder = tmp_path / "llava-lora-projector"  # a name that says nothing true
    model.save_pretrained(folder)
    kind = recognise_checkpoint(str(folder))
    assert kind is MODEL_KINDS["llava_composed"] is kind_of(model)
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert recognise_checkpoint(str(other)) is None
    assert recognise_checkpoint(str(tmp_path / "absent")) is None


def test_parts_by_role(model):
    kind = kind_of(model)
    assert kind.parts(model) == {
        VISION: ("vision_tower",),
        CONNECTOR: ("projector",),
        LANGUAGE_MODEL: ("language_model",),
        HEAD: ("language_model.lm_head",),
    }
    wrapped = add_lora(model, r=4, alpha=8, dropout=0.0, bias="none")
    assert kind_of(wrapped) is kind
    parts = parts_by_role(wrapped)  # through the peft wrapper
    assert parts[VISION] is model.vision_tower and parts[CONNECTOR] is model.projector
    assert parts[HEAD] is model.language_model.get_output_embeddings()
    roles = parameter_roles(wrapped)
    assert set(roles) == {name for name, _ in model.named_parameters()}
    assert {roles[n] for n in roles if n.startswith("projector.")} == {CONNECTOR}
    assert {roles[n] for n in roles if ".lora_" in n} == {LANGUAGE_MODEL}


def test_lora_targets_default_to_the_language_models_linears(model):
    assert kind_of(model).lora_target_names(model) == [
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"
    ]  # fmt: skip


def test_an_unknown_model_is_named():
    with pytest.raises(ValueError, match="Linear is not a model kind"):
        kind_of(torch.nn.Linear(2, 2))


def test_loaders_read_what_a_checkpoint_holds_from_its_saved_plan(model, tmp_path):
    full = tmp_path / "full"
    record_stage_plan(model.config, plan_stage())
    model.save_pretrained(full)
    assert checkpoint_kind(str(full)) == "full"
    # A config that says adapters over a folder without them: the plan decides, and the
    # loader names the missing file instead of guessing from the rest.
    claims_adapters = tmp_path / "claims-adapters"
    record_stage_plan(model.config, plan_stage(lora_enable=True))
    model.save_pretrained(claims_adapters)
    assert checkpoint_kind(str(claims_adapters)) == "lora"
    with pytest.raises(MissingFileError, match="adapter_config.json"):
        load_pretrained_model(str(claims_adapters), model_base=str(full))
