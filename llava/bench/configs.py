"""Benchmark configurations: model shapes, batch and data sizes for `python -m llava.bench`."""

from __future__ import annotations

from dataclasses import dataclass

from llava.data.media import AnyRes, ImageGeometry, anyres_of

STAGES = ("pretrain", "finetune", "lora")
# LLaVA-NeXT's AnyRes stage 2 (tiles, spatial_unpad) against transformers' LlavaNext + Trainer;
# not part of `--stage all` (llava/bench/anyres_bench.py).
ANYRES_STAGE = "anyres"
# transformers image-text-to-text families, each a stage of its own: full fine-tuning of the
# family's model against TRL's SFTTrainer (llava/bench/vlm_models.py, trl_baseline.py).
VLM_STAGES = ("idefics3", "qwen2_vl")
VLM_GROUP = "vlm"  # --stage vlm: every family in VLM_STAGES


def system_name(run: dict) -> str:
    """How a run's system is printed: ours, baseline (transformers' Llava + Trainer) or trl."""
    if run["system"] == "baseline" and run["stage"] in VLM_STAGES:
        return "trl"
    return run["system"]


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark setting: a CLIP tower, a Llama LM, the batch, the data and the device."""

    name: str
    # vision tower (CLIP)
    image_size: int
    patch_size: int
    vision_layers: int
    vision_width: int
    vision_heads: int
    vision_intermediate: int
    # language model (Llama)
    text_layers: int
    text_width: int
    text_heads: int
    text_kv_heads: int
    text_intermediate: int
    vocab_size: int
    # training
    batch_size: int
    model_max_length: int
    dtype: str = "float32"  # float32 on CPU (bf16 matmuls are slower there), bfloat16 on GPU
    device: str = "cpu"
    lora_r: int = 128  # LLaVA-1.5's finetune_lora.sh
    lora_alpha: int = 256
    gradient_checkpointing: bool = False
    # synthetic data: words per caption and per conversation answer (min, max)
    caption_words: tuple[int, int] = (4, 40)
    max_turns: int = 8
    source_image_sizes: tuple[int, int] = (256, 640)  # side lengths of the JPEGs written
    # the anyres stage: grids of the tower's tiles (LLaVA-NeXT's --image_grid_pinpoints)
    anyres_pinpoints: str = "(1x1),...,(2x2)"

    @property
    def tile(self) -> ImageGeometry:
        size = (self.image_size, self.image_size)
        return ImageGeometry(size, self.patch_size, has_cls_token=True)

    @property
    def num_image_tokens(self) -> int:
        """A CLIP tower's patches (LLaVA-1.5 drops its CLS feature)."""
        return self.tile.num_image_tokens

    @property
    def anyres(self) -> AnyRes:
        """The anyres stage's tiling: LLaVA-NeXT's, rows closed by a newline (spatial_unpad)."""
        return anyres_of("anyres", self.anyres_pinpoints, "spatial_unpad", self.tile)

    @property
    def anyres_max_image_tokens(self) -> int:
        """The most tokens an image takes in the anyres stage: one that fills the largest
        pinpoint exactly (nothing unpadded)."""
        return max(self.anyres.num_image_tokens((w, h)) for h, w in self.anyres.pinpoints)

    @property
    def anyres_max_length(self) -> int:
        """The anyres stage's model_max_length: the finetune stage's text budget beside the
        largest image."""
        return self.model_max_length - self.num_image_tokens + self.anyres_max_image_tokens


CONFIGS: dict[str, BenchConfig] = {
    # For tests: seconds per run.
    "tiny": BenchConfig(
        name="tiny",
        image_size=32,
        patch_size=8,
        vision_layers=2,
        vision_width=32,
        vision_heads=2,
        vision_intermediate=64,
        text_layers=2,
        text_width=64,
        text_heads=4,
        text_kv_heads=4,
        text_intermediate=128,
        vocab_size=1000,
        batch_size=4,
        model_max_length=128,
        lora_r=8,
        lora_alpha=16,
        caption_words=(2, 10),
        max_turns=3,
        source_image_sizes=(32, 64),
    ),
    # CPU: CLIP 224 px / patch 14 (256 image tokens), 4 layers of width 256; Llama 4 layers of
    # width 512 with a 32000-word vocabulary.
    "small": BenchConfig(
        name="small",
        image_size=224,
        patch_size=14,
        vision_layers=4,
        vision_width=256,
        vision_heads=4,
        vision_intermediate=1024,
        text_layers=4,
        text_width=512,
        text_heads=8,
        text_kv_heads=8,
        text_intermediate=1376,
        vocab_size=32000,
        batch_size=8,
        model_max_length=1024,
        lora_r=16,  # LLaVA's r=128 at width 4096, scaled to width 512
        lora_alpha=32,
    ),
    # GPU: LLaVA-1.5-7B shapes (CLIP ViT-L/14-336 + Llama-2-7B / Vicuna-7B), random weights.
    "7b": BenchConfig(
        name="7b",
        image_size=336,
        patch_size=14,
        vision_layers=24,
        vision_width=1024,
        vision_heads=16,
        vision_intermediate=4096,
        text_layers=32,
        text_width=4096,
        text_heads=32,
        text_kv_heads=32,
        text_intermediate=11008,
        vocab_size=32000,
        batch_size=16,
        model_max_length=2048,
        dtype="bfloat16",
        device="cuda",
        gradient_checkpointing=True,
    ),
}
