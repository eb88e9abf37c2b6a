"""One set of random weights and data for both systems: an LM, a CLIP tower, a projector file,
the same weights exported as a transformers Llava, the tokenizer, JPEGs and LLaVA JSON (and for
the anyres stage, an AnyRes projector with its newline and the same as a LlavaNext)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
)

from llava.bench.configs import ANYRES_STAGE, BenchConfig
from llava.bench.synthetic import build_tokenizer, write_data, write_images
from llava.compat import save_processor, save_tokenizer
from llava.constants import IMAGE_TOKEN
from llava.data.anyres_data import anyres_image_processor
from llava.model.builder import build_llava_model
from llava.model.hf_llava import hf_llava_config, hf_llava_state_dict
from llava.train.checkpoint import save_projector

PROJECTOR_TYPE = "mlp2x_gelu"
SELECT_LAYER = -2  # LLaVA-1.5's --mm_vision_select_layer


@dataclass(frozen=True)
class Assets:
    """Paths of everything a benchmark run reads."""

    folder: str

    def path(self, *parts: str) -> str:
        return os.path.join(self.folder, *parts)

    @property
    def llm(self) -> str:
        return self.path("llm")

    @property
    def clip(self) -> str:
        return self.path("clip")

    @property
    def projector(self) -> str:
        return self.path("projector", "mm_projector.bin")

    @property
    def hf_llava(self) -> str:
        return self.path("hf_llava")

    @property
    def anyres_projector(self) -> str:
        """The anyres stage's projector: the same linears, and the spatial_unpad newline."""
        return self.path("projector-anyres", "mm_projector.bin")

    @property
    def hf_llava_next(self) -> str:
        """The anyres stage's weights as transformers' LlavaNext, with its LlavaNextProcessor."""
        return self.path("hf_llava_next")

    @property
    def images(self) -> str:
        return self.path("images")

    def vlm(self, family: str) -> str:
        """A transformers image-text-to-text model of `family`, with its processor."""
        return self.path("vlm", family)

    def data(self, stage: str, part: str) -> str:
        """LLaVA JSON of a stage's `warmup` or `measure` records (finetune and lora share theirs;
        each image-text-to-text family has its own, sized to its image tokens)."""
        name = "finetune" if stage == "lora" else stage
        return self.path(f"{name}-{part}.json")


def llama_config(config: BenchConfig) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.text_width,
        intermediate_size=config.text_intermediate,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        num_key_value_heads=config.text_kv_heads,
        max_position_embeddings=max(2048, config.model_max_length),
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def clip_config(config: BenchConfig) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        image_size=config.image_size,
        patch_size=config.patch_size,
        hidden_size=config.vision_width,
        intermediate_size=config.vision_intermediate,
        num_hidden_layers=config.vision_layers,
        num_attention_heads=config.vision_heads,
    )


def clip_processor(config: BenchConfig) -> CLIPImageProcessor:
    side = config.image_size
    return CLIPImageProcessor(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}
    )


@contextmanager
def construction(config: BenchConfig) -> Iterator[None]:
    """Random weights made directly in the benchmark's dtype, on its GPU when there is one
    (a 7B model made in float32 on a CPU takes minutes and 28 GB)."""
    device = config.device if config.device != "cuda" or torch.cuda.is_available() else "cpu"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, config.dtype))
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def write_models(assets: Assets, config: BenchConfig, seed: int) -> None:
    """Random LM + tower + projector in this project's layout, and the same as HF Llava."""
    dtype = getattr(torch, config.dtype)
    tokenizer = build_tokenizer(config.vocab_size)
    torch.manual_seed(seed)
    with construction(config):
        llm, tower = LlamaForCausalLM(llama_config(config)), CLIPVisionModel(clip_config(config))
    llm.save_pretrained(assets.llm)
    save_tokenizer(tokenizer, assets.llm)
    tower.save_pretrained(assets.clip)
    clip_processor(config).save_pretrained(assets.clip)
    del llm, tower
    torch.manual_seed(seed + 1)
    ours = build_llava_model(
        assets.llm,
        assets.clip,
        mm_projector_type=PROJECTOR_TYPE,
        mm_vision_select_layer=SELECT_LAYER,
        torch_dtype=dtype,
    )
    save_projector(ours, os.path.dirname(assets.projector), write=True)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    with construction(config):
        hf_model = LlavaForConditionalGeneration(hf_llava_config(ours.config, image_token_id))
    missing, unexpected = hf_model.load_state_dict(
        hf_llava_state_dict(ours.state_dict()), strict=False
    )
    if missing or unexpected:
        raise RuntimeError(f"weight mapping incomplete: {missing} {unexpected}")
    hf_model.save_pretrained(assets.hf_llava)
    save_tokenizer(tokenizer, assets.hf_llava)
    clip_processor(config).save_pretrained(assets.hf_llava)


def write_anyres_models(assets: Assets, config: BenchConfig, seed: int) -> None:
    """The anyres stage's projector (over the LM and tower write_models wrote) and the same
    weights as a LlavaNext folder with the processor export_hf would write."""
    tokenizer = build_tokenizer(config.vocab_size)
    torch.manual_seed(seed + 1)
    ours = build_llava_model(
        assets.llm,
        assets.clip,
        mm_projector_type=PROJECTOR_TYPE,
        mm_vision_select_layer=SELECT_LAYER,
        torch_dtype=getattr(torch, config.dtype),
        image_aspect_ratio="anyres",
        image_grid_pinpoints=config.anyres_pinpoints,
        mm_patch_merge_type="spatial_unpad",
    )
    save_projector(ours, os.path.dirname(assets.anyres_projector), write=True)
    hf_config = hf_llava_config(ours.config, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    with construction(config):
        hf_model = LlavaNextForConditionalGeneration(hf_config)
    missing, unexpected = hf_model.load_state_dict(
        hf_llava_state_dict(ours.state_dict()), strict=False
    )
    if missing or unexpected:
        raise RuntimeError(f"weight mapping incomplete: {missing} {unexpected}")
    hf_model.save_pretrained(assets.hf_llava_next)
    geometry = ours.vision_tower.geometry
    processor = LlavaNextProcessor(  # as llava.export_hf.hf_processor makes it
        image_processor=anyres_image_processor(clip_processor(config), ours.anyres),
        tokenizer=tokenizer,
        patch_size=geometry.patch_size,
        vision_feature_select_strategy=hf_config.vision_feature_select_strategy,
        num_additional_image_tokens=int(geometry.has_cls_token),
        image_token=IMAGE_TOKEN,
    )
    save_processor(processor, assets.hf_llava_next)


def write_assets(
    folder: str, config: BenchConfig, stages: list[str], warmup: int, steps: int, seed: int = 0
) -> Assets:
    """Models, images and each stage's warmup and measured records (batch_size per step).
    The anyres stage's conversations have the finetune stage's text budget beside images of
    up to its largest tile grid's tokens."""
    assets = Assets(folder)
    write_models(assets, config, seed)
    if ANYRES_STAGE in stages:
        write_anyres_models(assets, config, seed)
    write_images(assets.images, config, seed)
    for stage in stages:
        stage_config, image_tokens = config, None
        if stage == ANYRES_STAGE:
            stage_config = replace(config, model_max_length=config.anyres_max_length)
            image_tokens = config.anyres_max_image_tokens
        for part, count, data_seed in (
            ("warmup", warmup, seed + 10),
            ("measure", steps, seed + 20),
        ):
            count *= config.batch_size
            path = write_data(folder, stage, count, stage_config, data_seed, image_tokens)
            os.replace(path, assets.data(stage, part))
    return assets
