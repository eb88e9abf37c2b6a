"""Mapping onto transformers' LlavaForConditionalGeneration and back: config, weights, chat
template (export_hf writes one; builder.load_hf_llava opens one as LlavaForCausalLM)."""

from __future__ import annotations

import json
from typing import Any

import torch
from transformers import CLIPVisionConfig
from transformers import LlavaConfig as HFLlavaConfig

from llava.constants import IMAGE_TOKEN, VIDEO_TOKEN
from llava.conversation import ChatTemplate, fill
from llava.data.media import is_anyres
from llava.model.config import LlavaConfig
from llava.model.vision_tower import HF_MODEL_TYPES, HF_TOWERS, hf_geometry

# Our key prefix -> transformers' (4.55 layout: model.{vision_tower,multi_modal_projector,
# language_model}, lm_head at the top).
KEY_PREFIXES = (
    ("vision_tower.vision_model.", "model.vision_tower."),
    ("projector.0.", "model.multi_modal_projector.linear_1."),
    ("projector.2.", "model.multi_modal_projector.linear_2."),
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("projector.image_newline", "model.image_newline"),  # LlavaNext's (anyres)
)
# transformers' key prefix -> ours: the names of a loaded model (4.55 and 5.x alike) and the
# older top-level names both lines still write to files (vision_tower., language_model.model.).
# The tower's own names follow as they are: nested under vision_model. (4.x) or flat (5.x);
# compat.native_state_dict settles them for the installed line.
INVERSE_KEY_PREFIXES = tuple((theirs, ours) for ours, theirs in KEY_PREFIXES) + (
    ("vision_tower.", "vision_tower.vision_model."),
    ("multi_modal_projector.linear_1.", "projector.0."),
    ("multi_modal_projector.linear_2.", "projector.2."),
    ("language_model.model.", "language_model.model."),
    ("language_model.lm_head.", "language_model.lm_head."),
)


def hf_class_name(config: LlavaConfig) -> str:
    """transformers' class an export of `config` is: LlavaNext for anyres (LLaVA-NeXT),
    LlavaOnevision for anyres_max_N (OneVision: its cap, several images, video), else Llava."""
    aspect = config.image_aspect_ratio
    if not is_anyres(aspect):
        return "LlavaForConditionalGeneration"
    if aspect == "anyres":
        return "LlavaNextForConditionalGeneration"
    return "LlavaOnevisionForConditionalGeneration"


def check_exportable(config: LlavaConfig) -> None:
    """transformers' Llava has an HF CLIP/SigLIP tower and a two-layer GELU MLP projector;
    its LlavaNext takes AnyRes with spatial_unpad, no anyres_max_N cap and no video; its
    LlavaOnevision takes anyres_max_N with spatial_unpad and pools video frames by 2."""
    tower_type = config.vision_tower_config["tower_type"]
    target = hf_class_name(config)
    if target != "LlavaForConditionalGeneration":
        if config.mm_patch_merge_type != "spatial_unpad":
            raise ValueError(
                f"mm_patch_merge_type {config.mm_patch_merge_type!r} does not map onto "
                f"{target}, which unpads its tiles (spatial_unpad)"
            )
        frames = getattr(config, "video_frames", None)
        if frames and target == "LlavaNextForConditionalGeneration":
            raise ValueError(
                "a model that takes videos does not map onto LlavaNextForConditionalGeneration "
                "(no video); train with anyres_max_N for LlavaOnevisionForConditionalGeneration"
            )
        if frames and getattr(config, "video_pool_stride", 2) != 2:
            raise ValueError(
                f"video_pool_stride {config.video_pool_stride} does not map onto {target}, "
                "which pools each frame's grid by 2"
            )
    if config.mm_projector_type != "mlp2x_gelu":
        raise ValueError(
            f"Only mlp2x_gelu projectors map onto LlavaForConditionalGeneration; this model's "
            f"is {config.mm_projector_type!r}"
        )
    if tower_type not in ("clip", "siglip"):
        raise ValueError(
            f"Only HF CLIP or SigLIP towers can be exported; this one is {tower_type!r}"
        )


