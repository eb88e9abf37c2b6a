"""The shell flags: the original LLaVA-1.5 names and meanings, plus the new ones, with help text.

Flags with a closed set of values are checked when the arguments are parsed, before any file is
read, with an error that names the flag and the allowed values.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field

import accelerate
import transformers
from transformers.hf_argparser import string_to_bool

from llava.compat import restored_training_fields
from llava.conversation import TEMPLATES
from llava.data.images import ASPECT_RATIOS, DEFAULT_MAX_IMAGE_PIXELS
from llava.data.media import SELECT_FEATURES, is_anyres
from llava.model.projector import split_projector_type

PATCH_MERGE_TYPES = ("flat", "spatial_unpad")
PROJECTOR_TYPES = (
    "linear",
    "identity",
    "mlp{N}x_gelu (N >= 1, e.g. mlp2x_gelu)",
    "REDUCTION+any of those (REDUCTION: spatial_pool{K}, spatial_pool{K}_bilinear or "
    "pixel_shuffle{K}, K >= 2)",
)
# anyres as a closed set's member, for the error (any N >= 1 is taken)
ASPECT_CHOICES = (*ASPECT_RATIOS, "anyres", "anyres_max_N")
LORA_BIASES = ("none", "all", "lora_only")
QUANT_TYPES = ("nf4", "fp4")
BITS = (4, 8, 16)


def check_choice(flag: str, value: object, allowed: tuple) -> None:
    """A flag's value must be one of `allowed`; the error names the flag and every choice."""
    if value not in allowed:
        choices = ", ".join(str(choice) for choice in allowed)
        raise ValueError(f"--{flag} must be one of {choices}, not {value!r}")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Causal LM checkpoint (path or hub name)."})
    version: str | None = field(
        default=None,
        metadata={
            "help": "Chat template: plain (stage 1), v1/vicuna_v1, llava_llama_2, ..., auto (the "
            "tokenizer's own). Default: auto for a model with its own processor (a transformers "
            "image-text-to-text checkpoint), v1 otherwise."
        },
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
        default="linear",
        metadata={
            "help": "linear, identity or mlp{N}x_gelu, optionally after a token reduction: "
            "spatial_pool{K}[_bilinear]+HEAD or pixel_shuffle{K}+HEAD (K x K cells to one token)."
        },
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
        default="flat",
        metadata={
            "help": "With --image_aspect_ratio anyres: spatial_unpad (LLaVA-NeXT's tiles as one "
            "unpadded grid, a learned newline per row) or flat (every tile's features in order)."
        },
    )
    image_grid_pinpoints: str | None = field(
        default=None,
        metadata={
            "help": "With --image_aspect_ratio anyres: the resolutions images are tiled into, a "
            "range of tile grids as LLaVA-NeXT writes it, (1x1),...,(3x3), or a list of "
            "(height, width) pixels, [(336, 672), (672, 336), (672, 672)]."
        },
    )
    video_frames: int | None = field(
        default=None,
        metadata={
            "help": "With --image_aspect_ratio anyres or anyres_max_N: the model takes videos "
            "(a record's `video` field, a <video> tag), this many frames sampled uniformly."
        },
    )
    video_pool_stride: int = field(
        default=2,
        metadata={
            "help": "With --video_frames: each frame's patch grid shrunk by this factor "
            "(bilinear, OneVision's 2); 1 keeps every patch."
        },
    )

    def __post_init__(self):
        if self.version is not None:
            check_choice("version", self.version, tuple(TEMPLATES))
        check_choice("mm_vision_select_feature", self.mm_vision_select_feature, SELECT_FEATURES)
        check_choice("mm_patch_merge_type", self.mm_patch_merge_type, PATCH_MERGE_TYPES)
        try:
            split_projector_type(self.mm_projector_type)
        except ValueError:
            check_choice("mm_projector_type", self.mm_projector_type, PROJECTOR_TYPES)


