"""LoRA and QLoRA on the language model's linear layers (never the tower or the projector)."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from llava.model.kinds import LANGUAGE_MODEL, kind_of, unwrap_base

# peft's mark of adapter parameters (LoraModel.prefix: lora_A, lora_B, lora_embedding_*, ...).
ADAPTER_MARK = "lora_"


def is_adapter(parameter_name: str) -> bool:
    return ADAPTER_MARK in parameter_name


def language_model_linear_names(model: nn.Module) -> list[str]:
    """The model kind's default LoRA targets: distinct leaf names of the language model's
    linear layers, the head excluded."""
    base = unwrap_base(model)
    return kind_of(base).lora_target_names(base)


def lora_target_pattern(model: nn.Module, target_modules: str | None) -> str:
    """A peft target regex restricted to modules under the language model."""
    available = language_model_linear_names(model)
    if target_modules:
        wanted = [name.strip() for name in target_modules.split(",") if name.strip()]
        unknown = sorted(set(wanted) - set(available))
        if unknown:
            raise ValueError(
                f"--lora_target_modules names {unknown} that are not linear layers of the "
                f"language model; available: {', '.join(available)}"
            )
    else:
        wanted = available
    language_models = kind_of(model).parts(unwrap_base(model))[LANGUAGE_MODEL]
    prefixes = "|".join(re.escape(name) for name in language_models)
    alternatives = "|".join(re.escape(name) for name in wanted)
    return rf"({prefixes})\..*\.({alternatives})"


def lora_rank(model: nn.Module) -> int:
    """The rank of the model's LoRA adapters (its peft config), 0 without any."""
    peft_config = getattr(model, "peft_config", {}).get("default")
    return getattr(peft_config, "r", 0)


def add_lora(
    model: nn.Module,
    r: int,
    alpha: int,
    dropout: float,
    bias: str,
    target_modules: str | None = None,
) -> Any:
    """Wrap the model in a peft model with LoRA on the language model's linear layers.

    peft freezes every non-adapter parameter; those the stage made trainable (the projector,
    an unfrozen tower) are made trainable again.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        bias=bias,
        target_modules=lora_target_pattern(model, target_modules),
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    wrapped = get_peft_model(model, config)
    for parameter in trainable:
        parameter.requires_grad_(True)
    return wrapped


def quantization_config(bits: int, double_quant: bool, quant_type: str, compute_dtype: torch.dtype):
    """bitsandbytes settings for --bits 4/8; a clear error where bitsandbytes cannot run."""
    if bits == 16:
        return None
    if not torch.cuda.is_available():
        raise ValueError(
            f"--bits {bits} (QLoRA) needs bitsandbytes on a CUDA GPU; none is available here. "
            "Use --bits 16 (plain LoRA) on this machine."
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise ValueError(f"--bits {bits} needs bitsandbytes: pip install bitsandbytes") from error
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=bits == 4,
        load_in_8bit=bits == 8,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_quant_type=quant_type,
    )
