"""Mapping between this project's LlavaForCausalLM and transformers' LlavaForConditionalGeneration."""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig
from transformers import LlavaConfig as HFLlavaConfig

from llava.model.config import LlavaConfig

# Our key prefix -> transformers' (4.55 layout: model.{vision_tower,multi_modal_projector,
# language_model}, lm_head at the top).
KEY_PREFIXES = (
    ("vision_tower.vision_model.", "model.vision_tower."),
    ("projector.0.", "model.multi_modal_projector.linear_1."),
    ("projector.2.", "model.multi_modal_projector.linear_2."),
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
)


def check_exportable(config: LlavaConfig) -> None:
    """transformers' Llava has an HF CLIP/SigLIP tower and a two-layer GELU MLP projector."""
    tower_type = config.vision_tower_config["tower_type"]
    if config.mm_projector_type != "mlp2x_gelu":
        raise ValueError(
            f"Only mlp2x_gelu projectors map onto LlavaForConditionalGeneration; this model's "
            f"is {config.mm_projector_type!r}"
        )
    if tower_type not in ("clip", "siglip"):
        raise ValueError(
            f"Only HF CLIP or SigLIP towers can be exported; this one is {tower_type!r}"
        )


def hf_llava_config(config: LlavaConfig, image_token_id: int) -> HFLlavaConfig:
    check_exportable(config)
    vision_config = dict(config.vision_tower_config["vision_config"])
    if config.vision_tower_config["tower_type"] == "clip":
        vision_config = CLIPVisionConfig.from_dict(vision_config).to_dict()
    strategy = "full" if config.mm_vision_select_feature == "cls_patch" else "default"
    if config.vision_tower_config["tower_type"] == "siglip":
        strategy = "full"  # no CLS token to drop
    return HFLlavaConfig(
        vision_config=vision_config,
        text_config=config.text_config.to_dict(),
        image_token_index=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=config.mm_vision_select_layer,
        vision_feature_select_strategy=strategy,
        image_seq_length=config.num_image_tokens,
        tie_word_embeddings=config.text_config.tie_word_embeddings,
    )


def hf_llava_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename our keys to transformers' Llava keys; every key must map."""
    renamed = {}
    for key, value in state_dict.items():
        for ours, theirs in KEY_PREFIXES:
            if key.startswith(ours):
                renamed[theirs + key[len(ours) :]] = value
                break
        else:
            raise KeyError(f"No transformers Llava name for parameter {key!r}")
    return renamed
