"""Where checkpoints are opened: build a LLaVA model from its parts, or load a saved one."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from llava.model.config import LlavaConfig
from llava.model.llava import LlavaForCausalLM
from llava.model.vision_tower import describe_vision_tower, load_vision_tower


def load_vision_tower_processor(
    vision_tower: str, select_feature: str = "patch"
) -> tuple[Any, int]:
    """(image processor, num_image_tokens) of a tower, without loading its weights."""
    return describe_vision_tower(vision_tower, select_feature)


def build_llava_model(
    model_name_or_path: str,
    vision_tower: str,
    mm_projector_type: str = "mlp2x_gelu",
    mm_vision_select_layer: int = -2,
    mm_vision_select_feature: str = "patch",
    vision_tower_pretrained: str | None = None,
    torch_dtype: torch.dtype | None = None,
    attn_implementation: str | None = "sdpa",
    language_model_kwargs: dict[str, Any] | None = None,
) -> LlavaForCausalLM:
    """Join a pretrained causal LM and a pretrained vision tower with a fresh projector.

    `language_model_kwargs` go to `AutoModelForCausalLM.from_pretrained` (for example a
    `quantization_config` for QLoRA).
    """
    language_model = AutoModelForCausalLM.from_pretrained(
        model_name_or_path,
        torch_dtype=torch_dtype,
        attn_implementation=attn_implementation,
        **(language_model_kwargs or {}),
    )
    tower = load_vision_tower(
        vision_tower,
        select_layer=mm_vision_select_layer,
        select_feature=mm_vision_select_feature,
        pretrained=vision_tower_pretrained,
        torch_dtype=torch_dtype,
    )
    tower.requires_grad_(False)
    config = LlavaConfig(
        text_config=language_model.config,
        vision_tower_config=tower.config_dict(),
        mm_vision_tower=vision_tower,
        mm_vision_select_layer=mm_vision_select_layer,
        mm_vision_select_feature=mm_vision_select_feature,
        mm_projector_type=mm_projector_type,
        mm_hidden_size=tower.hidden_size,
        num_image_tokens=tower.num_image_tokens,
    )
    model = LlavaForCausalLM(config, vision_tower=tower, language_model=language_model)
    if torch_dtype is not None:
        model.projector.to(torch_dtype)
    return model


def load_tokenizer(
    name_or_path: str, model_max_length: int | None = None, padding_side: str = "right"
) -> PreTrainedTokenizerBase:
    """The language model's tokenizer, with a pad token (unk or eos when it has none)."""
    kwargs: dict[str, Any] = {"padding_side": padding_side}
    if model_max_length is not None:
        kwargs["model_max_length"] = model_max_length
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer
