"""File names and key conventions of the partial checkpoints (projector, non-LoRA trainables).

Written with the original LLaVA's key names (`model.mm_projector.0.weight`) so that files
move both ways between this project and the original code.
"""

from __future__ import annotations

import os

import torch

from llava.compat import native_state_dict, portable_state_dict
from llava.files import UnreadableFileError, load_torch_file

PROJECTOR_FILE = "mm_projector.bin"
NON_LORA_TRAINABLES_FILE = "non_lora_trainables.bin"
ORIGINAL_PROJECTOR_PREFIX = "model.mm_projector."
PEFT_PREFIX = "base_model.model."

# What a checkpoint holds besides the run state (a stage plan's `checkpoint`), and the config.json
# key the trainer records the stage plan under (llava/train/stages.py).
PROJECTOR, ADAPTERS, FULL_MODEL = "projector", "adapters", "full model"
STAGE_PLAN_KEY = "stage_plan"

# Prefixes a projector key may carry, in any checkpoint we know of -> stripped.
PROJECTOR_PREFIXES = (
    PEFT_PREFIX + ORIGINAL_PROJECTOR_PREFIX,
    PEFT_PREFIX + "projector.",
    ORIGINAL_PROJECTOR_PREFIX,
    "mm_projector.",
    "projector.",
)


def saved_checkpoint_contents(config: dict) -> str | None:
    """PROJECTOR, ADAPTERS or FULL_MODEL as a saved config's stage plan records it; None for a
    config written before plans were recorded (or by another program)."""
    plan = config.get(STAGE_PLAN_KEY)
    contents = plan.get("checkpoint") if isinstance(plan, dict) else None
    return contents if contents in (PROJECTOR, ADAPTERS, FULL_MODEL) else None


def projector_file_state(projector_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The projector's own state dict -> the keys mm_projector.bin holds."""
    return {ORIGINAL_PROJECTOR_PREFIX + key: value.cpu() for key, value in projector_state.items()}


def strip_projector_prefix(key: str) -> str | None:
    for prefix in PROJECTOR_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return None


def read_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """A torch.save'd {name: tensor} dict; a truncated or foreign file is named in the error."""
    state = load_torch_file(path)
    if not isinstance(state, dict):
        raise UnreadableFileError(path, f"holds a {type(state).__name__}, not a state dict")
    not_tensors = [key for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise UnreadableFileError(path, f"not a state dict: {not_tensors[:5]} are not tensors")
    return state


def read_projector_file(path: str) -> dict[str, torch.Tensor]:
    """mm_projector.bin (ours or the original LLaVA's) -> the projector's state dict."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No projector weights at {path!r} (expected {PROJECTOR_FILE})")
    state = read_state_dict_file(path)
    projector_state = {}
    for key, value in state.items():
        stripped = strip_projector_prefix(key)
        if stripped is None:
            raise KeyError(f"{path}: key {key!r} is not a projector weight")
        projector_state[stripped] = value
    return projector_state


def non_lora_file_key(model_key: str) -> str:
    """Our model's parameter name -> the name non_lora_trainables.bin stores."""
    if model_key.startswith("projector."):
        return PEFT_PREFIX + ORIGINAL_PROJECTOR_PREFIX + model_key[len("projector.") :]
    return PEFT_PREFIX + model_key


def non_lora_file_state(
    model: torch.nn.Module, state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Non-LoRA trainables of the (un-wrapped) `model` -> what non_lora_trainables.bin holds."""
    portable = portable_state_dict(model, state)
    return {non_lora_file_key(name): value.cpu() for name, value in portable.items()}


def read_non_lora_trainables(path: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """non_lora_trainables.bin -> a state dict keyed by the (un-wrapped) `model`'s names."""
    state = read_state_dict_file(path)
    result = {}
    for key, value in state.items():
        stripped = strip_projector_prefix(key)
        if stripped is not None:
            result["projector." + stripped] = value
        else:
            result[key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key] = value
    return native_state_dict(model, result)
