"""transformers image-text-to-text models for the benchmark, built offline from a BenchConfig's
shapes: a Qwen2-VL and an Idefics3 (SmolVLM's architecture), random weights, a word-level
tokenizer with the family's special tokens, the family's processor, and a chat template that
renders as the real model's does with each answer inside `{% generation %}` (the markers TRL's
assistant-only loss reads; this project's data path renders through them unchanged).

The vision tower takes the config's CLIP shapes (layers, width, heads, MLP), the language model
its Llama shapes; images are sized by the family's own processor:
- qwen2_vl: patch `patch_size`, 2x2 patches merged into a token, each image resized (aspect kept)
  to at most `num_image_tokens` tokens (256 for `small`: a 448 px square);
- idefics3: `image_size` tiles (patch `patch_size`, pixel shuffle 2: a quarter of the patches
  as tokens, 64 for `small`), images resized to a longest edge of two tiles and split into up
  to 2x2 tiles plus a global view, as SmolVLM splits its 512 px tiles.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from llava.bench.configs import BenchConfig
from llava.bench.synthetic import NUM_SOURCE_IMAGES, make_records, vocabulary, write_images
from llava.constants import IMAGE_TOKEN

# Jinja pieces shared by the templates: a message's content, a string or parts, with `image`
# written for each image part; and whether it opens with an image.
RENDER_CONTENT = (
    "{%- macro render_content(content, image) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] == 'image' -%}{{ image }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)

# Qwen2-VL-Instruct's rendering: a default system prompt, ChatML turns, each image as
# <|vision_start|><|image_pad|><|vision_end|>. The answer and its <|im_end|> are generated.
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
QWEN2_VL_TEMPLATE = RENDER_CONTENT + (
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}"
    "{{ render_content(message['content'], '" + QWEN_IMAGE + "') + '<|im_end|>' }}"
    "{%- endgeneration -%}"
    "{{ '\\n' }}"
    "{%- else -%}"
    "{{ render_content(message['content'], '" + QWEN_IMAGE + "') + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# SmolVLM / Idefics3's rendering: "<|im_start|>User:<image>Hi<end_of_utterance>\nAssistant:
# Hello<end_of_utterance>\n" (no space after the colon when the content opens with an image).
# The answer (with its leading space) and <end_of_utterance> are generated.
IDEFICS3_TEMPLATE = RENDER_CONTENT + (
    "{{ '<|im_start|>' }}"
    "{%- for message in messages -%}"
    "{%- set content = message['content'] -%}"
    "{%- set opens_with_image = content is not string and content"
    " and content[0]['type'] == 'image' -%}"
    "{%- set space = '' if opens_with_image else ' ' -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ 'Assistant:' }}"
    "{%- generation -%}"
    "{{ space + render_content(content, '<image>') + '<end_of_utterance>' }}"
    "{%- endgeneration -%}"
    "{{ '\\n' }}"
    "{%- else -%}"
    "{{ message['role'] | capitalize + ':' + space + render_content(content, '<image>') }}"
    "{{ '<end_of_utterance>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
)


@dataclass(frozen=True)
class Family:
    """What the benchmark needs of a family: its tokens, chat template, model and processor.

    named: bos/eos/pad/unk as the tokenizer declares them; unknown: the word the word-level
    model falls back to; special: other added tokens; extra: model-specific names the processor
    reads (image_token, ...); words: the plain words the template writes.
    """

    named: dict[str, str]
    unknown: str
    special: tuple[str, ...]
    words: str
    chat_template: str
    build: Callable[[BenchConfig, Any], tuple[Any, Any]]  # (config, tokenizer) -> model, processor
    max_image_tokens: Callable[[BenchConfig], int]  # the most tokens one image can take
    extra: dict[str, str] = field(default_factory=dict)

    def special_tokens(self) -> list[str]:
        return list(dict.fromkeys([*self.named.values(), self.unknown, *self.special]))


def build_tokenizer(family: Family, vocab_size: int) -> Any:
    """A whitespace word-level fast tokenizer: the family's special tokens, the template's words,
    then the synthetic vocabulary (llava.bench.synthetic), so every sampled word is known."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = family.special_tokens()
    words = dict.fromkeys(family.words.split() + vocabulary(vocab_size))
    vocab = {
        token: index for index, token in enumerate(special + [w for w in words if w not in special])
    }
    backend = Tokenizer(models.WordLevel(vocab, unk_token=family.unknown))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        chat_template=family.chat_template,
        extra_special_tokens=dict(family.extra) or None,
        model_input_names=["input_ids", "attention_mask"],
        **family.named,
    )