@dataclass
class DataArguments:
    data_path: str | None = field(
        default=None,
        metadata={
            "help": "LLaVA JSON/JSONL, messages JSONL, a local HF dataset, or webdataset-style "
            "tar shards: 'shards/{000..099}.tar' (quoted; see finetuning_data/README.md)."
        },
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
        default=False,
        metadata={
            "help": "Skip bad records instead of failing: they are counted, listed in "
            "output_dir/skipped_records.jsonl, and the run ends with their total."
        },
    )
    max_image_pixels: int = field(
        default=DEFAULT_MAX_IMAGE_PIXELS,
        metadata={
            "help": "Images with more pixels are bad records (Pillow's decompression-bomb "
            "limit by default; 0: no limit)."
        },
    )
    preprocessing_num_workers: int | None = field(
        default=None,
        metadata={
            "help": "Processes that tokenize a large LLaVA .json at the first start (the "
            "length cache serves later ones); default: every CPU this process may use."
        },
    )

    vision_feature_cache: str | None = field(
        default=None,
        metadata={
            "help": "A folder written by python -m llava.data.cache_features: the frozen "
            "tower's features are read from it instead of decoding images and running the "
            "tower (checked against the tower and preprocessing at start)."
        },
    )

    def __post_init__(self):
        if not is_anyres(self.image_aspect_ratio):
            check_choice("image_aspect_ratio", self.image_aspect_ratio, ASPECT_CHOICES)
        if self.preprocessing_num_workers is not None and self.preprocessing_num_workers < 1:
            raise ValueError(
                f"--preprocessing_num_workers must be 1 or more, not {self.preprocessing_num_workers}"
            )
        if self.max_image_pixels < 0:
            raise ValueError(
                f"--max_image_pixels must be 0 (no limit) or more, not {self.max_image_pixels}"
            )
        if not 0 <= self.validation_split_percentage < 100:
            raise ValueError(
                "--validation_split_percentage must be at least 0 and below 100, not "
                f"{self.validation_split_percentage}"
            )


PACKINGS = ("none", "rows", "flat")
FLAT_PACKING_ATTENTION = ("sdpa_packed", "flash_attention_2")


@dataclass
class LlavaTrainingFields:
    """LLaVA's training flags, on top of the trainer's own (transformers' or optimum-habana's)."""

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
    pad_max: bool = field(
        default=False,
        metadata={"help": "Pad every batch to --model_max_length (static shapes, as on Gaudi)."},
    )
    packing: str = field(
        default="none",
        metadata={
            "help": "none (pad each batch), rows (pack a batch into rows as long as its longest "
            "sample; any attention) or flat (one row per batch; needs --attn_implementation "
            "sdpa_packed or flash_attention_2)."
        },
    )
    peak_tflops: float | None = field(
        default=None,
        metadata={
            "help": "Dense peak TFLOP/s for the logged MFU (default: a table per device: CPU "
            "fp32 0.19, H100 bf16 989)."
        },
    )
    num_length_buckets: int = field(
        default=0,
        metadata={
            "help": "Pad batches up to one of this many evenly spaced lengths up to "
            "--model_max_length (0: to the longest sample; on Gaudi the default is 8)."
        },
    )
    ignore_checkpoint_flags: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated data flags (data_path, image_folder, world_size, ...) that "
            "may differ from the resumed checkpoint's; model flags must always match."
        },
    )

    def __post_init__(self):
        if self.evaluation_strategy is not None:
            self.eval_strategy = self.evaluation_strategy
        check_choice("bits", self.bits, BITS)
        check_choice("lora_bias", self.lora_bias, LORA_BIASES)
        check_choice("quant_type", self.quant_type, QUANT_TYPES)
        check_choice("packing", self.packing, PACKINGS)
        super().__post_init__()
        if self.num_length_buckets < 0:
            raise ValueError(
                f"--num_length_buckets must be 0 or more, not {self.num_length_buckets}"
            )
        attention = getattr(self, "attn_implementation", "sdpa")
        if self.packing == "flat" and attention not in FLAT_PACKING_ATTENTION:
            raise ValueError(
                f"--packing flat needs --attn_implementation sdpa_packed or flash_attention_2, "
                f"not {attention!r} (plain sdpa would mask a T x T product over the whole row; "
                "use --packing rows)"
            )
        if self.packing != "none" and (self.pad_max or self.num_length_buckets):
            raise ValueError(
                "--packing needs dynamic shapes: drop --pad_max / --num_length_buckets"
            )