def hf_llava_config(
    config: LlavaConfig, image_token_id: int, video_token_id: int | None = None
) -> HFLlavaConfig:
    """transformers' Llava config of our config (LlavaNext's for an anyres model,
    LlavaOnevision's, with `video_token_id`, for anyres_max_N)."""
    check_exportable(config)
    vision_config = dict(config.vision_tower_config["vision_config"])
    if config.vision_tower_config["tower_type"] == "clip":
        vision_config = CLIPVisionConfig.from_dict(vision_config).to_dict()
    strategy = "full" if config.mm_vision_select_feature == "cls_patch" else "default"
    if config.vision_tower_config["tower_type"] == "siglip":
        strategy = "full"  # no CLS token to drop
    settings = dict(
        vision_config=vision_config,
        text_config=config.text_config.to_dict(),
        image_token_index=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=config.mm_vision_select_layer,
        vision_feature_select_strategy=strategy,
        image_seq_length=config.num_image_tokens,
        tie_word_embeddings=config.text_config.tie_word_embeddings,
    )
    target = hf_class_name(config)
    if target == "LlavaNextForConditionalGeneration":
        from transformers import LlavaNextConfig

        return LlavaNextConfig(image_grid_pinpoints=config.image_grid_pinpoints, **settings)
    if target == "LlavaOnevisionForConditionalGeneration":
        from transformers import LlavaOnevisionConfig

        if video_token_id is None:
            raise ValueError("a LlavaOnevision export needs the <video> token's id")
        del settings["image_seq_length"]
        return LlavaOnevisionConfig(
            image_grid_pinpoints=config.image_grid_pinpoints,
            vision_aspect_ratio=config.image_aspect_ratio,
            video_token_index=video_token_id,
            **settings,
        )
    return HFLlavaConfig(**settings)


def renamed_keys(
    state_dict: dict[str, torch.Tensor], prefixes: tuple[tuple[str, str], ...], target: str
) -> dict[str, torch.Tensor]:
    """Each key with its first matching (old, new) prefix replaced; every key must map."""
    renamed = {}
    for key, value in state_dict.items():
        for old, new in prefixes:
            if key.startswith(old):
                renamed[new + key[len(old) :]] = value
                break
        else:
            raise KeyError(f"No {target} name for the parameter {key!r}")
    return renamed


def hf_llava_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename our keys to transformers' Llava keys; every key must map."""
    return renamed_keys(state_dict, KEY_PREFIXES, "transformers Llava")