def token_ids(tokenizer: Any, **names: str) -> dict[str, int]:
    """Config entries (e.g. image_token_id="<image>") as ids in `tokenizer`."""
    return {key: tokenizer.convert_tokens_to_ids(token) for key, token in names.items()}


def text_config(config: BenchConfig, tokenizer: Any, **extra: Any) -> dict[str, Any]:
    """The language model's shapes from the config's Llama fields, ids from the tokenizer."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=config.text_width,
        intermediate_size=config.text_intermediate,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        num_key_value_heads=config.text_kv_heads,
        max_position_embeddings=max(2048, config.model_max_length),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


# -- Qwen2-VL ---------------------------------------------------------------------------------
QWEN_MERGE = 2  # 2x2 patches make one token


def mrope_section(head_dim: int) -> list[int]:
    """Multimodal rope's (time, height, width) split of head_dim / 2 frequencies, in Qwen2-VL's
    proportions (16, 24, 24 of 64)."""
    half = head_dim // 2
    spatial = (half - half // 4) // 2
    return [half - 2 * spatial, spatial, spatial]


def qwen2_vl_max_image_tokens(config: BenchConfig) -> int:
    return config.num_image_tokens + 2  # <|vision_start|> ... <|vision_end|>


def build_qwen2_vl(config: BenchConfig, tokenizer: Any) -> tuple[Any, Any]:
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    head_dim = config.text_width // config.text_heads
    rope = dict(rope_type="default", mrope_section=mrope_section(head_dim))
    model_config = Qwen2VLConfig(
        vision_config=dict(
            depth=config.vision_layers,
            embed_dim=config.vision_width,
            num_heads=config.vision_heads,
            mlp_ratio=config.vision_intermediate // config.vision_width,
            hidden_size=config.text_width,  # the merger's output: the language model's width
            patch_size=config.patch_size,
            spatial_merge_size=QWEN_MERGE,
        ),
        text_config=text_config(config, tokenizer, rope_parameters=rope),
        **token_ids(
            tokenizer,
            image_token_id="<|image_pad|>",
            video_token_id="<|video_pad|>",
            vision_start_token_id="<|vision_start|>",
            vision_end_token_id="<|vision_end|>",
        ),
    )
    token_side = config.patch_size * QWEN_MERGE
    sizes = dict(
        patch_size=config.patch_size,
        merge_size=QWEN_MERGE,
        min_pixels=4 * token_side**2,
        max_pixels=config.num_image_tokens * token_side**2,
    )
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**sizes),
        video_processor=Qwen2VLVideoProcessor(**sizes),
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
    )
    return Qwen2VLForConditionalGeneration(model_config), processor


QWEN2_VL = Family(
    named=dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
    unknown="<|endoftext|>",
    special=("<|im_start|>",),
    extra=dict(
        image_token="<|image_pad|>",
        video_token="<|video_pad|>",
        vision_start_token="<|vision_start|>",
        vision_end_token="<|vision_end|>",
    ),
    words="system You are a helpful assistant . user",
    chat_template=QWEN2_VL_TEMPLATE,
    build=build_qwen2_vl,
    max_image_tokens=qwen2_vl_max_image_tokens,
)


# -- Idefics3 ---------------------------------------------------------------------------------
IDEFICS3_SCALE = 2  # pixel shuffle: 2x2 patches make one token
IDEFICS3_TILES = 2  # images resized to a longest edge of 2 tiles: up to 2x2 tiles


def idefics3_tile_tokens(config: BenchConfig) -> int:
    return config.num_image_tokens // IDEFICS3_SCALE**2


def idefics3_max_image_tokens(config: BenchConfig) -> int:
    """Each tile and the global view: its tokens, a <fake_token_around_image> and a
    <row_i_col_j> (or <global-img>) before them; one closing <fake_token_around_image>."""
    views = IDEFICS3_TILES**2 + 1
    return views * (idefics3_tile_tokens(config) + 2) + 1


def build_idefics3(config: BenchConfig, tokenizer: Any) -> tuple[Any, Any]:
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
    )

    model_config = Idefics3Config(
        vision_config=dict(
            image_size=config.image_size,
            patch_size=config.patch_size,
            hidden_size=config.vision_width,
            intermediate_size=config.vision_intermediate,
            num_hidden_layers=config.vision_layers,
            num_attention_heads=config.vision_heads,
        ),
        text_config=text_config(config, tokenizer, model_type="llama"),
        scale_factor=IDEFICS3_SCALE,
        **token_ids(tokenizer, image_token_id="<image>"),
    )
    image_processor = Idefics3ImageProcessor(
        do_image_splitting=True,
        size={"longest_edge": IDEFICS3_TILES * config.image_size},
        max_image_size={"longest_edge": config.image_size},
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=idefics3_tile_tokens(config),
        chat_template=tokenizer.chat_template,
    )
    return Idefics3ForConditionalGeneration(model_config), processor


IDEFICS3 = Family(
    named=dict(
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    ),
    unknown="<|endoftext|>",
    special=(
        "<fake_token_around_image>",
        "<image>",
        "<global-img>",
        *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)),
    ),
    words="User Assistant :",
    chat_template=IDEFICS3_TEMPLATE,
    build=build_idefics3,
    max_image_tokens=idefics3_max_image_tokens,
)

FAMILIES: dict[str, Family] = {"idefics3": IDEFICS3, "qwen2_vl": QWEN2_VL}


# -- writing ----------------------------------------------------------------------------------
def write_vlm_model(folder: str, family: str, config: BenchConfig, seed: int = 0) -> None:
    """config.json, random weights and the processor files of `family` at `config`'s shapes."""
    from llava.bench.assets import construction

    spec = FAMILIES[family]
    tokenizer = build_tokenizer(spec, config.vocab_size)
    torch.manual_seed(seed)
    with construction(config):
        model, processor = spec.build(config, tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def with_images(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every record with an image: the few text-only conversations get one before their first
    question. (In transformers 5.25, Idefics3's processor fails under TRL's assistant-only
    collator on a batch whose first sample has no image: its text_replacement_offsets start
    with an empty list and are taken for a tensor.)"""
    for index, record in enumerate(records):
        if not record.get("image"):
            record["image"] = f"{index % NUM_SOURCE_IMAGES:03d}.jpg"
            first = record["conversations"][0]
            first["value"] = IMAGE_TOKEN + "\n" + first["value"]
    return records


def write_vlm_assets(
    folder: str, config: BenchConfig, families: list[str], warmup: int, steps: int, seed: int = 0
) -> None:
    """Each family's model and its warm-up and measured conversations (batch_size per step),
    each with an image, over the same JPEGs as the LLaVA stages; the conversations leave room
    for the family's image tokens."""
    from llava.bench.assets import Assets

    assets = Assets(folder)
    write_images(assets.images, config, seed)
    for family in families:
        write_vlm_model(assets.vlm(family), family, config, seed)
        image_tokens = FAMILIES[family].max_image_tokens(config)
        for part, count, data_seed in (
            ("warmup", warmup, seed + 10),
            ("measure", steps, seed + 20),
        ):
            records = make_records(
                family, count * config.batch_size, config, data_seed, image_tokens
            )
            with open(assets.data(family, part), "w") as f:
                json.dump(with_images(records), f)
