"""Which parameters train in which stage: decided in one place and printed as a table."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from llava.model.weights import NON_LORA_TRAINABLES_FILE, PROJECTOR_FILE

# What a stage's checkpoints (and final folder) hold besides the run state.
PROJECTOR, ADAPTERS, FULL_MODEL = "projector", "adapters", "full model"
# The weight files each kind needs to resume (each entry: alternatives, one must be there).
WEIGHT_FILES = {
    PROJECTOR: ((PROJECTOR_FILE,), ("config.json",)),
    ADAPTERS: (
        ("adapter_config.json",),
        ("adapter_model.safetensors", "adapter_model.bin"),
        (NON_LORA_TRAINABLES_FILE,),
        ("config.json",),
    ),
    FULL_MODEL: (
        ("config.json",),
        (
            "model.safetensors",
            "model.safetensors.index.json",
            "pytorch_model.bin",
            "pytorch_model.bin.index.json",
        ),
    ),
}


@dataclass(frozen=True)
class StagePlan:
    """What learns, and what its checkpoints hold (PROJECTOR, ADAPTERS or FULL_MODEL); the name
    says which LLaVA stage the flags describe."""

    name: str
    train_projector: bool
    train_language_model: bool
    train_vision_tower: bool
    lora: bool
    checkpoint: str

    @property
    def weight_files(self) -> tuple[tuple[str, ...], ...]:
        return WEIGHT_FILES[self.checkpoint]


def plan_stage(
    tune_mm_mlp_adapter: bool,
    lora_enable: bool,
    freeze_backbone: bool,
    freeze_mm_mlp_adapter: bool,
    tune_vision_tower: bool,
) -> StagePlan:
    """Map the original flags onto one plan.

    --tune_mm_mlp_adapter: stage 1, the projector alone (the other flags cannot add to it).
    --lora_enable: stage 2 with LoRA adapters on the language model; its base weights frozen.
    otherwise: stage 2 full finetuning, unless --freeze_backbone.
    """
    if tune_mm_mlp_adapter:
        if lora_enable or freeze_mm_mlp_adapter:
            raise ValueError(
                "--tune_mm_mlp_adapter trains only the projector; it cannot be combined with "
                "--lora_enable or --freeze_mm_mlp_adapter"
            )
        return StagePlan(
            "pretrain (projector only)", True, False, tune_vision_tower, False, PROJECTOR
        )
    if lora_enable:
        return StagePlan(
            "finetune (LoRA)", not freeze_mm_mlp_adapter, False, tune_vision_tower, True, ADAPTERS
        )
    return StagePlan(
        "finetune (full)",
        not freeze_mm_mlp_adapter,
        not freeze_backbone,
        tune_vision_tower,
        False,
        FULL_MODEL,
    )


def apply_stage(model: nn.Module, plan: StagePlan) -> None:
    """Set requires_grad on the base model's three parts (LoRA adapters are added afterwards)."""
    model.vision_tower.requires_grad_(plan.train_vision_tower)
    model.projector.requires_grad_(plan.train_projector)
    model.language_model.requires_grad_(plan.train_language_model)


def parameter_count(parameter: nn.Parameter) -> int:
    # Under ZeRO-3 a partitioned parameter is empty locally; ds_numel is its full size.
    return getattr(parameter, "ds_numel", parameter.numel())


def trainable_table(model: nn.Module) -> str:
    """A table of parameter groups (top-level parts, LoRA adapters apart): total and trainable."""
    rows: dict[str, list[int]] = {}
    for name, parameter in model.named_parameters():
        group = parameter_group(name)
        counts = rows.setdefault(group, [0, 0])
        counts[0] += parameter_count(parameter)
        counts[1] += parameter_count(parameter) if parameter.requires_grad else 0
    lines = [f"{'part':<28}{'parameters':>16}{'trainable':>16}"]
    for group, (total, trainable) in rows.items():
        lines.append(f"{group:<28}{total:>16,}{trainable:>16,}")
    total = sum(r[0] for r in rows.values())
    trainable = sum(r[1] for r in rows.values())
    lines.append(f"{'all':<28}{total:>16,}{trainable:>16,}")
    return "\n".join(lines)


def parameter_group(name: str) -> str:
    name = name.removeprefix("base_model.model.")
    part = name.split(".", 1)[0]
    if "lora_" in name:
        return f"{part} (LoRA)"
    return part