# Gaudi flags that only optimum-habana's arguments can act on. On the GPU/CPU path they parse
# (so one script serves both) and must stay off.
HABANA_ONLY_FLAGS = (
    "use_habana",
    "use_lazy_mode",
    "gaudi_config_name",
    "use_hpu_graphs_for_training",
    "use_hpu_graphs_for_inference",
)


@dataclass
class HabanaFlags:
    """optimum-habana's flags, accepted off Gaudi; `--use_habana` switches to its arguments."""

    use_habana: bool = field(
        default=False, metadata={"help": "Train on Gaudi HPUs through optimum-habana."}
    )
    use_lazy_mode: bool = field(default=False, metadata={"help": "Gaudi lazy mode (graphs)."})
    gaudi_config_name: str | None = field(
        default=None, metadata={"help": "GaudiConfig file or name (fused AdamW, clip norm, ...)."}
    )
    use_hpu_graphs_for_training: bool = field(default=False, metadata={"help": "Gaudi only."})
    use_hpu_graphs_for_inference: bool = field(default=False, metadata={"help": "Gaudi only."})

    def __post_init__(self):
        wrongly_on = [name for name in HABANA_ONLY_FLAGS if getattr(self, name)]
        if wrongly_on:
            flags = ", ".join(f"--{name}" for name in wrongly_on)
            raise ValueError(
                f"{flags} act only on Gaudi: pass --use_habana True on a machine with "
                "optimum-habana and the Habana stack (parse_arguments then picks its arguments)"
            )
        super().__post_init__()


@dataclass
class TrainingArguments(
    LlavaTrainingFields, HabanaFlags, restored_training_fields(), transformers.TrainingArguments
):
    """Training arguments for GPU and CPU runs (transformers' Trainer).

    `--attn_implementation` lives here because optimum-habana's arguments have their own
    (eager, sdpa, gaudi_fused_sdpa): one flag, whichever path parses it.
    """

    attn_implementation: str = field(
        default="sdpa",
        metadata={
            "help": "sdpa, sdpa_packed (sdpa per packed sample), flash_attention_2 (when "
            "installed) or eager."
        },
    )


def wants_gaudi(argv: list[str]) -> bool:
    """Whether the command line asks for Gaudi (`--use_habana`, `--use_habana True`, ...)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--use_habana", type=string_to_bool, nargs="?", const=True, default=False)
    known, _ = parser.parse_known_args(argv)
    return known.use_habana


def training_arguments_class(gaudi: bool) -> type:
    """This module's TrainingArguments, or the same LLaVA fields on optimum-habana's."""
    if not gaudi:
        return TrainingArguments
    from llava.train.gaudi import gaudi_training_arguments_class

    return gaudi_training_arguments_class()


def parse_arguments(
    args: list[str] | None = None, gaudi: bool | None = None
) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """Parse the command line; unknown flags are an error that names them.

    `gaudi` (default: whether --use_habana is on) picks optimum-habana's GaudiTrainingArguments
    as the base of the training arguments; it is imported only then.
    """
    argv = sys.argv[1:] if args is None else list(args)
    if gaudi is None:
        gaudi = wants_gaudi(argv)
    training_class = training_arguments_class(gaudi)
    parser = transformers.HfArgumentParser((ModelArguments, DataArguments, training_class))
    try:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    except ModuleNotFoundError as error:  # optimum-habana sets up the HPU while parsing
        if gaudi and (error.name or "").startswith("habana_frameworks"):
            raise RuntimeError(
                "--use_habana needs the Habana PyTorch bridge (habana_frameworks), which only "
                "the Intel Gaudi software stack installs: run on a Gaudi machine"
            ) from error
        raise
    check_world_size(training_args)
    return model_args, data_args, training_args


def check_world_size(training_args: TrainingArguments) -> None:
    """The launcher's process count must be the one the training arguments saw.

    accelerate 1.13 and later count a DeepSpeed run on a machine without GPUs as one process,
    so every batch size derived from it (DeepSpeed's train_batch_size) would be wrong.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if training_args.deepspeed and training_args.world_size != launched:
        raise RuntimeError(
            f"The launcher started {launched} processes but the training arguments see "
            f"{training_args.world_size}: accelerate {accelerate.__version__} does not run "
            "DeepSpeed on a machine without accelerators; install accelerate<1.13 "
            "(pip install -e . does)"
        )
