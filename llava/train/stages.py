"""Which parameters train in which stage: decided in one place and printed as a table."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from llava.model.kinds import ROLES, kind_of, parts_by_role, unwrap_base
from llava.model.weights import (  # PROJECTOR, ADAPTERS, FULL_MODEL: what checkpoints hold
    ADAPTERS,
    FULL_MODEL,
    NON_LORA_TRAINABLES_FILE,
    PROJECTOR,
    PROJECTOR_FILE,
    STAGE_PLAN_KEY,
)

# What a stage does with each part: leave it frozen, train it, or freeze it under LoRA adapters.
FROZEN, TRAINS, LORA = "frozen", "trains", "lora"
MODES = (FROZEN, TRAINS, LORA)
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
    """What a stage does with each part, by role (FROZEN, TRAINS or LORA), and what its
    checkpoints (and final folder) hold (PROJECTOR, ADAPTERS or FULL_MODEL); the name says which
    LLaVA stage the flags describe. The one source of what trains: freezing, LoRA, checkpoint
    contents, FLOP counts and the benchmark all read it."""

    name: str
    vision: str
    connector: str
    language_model: str
    head: str
    checkpoint: str

    def __post_init__(self):
        unknown = {role: self.mode(role) for role in ROLES if self.mode(role) not in MODES}
        if unknown or self.checkpoint not in WEIGHT_FILES:
            raise ValueError(f"not a stage plan: modes {unknown}, checkpoint {self.checkpoint!r}")

    def mode(self, role: str) -> str:
        return getattr(self, role)

    def roles(self, mode: str) -> tuple[str, ...]:
        """The roles in `mode`, in ROLES order."""
        return tuple(role for role in ROLES if self.mode(role) == mode)

    @property
    def lora(self) -> bool:
        return bool(self.roles(LORA))

    @property
    def weight_files(self) -> tuple[tuple[str, ...], ...]:
        return WEIGHT_FILES[self.checkpoint]

    def to_dict(self) -> dict[str, Any]:
        """As recorded in a checkpoint's config.json (`stage_plan`)."""
        fields = asdict(self)
        parts = {role: fields.pop(role) for role in ROLES}
        return {"name": fields["name"], "parts": parts, "checkpoint": fields["checkpoint"]}

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> StagePlan:
        return cls(name=saved["name"], checkpoint=saved["checkpoint"], **saved["parts"])


def plan_stage(
    tune_mm_mlp_adapter: bool = False,
    lora_enable: bool = False,
    freeze_backbone: bool = False,
    freeze_mm_mlp_adapter: bool = False,
    tune_vision_tower: bool = False,
) -> StagePlan:
    """Map the original flags onto one plan.

    --tune_mm_mlp_adapter: stage 1, the projector alone (the other flags cannot add to it).
    --lora_enable: stage 2 with LoRA adapters on the language model; its base weights frozen.
    otherwise: stage 2 full finetuning, unless --freeze_backbone.
    The head goes with the language model (frozen under LoRA: adapters stay off it);
    --tune_vision_tower trains the tower in any stage.
    """
    vision = TRAINS if tune_vision_tower else FROZEN
    connector = FROZEN if freeze_mm_mlp_adapter else TRAINS
    if tune_mm_mlp_adapter:
        if lora_enable or freeze_mm_mlp_adapter or tune_vision_tower:
            raise ValueError(
                "--tune_mm_mlp_adapter trains only the projector and saves only mm_projector.bin; "
                "it cannot be combined with --lora_enable, --freeze_mm_mlp_adapter or "
                "--tune_vision_tower (a tower trained there would not be saved: train it in "
                "stage 2)"
            )
        return StagePlan("pretrain (projector only)", FROZEN, TRAINS, FROZEN, FROZEN, PROJECTOR)
    if lora_enable:
        return StagePlan("finetune (LoRA)", vision, connector, LORA, FROZEN, ADAPTERS)
    language_model = FROZEN if freeze_backbone else TRAINS
    return StagePlan(
        "finetune (full)", vision, connector, language_model, language_model, FULL_MODEL
    )


def apply_stage(model: nn.Module, plan: StagePlan) -> None:
    """Set requires_grad on the base model's parts by role (LoRA adapters are added afterwards;
    a LORA part's own weights stay frozen). The head comes last, as it may sit inside the
    language model."""
    parts = parts_by_role(model)
    for role in ROLES:
        parts[role].requires_grad_(plan.mode(role) == TRAINS)


def record_stage_plan(config: Any, plan: StagePlan) -> None:
    """Put the plan in the model's config, so that each saved config.json says what the
    checkpoint beside it holds."""
    setattr(config, STAGE_PLAN_KEY, plan.to_dict())


def saved_stage_plan(config: dict[str, Any]) -> StagePlan | None:
    """The plan a saved config records; None for checkpoints saved before plans were."""
    saved = config.get(STAGE_PLAN_KEY)
    return StagePlan.from_dict(saved) if isinstance(saved, dict) else None


def parameter_count(parameter: nn.Parameter) -> int:
    # Under ZeRO-3 a partitioned parameter is empty locally; ds_numel is its full size.
    return getattr(parameter, "ds_numel", parameter.numel())


def trainable_table(model: nn.Module) -> str:
    """A table of the model's parts (LoRA adapters apart): parameters in total and trainable.

    It reads requires_grad, not the plan: it shows what the plan's application did.
    """
    from llava.train.lora import is_adapter

    base = unwrap_base(model)
    part_names = sorted(
        (name for names in kind_of(base).parts(base).values() for name in names), key=len
    )
    rows: dict[str, list[int]] = {}
    for name, parameter in base.named_parameters():
        inside = [part for part in part_names if name == part or name.startswith(part + ".")]
        group = inside[-1] if inside else name.split(".", 1)[0]  # the innermost part
        group = f"{group} (LoRA)" if is_adapter(name) else group
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