def llava_state_dict(hf_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' Llava keys (either layout) -> ours; every key must map."""
    return renamed_keys(hf_state_dict, INVERSE_KEY_PREFIXES, "LlavaForCausalLM")


# Llava's vision_feature_select_strategy -> our mm_vision_select_feature, for a tower with a
# CLS token: "default" drops the first token, "full" keeps all.
SELECT_FEATURE_OF_STRATEGY = {"default": "patch", "full": "cls_patch"}


def unmapped_settings(hf_config: HFLlavaConfig) -> list[str]:
    """What in a transformers Llava config has no equivalent in LlavaForCausalLM."""
    problems = []
    vision_type = hf_config.vision_config.model_type
    if vision_type not in HF_MODEL_TYPES:
        problems.append(f"vision tower of model_type {vision_type!r} (only CLIP or SigLIP map)")
    layer = hf_config.vision_feature_layer
    if not isinstance(layer, int):
        problems.append(
            f"vision_feature_layer {layer!r} (features of several layers concatenated; "
            "mm_vision_select_layer is one layer)"
        )
    strategy = hf_config.vision_feature_select_strategy
    if strategy not in SELECT_FEATURE_OF_STRATEGY:
        problems.append(f"vision_feature_select_strategy {strategy!r}")
    elif strategy == "default" and HF_MODEL_TYPES.get(vision_type) == "siglip":
        problems.append("vision_feature_select_strategy 'default' on SigLIP (drops a patch)")
    if hf_config.projector_hidden_act != "gelu":
        problems.append(f"projector_hidden_act {hf_config.projector_hidden_act!r} (not gelu)")
    if not getattr(hf_config, "multimodal_projector_bias", True):
        problems.append("a projector without biases")
    return problems


def llava_config(
    hf_config: HFLlavaConfig, image_processor: Any, source: str | None = None
) -> LlavaConfig:
    """Our config of a transformers Llava config (the inverse of `hf_llava_config`).

    `image_processor` is the checkpoint's own; `source` (the folder) is recorded as the tower's
    origin. A setting with no equivalent here is a ValueError that names it.
    """
    problems = unmapped_settings(hf_config)
    if problems:
        raise ValueError(
            "This LlavaForConditionalGeneration config does not map onto LlavaForCausalLM: "
            + "; ".join(problems)
        )
    vision_config = hf_config.vision_config
    tower_type = HF_MODEL_TYPES[vision_config.model_type]
    select_feature = "patch"  # SigLIP's "full": all tokens are patches
    if HF_TOWERS[tower_type].has_cls_token:
        select_feature = SELECT_FEATURE_OF_STRATEGY[hf_config.vision_feature_select_strategy]
    geometry = hf_geometry(HF_TOWERS[tower_type], vision_config, select_feature)
    return LlavaConfig(
        text_config=hf_config.text_config,
        vision_tower_config={
            "tower_type": tower_type,
            "vision_config": vision_config.to_dict(),
            "image_processor": image_processor.to_dict(),
        },
        mm_vision_tower=source,
        mm_vision_select_layer=hf_config.vision_feature_layer,
        mm_vision_select_feature=select_feature,
        mm_projector_type="mlp2x_gelu",
        mm_hidden_size=vision_config.hidden_size,
        num_image_tokens=geometry.num_image_tokens,
        tie_word_embeddings=hf_config.text_config.tie_word_embeddings,
        # transformers' processor resizes and crops, it does not pad: answer as it prepares.
        image_aspect_ratio="square",
    )


def check_projector_shapes(projector: torch.nn.Module, hf_config: HFLlavaConfig) -> None:
    """The two linears of Llava's projector have the shapes of our mlp2x_gelu."""
    vision, text = hf_config.vision_config.hidden_size, hf_config.text_config.hidden_size
    expected = {"linear_1": (text, vision), "linear_2": (text, text)}
    for name, shape in expected.items():
        weight = getattr(getattr(projector, name, None), "weight", None)
        # Under ZeRO-3 a parameter is partitioned (empty here); ds_shape is its full shape.
        found = getattr(weight, "ds_shape", getattr(weight, "shape", None))
        if found is None or tuple(found) != shape:
            raise ValueError(
                f"The Llava projector's {name} has weight shape {found}; LlavaForCausalLM's "
                f"mlp2x_gelu needs {shape} (text hidden size x vision hidden size)"
            )


# ---------------------------------------------------------------------------------------------
# A chat template as the Jinja text transformers' processors render (processor.chat_template).

# Message text: a plain string, or the processor's list of {"type": "image"} / {"type": "text"}
# items, rendered images first, each as "<image>\n", as llava.inference.with_image_tag does.
# Then llava.conversation.render_fixed, line for line; @NAME@ marks are filled in by Python.
JINJA_TEMPLATE = """{%- macro message_text(message) -%}
{%- if message['content'] is string -%}{{ message['content'] }}
{%- else -%}
{%- for item in message['content'] if item['type'] == 'image' -%}{{ @IMAGE_LINE@ }}{%- endfor -%}
{%- for item in message['content'] if item['type'] == 'video' -%}{{ @VIDEO_LINE@ }}{%- endfor -%}
{%- for item in message['content'] if item['type'] == 'text' -%}{{ item['text'] }}{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- macro user_text(message) -%}
{%- if @KEEP_USER_TEXT@ -%}{{ message_text(message) }}
{%- else -%}{{ @IMAGE_TAG@ * (message_text(message).count(@IMAGE_TAG@)) }}
{%- endif -%}
{%- endmacro -%}
{%- if messages and messages[0]['role'] == 'system' -%}
{%- set system = message_text(messages[0]) -%}{%- set dialog = messages[1:] -%}
{%- else -%}
{%- set system = @DEFAULT_SYSTEM@ -%}{%- set dialog = messages -%}
{%- endif -%}
{%- if system and not @SYSTEM_IN_FIRST_USER@ -%}{{ @SYSTEM_FORMAT@ }}{%- endif -%}
{%- set state = namespace(seen_user=false) -%}
{%- for message in dialog -%}
{%- if message['role'] == 'user' -%}
{%- set content = user_text(message) -%}
{%- if not state.seen_user and system and @SYSTEM_IN_FIRST_USER@ -%}
{%- set content = @SYSTEM_FORMAT@ + content -%}
{%- endif -%}
{%- if state.seen_user -%}{{ @USER_SEPARATOR@ }}{%- endif -%}
{{ @USER_FORMAT@ }}
{%- set state.seen_user = true -%}
{%- else -%}
{{ @ASSISTANT_HEADER@ + @ASSISTANT_FORMAT@ }}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ @ASSISTANT_HEADER@ }}{%- endif -%}"""

CONTENT_MARK = "\x00"  # stands for a format's field while the format is split around it


def format_expression(format_string: str, variable: str, bos: str, eos: str) -> str:
    """A Jinja expression equal to `fill(format_string, <variable>, bos, eos)`."""
    filled = fill(format_string, CONTENT_MARK, bos, eos)
    if CONTENT_MARK not in filled:
        return json.dumps(filled)
    before, after = filled.split(CONTENT_MARK, 1)
    return f"{json.dumps(before)} + {variable} + {json.dumps(after)}"


def jinja_chat_template(template: ChatTemplate, bos: str, eos: str) -> str:
    """Jinja that renders a conversation as `llava.conversation.render_text` does.

    BOS and EOS are the tokenizer's texts, written in; the leading BOS is left to the
    tokenizer, as in training. An `auto` template is the tokenizer's own chat_template.
    """
    if template.uses_tokenizer_template:
        raise ValueError("an 'auto' template is the tokenizer's own chat_template; use that")
    if not eos and "{eos}" in template.assistant_format:
        raise ValueError(
            f"template {template.name!r} ends answers with EOS; the tokenizer has none"
        )
    # json.dumps writes string literals and booleans that Jinja reads back unchanged.
    values = {
        "IMAGE_LINE": json.dumps(IMAGE_TOKEN + "\n"),
        "VIDEO_LINE": json.dumps(VIDEO_TOKEN + "\n"),
        "IMAGE_TAG": json.dumps(IMAGE_TOKEN),
        "KEEP_USER_TEXT": json.dumps(template.keep_user_text),
        "DEFAULT_SYSTEM": json.dumps(template.system),
        "SYSTEM_IN_FIRST_USER": json.dumps(template.system_in_first_user),
        "SYSTEM_FORMAT": format_expression(template.system_format, "system", bos, eos),
        "USER_SEPARATOR": json.dumps(fill(template.user_separator, bos=bos, eos=eos)),
        "USER_FORMAT": format_expression(template.user_format, "content", bos, eos),
        "ASSISTANT_HEADER": json.dumps(fill(template.assistant_header, bos=bos, eos=eos)),
        "ASSISTANT_FORMAT": format_expression(
            template.assistant_format, "message_text(message)", bos, eos
        ),
    }
    text = JINJA_TEMPLATE
    for name, value in values.items():
        text = text.replace(f"@{name}@", value)
    return text
