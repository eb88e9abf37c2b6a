"""The shell flags: the original LLaVA-1.5 names and meanings, plus the new ones, with help text."""

from __future__ import annotations

from dataclasses import dataclass, field

import transformers


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Causal LM checkpoint (path or hub name)."})
    version: str = field(
        default="v1",
        metadata={"help": "Chat template: plain (stage 1), v1/vicuna_v1, llava_llama_2, ..."},
    )
    vision_tower: str | None = field(
        default=None,
        metadata={"help": "HF CLIP/SigLIP checkpoint, or open_clip:<name or local-dir:PATH>."},
    )
    vision_tower_pretrained: str | None = field(
        default=None, metadata={"help": "Weights file for an open_clip tower given by name."}
    )
    mm_vision_select_layer: int = field(
        default=-1, metadata={"help": "Which hidden state of the tower feeds the projector."}
    )
    mm_vision_select_feature: str = field(
        default="patch", metadata={"help": "patch (drop CLS) or cls_patch."}
    )
    mm_projector_type: str = field(
        default="linear", metadata={"help": "linear, identity or mlp{N}x_gelu."}
    )
    pretrain_mm_mlp_adapter: str | None = field(
        default=None, metadata={"help": "mm_projector.bin from stage 1 to start the projector."}
    )
    tune_mm_mlp_adapter: bool = field(
        default=False, metadata={"help": "Stage 1: train only the projector."}
    )
    freeze_backbone: bool = field(
        default=False, metadata={"help": "Keep the language model frozen in stage 2."}
    )
    tune_vision_tower: bool = field(
        default=False, metadata={"help": "Also train the vision tower (frozen by default)."}
    )
    mm_use_im_start_end: bool = field(
        default=False, metadata={"help": "Wrap each image in <im_start>/<im_end> tokens."}
    )
    mm_use_im_patch_token: bool = field(
        default=True,
        metadata={"help": "Accepted for compatibility; image placeholders need no vocab entry."},
    )
    mm_patch_merge_type: str = field(
        default="flat", metadata={"help": "Accepted for compatibility; only 'flat' exists."}
    )
    attn_implementation: str = field(
        default="sdpa", metadata={"help": "sdpa, flash_attention_2 or eager."}
    )


@dataclass
class DataArguments:
    data_path: str | None = field(
        default=None, metadata={"help": "LLaVA JSON/JSONL, messages JSONL, or a local HF dataset."}
    )
    image_folder: str | None = field(default=None, metadata={"help": "Root of image paths."})
    image_aspect_ratio: str = field(
        default="square", metadata={"help": "pad (to a square of the mean colour) or square."}
    )
    lazy_preprocess: bool = field(
        default=False, metadata={"help": "Accepted for compatibility; data is always lazy."}
    )
    is_multimodal: bool = field(default=False, metadata={"help": "Accepted for compatibility."})
    dataset_text_field: str | None = field(
        default=None, metadata={"help": "Column with the text or messages of a dataset."}
    )
    dataset_image_field: str | None = field(
        default=None, metadata={"help": "Column with the images of a dataset."}
    )
    validation_split_percentage: float = field(
        default=0.0,
        metadata={
            "help": "Hold out this percentage of the data (seeded) and report its loss and "
            "perplexity at each --eval_strategy point, or once at the end when it is 'no'."
        },
    )
    skip_bad_records: bool = field(
        default=False, metadata={"help": "Skip (and count) bad records instead of failing."}
    )


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    cache_dir: str | None = field(default=None)
    optim: str = field(default="adamw_torch")
    remove_unused_columns: bool = field(default=False)
    model_max_length: int = field(
        default=512, metadata={"help": "Longest sequence, image placeholders included."}
    )
    freeze_mm_mlp_adapter: bool = field(default=False, metadata={"help": "Freeze the projector."})
    mpt_attn_impl: str | None = field(default="triton", metadata={"help": "Ignored (MPT only)."})
    double_quant: bool = field(default=True, metadata={"help": "QLoRA double quantisation."})
    quant_type: str = field(default="nf4", metadata={"help": "QLoRA 4-bit type: nf4 or fp4."})
    bits: int = field(default=16, metadata={"help": "16 (no quantisation), 8 or 4 (QLoRA)."})
    lora_enable: bool = field(default=False, metadata={"help": "Train LoRA adapters."})
    lora_r: int = field(default=64)
    lora_alpha: int = field(default=16)
    lora_dropout: float = field(default=0.05)
    lora_weight_path: str = field(default="")
    lora_bias: str = field(default="none", metadata={"help": "none, all or lora_only."})
    lora_target_modules: str | None = field(
        default=None,
        metadata={"help": "Comma-separated module names; default: every linear of the LM."},
    )
    mm_projector_lr: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the projector (default: --learning_rate)."},
    )
    group_by_modality_length: bool = field(
        default=False, metadata={"help": "Batches of one modality and similar lengths."}
    )
    evaluation_strategy: str | None = field(
        default=None,
        metadata={"help": "The original scripts' name for --eval_strategy (removed upstream)."},
    )

    def __post_init__(self):
        if self.evaluation_strategy is not None:
            self.eval_strategy = self.evaluation_strategy
        super().__post_init__()
        if self.bits not in (4, 8, 16):
            raise ValueError(f"--bits must be 4, 8 or 16, not {self.bits}")
        if self.lora_bias not in ("none", "all", "lora_only"):
            raise ValueError(f"--lora_bias must be none, all or lora_only, not {self.lora_bias!r}")


def parse_arguments(
    args: list[str] | None = None,
) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """Parse the command line; unknown flags are an error that names them."""
    parser = transformers.HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=args)
    return model_args, data_args, training_args
