"""ZeRO-3-safe save and load of the projector and of the non-LoRA trainables (the parts a stage
plan trains in full beside LoRA adapters)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import torch
from torch import nn

from llava.model.kinds import CONNECTOR, kind_of, parameter_roles, parts_by_role, unwrap_base
from llava.model.llava import ANYRES_NEWLINE
from llava.model.weights import (
    NON_LORA_TRAINABLES_FILE,
    PROJECTOR_FILE,
    non_lora_file_state,
    projector_file_state,
    read_non_lora_trainables,
    read_projector_file,
)
from llava.train.stages import TRAINS, StagePlan

logger = logging.getLogger(__name__)


def is_partitioned(parameter: nn.Parameter) -> bool:
    return hasattr(parameter, "ds_id")


@contextlib.contextmanager
def gathered(parameters: list[nn.Parameter], modifier_rank: int | None = None) -> Iterator[None]:
    """Full parameters inside the block, under ZeRO-3 as elsewhere.

    With `modifier_rank`, writes made on that rank are scattered back to every partition.
    """
    partitioned = [p for p in parameters if is_partitioned(p)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield


def full_state(named: list[tuple[str, nn.Parameter]]) -> dict[str, torch.Tensor]:
    """CPU copies of the named parameters, gathered if partitioned."""
    with gathered([p for _, p in named]):
        return {name: p.detach().cpu().clone() for name, p in named}


def save_projector(model: nn.Module, folder: str, write: bool) -> None:
    """Write mm_projector.bin (original LLaVA keys). Every rank must call it (gather is collective)."""
    projector = parts_by_role(model)[CONNECTOR]
    state = full_state(list(projector.named_parameters()))
    if write:
        os.makedirs(folder, exist_ok=True)
        torch.save(projector_file_state(state), os.path.join(folder, PROJECTOR_FILE))


def load_projector(model: nn.Module, path: str) -> None:
    """Load mm_projector.bin into the projector, gathering partitions under ZeRO-3."""
    projector = parts_by_role(model)[CONNECTOR]
    state = read_projector_file(path)
    expected = dict(projector.named_parameters())
    if set(expected) - set(state) == {ANYRES_NEWLINE} and set(state) < set(expected):
        # an anyres stage 2 over a stage 1 on square images (LLaVA-NeXT's recipe): the newline
        # starts from its fresh initialisation
        logger.warning("%s has no %s: it starts fresh", path, ANYRES_NEWLINE)
        expected.pop(ANYRES_NEWLINE)
    if set(state) != set(expected):
        raise ValueError(
            f"{path} holds projector keys {sorted(state)}, but this model's "
            f"{projector_name(model)} has {sorted(expected)}"
        )
    with gathered(list(expected.values()), modifier_rank=0), torch.no_grad():
        for name, parameter in expected.items():
            if state[name].shape != parameter.shape:
                raise ValueError(
                    f"{path}: {name} has shape {tuple(state[name].shape)}, the projector needs "
                    f"{tuple(parameter.shape)}"
                )
            parameter.copy_(state[name].to(parameter.dtype))


def projector_name(model: nn.Module) -> str:
    """How an error names the model's connector: its projector type where it has one."""
    projector_type = getattr(unwrap_base(model).config, "mm_projector_type", None)
    return (
        f"this model's {projector_type} projector" if projector_type else "this model's connector"
    )


def non_lora_trainables(model: nn.Module, plan: StagePlan) -> list[tuple[str, nn.Parameter]]:
    """The parameters of the parts the plan trains in full (projector, unfrozen tower, ...),
    named as in the un-wrapped model; LoRA parts' adapters are peft's to save."""
    base = unwrap_base(model)
    trained = plan.roles(TRAINS)
    roles = parameter_roles(base)
    return [
        (name, parameter)
        for name, parameter in base.named_parameters()
        if roles.get(name) in trained
    ]


def save_non_lora_trainables(model: nn.Module, plan: StagePlan, folder: str, write: bool) -> None:
    state = full_state(non_lora_trainables(model, plan))
    if write:
        os.makedirs(folder, exist_ok=True)
        file_state = non_lora_file_state(unwrap_base(model), state)
        torch.save(file_state, os.path.join(folder, NON_LORA_TRAINABLES_FILE))


def load_non_lora_trainables(model: nn.Module, path: str) -> None:
    """Load non_lora_trainables.bin into the (un-wrapped) model; every key must exist."""
    base = unwrap_base(model)
    state = read_non_lora_trainables(path, base)
    parameters = dict(base.named_parameters())
    unknown = sorted(set(state) - set(parameters))
    if unknown:
        raise ValueError(f"{path} holds parameters this model does not have: {unknown[:5]}")
    targets = [parameters[name] for name in state]
    with gathered(targets, modifier_rank=0), torch.no_grad():
        for name, value in state.items():
            parameters[name].copy_(value.to(parameters[name].dtype))


# -- the trained parts in the adapter, as peft's modules_to_save ------------------------------

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_MODEL_PREFIX = "base_model.model."  # peft's saved names: this + the base model's name


def trained_modules(model: nn.Module, plan: StagePlan) -> list[str]:
    """Names of the modules the plan trains in full (outermost only: a tower trained whole holds
    its merger); bare parameters (LLaVA-NeXT's image_newline) are not modules and not listed."""
    base = unwrap_base(model)
    parts = kind_of(base).parts(base)
    names = sorted(
        (name for role in plan.roles(TRAINS) for name in parts[role]),
        key=len,
    )
    parameters = {name for name, _ in base.named_parameters()}
    modules: list[str] = []
    for name in names:
        if name not in parameters and not any(name.startswith(outer + ".") for outer in modules):
            modules.append(name)
    return modules


def add_trained_parts_to_adapter(model: nn.Module, plan: StagePlan, folder: str, write: bool):
    """Put the parts trained in full beside LoRA into the saved adapter the way peft saves
    `modules_to_save`, so `PeftModel.from_pretrained(base, folder)` restores them as well as the
    adapters. Only for results: a checkpoint that lists modules_to_save would make peft wrap
    them when the run resumes. Every rank calls it (gathering is collective)."""
    import json

    from safetensors.torch import load_file, save_file

    modules = trained_modules(model, plan)
    base = unwrap_base(model)
    named = [
        (name, parameter)
        for name, parameter in base.named_parameters()
        if any(name.startswith(module + ".") for module in modules)
    ]
    state = full_state(named)
    if not write or not modules:
        return
    weights_path = os.path.join(folder, ADAPTER_WEIGHTS_FILE)
    weights = load_file(weights_path)
    weights.update({PEFT_MODEL_PREFIX + name: value.contiguous() for name, value in state.items()})
    save_file(weights, weights_path, metadata={"format": "pt"})
    config_path = os.path.join(folder, ADAPTER_CONFIG_FILE)
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    config["modules_to_save"] = sorted(set(config.get("modules_to_save") or []) | set(modules))
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
