"""What differs between the two supported transformers lines (4.55 for Gaudi, 5.x elsewhere).

Everything the rest of the code needs from transformers that the two lines spell differently
lives here, behind one name each, so no other module compares versions:

- tokenizers: 5.x has one (Rust-backed) class per family and no slow sentencepiece class;
  it reads `legacy` from tokenizer_config.json but no longer writes it back;
- `TrainingArguments` fields that 5.x dropped (`overwrite_output_dir`, `warmup_ratio`), which
  the LLaVA-1.5 scripts pass and which keep their meaning here;
- weight tying: 5.x ties from `_tied_weights_keys` mappings and asks every model for
  `all_tied_weights_keys`;
- the Trainer hooks the project overrides, whose signatures moved;
- saved files: 5.x writes RoPE settings under `rope_parameters` and flattens the CLIP/SigLIP
  vision models' weight names, which 4.55 reads as missing; saves here keep the 4.x layout,
  which both lines read.

Where both lines offer a public API it is used; a private one only where none exists.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from packaging.version import Version
from transformers import CLIPVisionModel, SiglipVisionModel

TRANSFORMERS_VERSION = Version(transformers.__version__)
# The first line without slow tokenizers, overwrite_output_dir and warmup_ratio.
TRANSFORMERS_5 = TRANSFORMERS_VERSION >= Version("5.0.0.dev0")

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SENTENCEPIECE_MODEL_FILE = "tokenizer.model"
# 5.x's name for a tokenizer with no class of its own; 4.55 knows it as PreTrainedTokenizerFast
# (which 5.x still accepts).
GENERIC_TOKENIZER_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def transformers_line() -> str:
    """The installed line in words, for logs and errors: 'transformers 5.25.0 (5.x line)'."""
    line = "5.x" if TRANSFORMERS_5 else "4.x"
    return f"transformers {transformers.__version__} ({line} line)"


# -- tokenizers ------------------------------------------------------------------------------------
def has_slow_tokenizers() -> bool:
    """Whether `use_fast=False` gives a separate (Python, sentencepiece) tokenizer class."""
    return not TRANSFORMERS_5


def save_tokenizer(tokenizer: Any, folder: str) -> None:
    """`save_pretrained`, then `make_tokenizer_config_portable`."""
    tokenizer.save_pretrained(folder)
    make_tokenizer_config_portable(tokenizer, folder)


def sentencepiece_style(tokenizer: Any) -> bool:
    """Whether a fast tokenizer marks word starts with '▁' (Llama, Mistral, Gemma), as
    sentencepiece does, rather than byte-level BPE's spaces."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    steps = repr(backend.pre_tokenizer) + repr(backend.normalizer)
    return "Metaspace" in steps or "▁" in steps


def make_tokenizer_config_portable(tokenizer: Any, folder: str) -> None:
    """Rewrite a saved tokenizer_config.json so both lines load the same tokenizer from it.

    - `legacy` is stated: 5.x reads it but leaves it out on save, so a legacy sentencepiece
      tokenizer would come back as a non-legacy one and tokenize differently;
    - 5.x's `TokenizersBackend` class is named `PreTrainedTokenizerFast`, which both know;
    - 5.x's list of `extra_special_tokens` goes back under 4.x's `additional_special_tokens`
      (5.x reads that name too; 4.55 reads `extra_special_tokens` only as named tokens);
    - a sentencepiece-style `add_prefix_space: true` (the default of both) is left out where
      no tokenizer.model is saved: given explicitly, 4.55 rebuilds the tokenizer from that
      file instead of reading tokenizer.json.
    """
    path = os.path.join(folder, TOKENIZER_CONFIG_FILE)
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    legacy = getattr(tokenizer, "legacy", None)
    if isinstance(legacy, bool):
        config["legacy"] = legacy
    if isinstance(config.get("extra_special_tokens"), list):
        config["additional_special_tokens"] = config.pop("extra_special_tokens")
    if config.get("tokenizer_class") in GENERIC_TOKENIZER_CLASSES:
        config["tokenizer_class"] = GENERIC_TOKENIZER_CLASSES[config["tokenizer_class"]]
    has_model_file = os.path.isfile(os.path.join(folder, SENTENCEPIECE_MODEL_FILE))
    prefix_default = config.get("add_prefix_space") is True and sentencepiece_style(tokenizer)
    if prefix_default and not has_model_file:
        del config["add_prefix_space"]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")


PROCESSOR_CONFIG_FILE = "processor_config.json"


def save_processor(processor: Any, folder: str) -> None:
    """`save_pretrained` in the layout both lines read.

    5.x nests the image processor's settings inside processor_config.json, which 4.55 cannot
    read (it looks for preprocessor_config.json); 5.x still reads the 4.x layout. So each
    nested sub-processor is written to its own file, as 4.x does, and taken out of the nest.
    """
    processor.save_pretrained(folder)
    make_tokenizer_config_portable(processor.tokenizer, folder)
    path = os.path.join(folder, PROCESSOR_CONFIG_FILE)
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    nested = [
        name
        for name, value in config.items()
        if isinstance(value, dict) and hasattr(getattr(processor, name, None), "save_pretrained")
    ]
    for name in nested:
        getattr(processor, name).save_pretrained(folder)
        del config[name]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def sentencepiece_llama_tokenizer(folder: str, legacy: bool, **kwargs: Any) -> Any:
    """The fast Llama tokenizer of a folder that holds only a sentencepiece `tokenizer.model`.

    Both lines convert the sentencepiece model themselves (4.55 through its slow class, 5.x
    directly); the config is written first, as Llama checkpoints ship it (BOS added, no EOS),
    so both read the same settings (5.x's own default would add no BOS).
    """
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "legacy": legacy,
        "add_bos_token": True,
        "add_eos_token": False,
        "add_prefix_space": True,  # sentencepiece's dummy prefix; a saved null turns it off
    }
    with open(os.path.join(folder, TOKENIZER_CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(config, f)
    return transformers.AutoTokenizer.from_pretrained(folder, legacy=legacy, **kwargs)


# -- TrainingArguments ---------------------------------------------------------------------------
def training_argument_names(base: type | None = None) -> set[str]:
    """The fields of transformers' TrainingArguments (or of `base`, e.g. optimum-habana's)."""
    return {f.name for f in dataclasses.fields(base or transformers.TrainingArguments)}


@dataclass
class DroppedTrainingFields:
    """Flags of the LLaVA-1.5 scripts that transformers 5 removed, with their 4.x meaning.

    Only the ones the installed TrainingArguments lacks are added (see
    `restored_training_fields`); on 4.55 transformers keeps its own.
    """

    warmup_ratio: float = field(
        default=0.0,
        metadata={"help": "Linear warmup over this fraction of the steps (unless --warmup_steps)."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start afresh in --output_dir instead of resuming its checkpoints."},
    )
    group_by_length: bool = field(
        default=False, metadata={"help": "Batches of samples of similar lengths."}
    )

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"--warmup_ratio must lie in [0, 1], not {self.warmup_ratio}")

    def get_warmup_steps(self, num_training_steps: int) -> int:
        """4.x's rule: --warmup_steps when given, else ceil(steps x --warmup_ratio)."""
        if self.warmup_steps > 0 or not self.warmup_ratio:
            return super().get_warmup_steps(num_training_steps)
        return math.ceil(num_training_steps * self.warmup_ratio)


def restored_training_fields(base: type | None = None) -> type:
    """A dataclass to put before TrainingArguments in the bases: DroppedTrainingFields where
    `base` lacks those flags (5.x), an empty one where it has them (4.55, optimum-habana)."""
    present = training_argument_names(base)
    if all(f.name in present for f in dataclasses.fields(DroppedTrainingFields)):
        return KeptTrainingFields
    # Where only some are missing, the others are redefined with the same meaning.
    return DroppedTrainingFields


@dataclass
class KeptTrainingFields:
    """Stands for DroppedTrainingFields where transformers still has those flags."""


# -- model configs -------------------------------------------------------------------------------
CONFIG_FILE = "config.json"
# 5.x nests per-attention-type RoPE settings; 4.x (Gemma 3) keeps the local one apart.
LOCAL_ROPE_KEYS = {"sliding_attention": "rope_local_base_freq"}


def portable_config_dict(config: dict[str, Any]) -> dict[str, Any]:
    """A config dict both lines read alike: beside 5.x's `rope_parameters`, the 4.x keys.

    4.55 ignores `rope_parameters`: a 5.x config of a model with rope_theta 5e5 (Llama 3)
    or 1e6 (Qwen2) would load there with the default 1e4 and silently wrong positions. 5.x
    reads the 4.x keys too and gives them the same meaning. Nested configs (text_config,
    vision_config) are handled alike.
    """
    portable = {
        key: portable_config_dict(value) if isinstance(value, dict) else value
        for key, value in config.items()
    }
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict):
        return portable
    if "full_attention" in rope:  # nested per attention type
        for layer_type, key in LOCAL_ROPE_KEYS.items():
            if isinstance(rope.get(layer_type), dict) and "rope_theta" in rope[layer_type]:
                portable.setdefault(key, rope[layer_type]["rope_theta"])
        rope = rope["full_attention"] or {}
    if "rope_theta" in rope:
        portable.setdefault("rope_theta", rope["rope_theta"])
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    if scaling.get("rope_type", "default") != "default":
        portable.setdefault("rope_scaling", scaling)
    return portable


def make_config_portable(folder: str) -> None:
    """Rewrite a saved config.json with `portable_config_dict`."""
    path = os.path.join(folder, CONFIG_FILE)
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(portable_config_dict(config), f, indent=2, sort_keys=True)
        f.write("\n")


# -- weight names --------------------------------------------------------------------------------
# Vision models whose 4.x weights all sit under `vision_model.`; 5.x dropped that level (and
# loads both layouts), 4.55 reads the flat names as missing weights.
NESTED_VISION_MODELS = (CLIPVisionModel, SiglipVisionModel)
NESTING = "vision_model."


def flattened_vision_prefixes(model: torch.nn.Module) -> list[str]:
    """Paths ("vision_tower.vision_model.") of the vision models in `model` stored without
    their `vision_model.` level: all of them on 5.x, none on 4.55."""
    return [
        name + "." if name else ""
        for name, module in model.named_modules()
        if isinstance(module, NESTED_VISION_MODELS) and not hasattr(module, "vision_model")
    ]


def portable_state_dict(
    model: torch.nn.Module, state_dict: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """`model`'s state dict with the 4.x weight names, which both lines load."""
    prefixes = flattened_vision_prefixes(model)
    if not prefixes:
        return state_dict
    portable = {}
    for key, value in state_dict.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is not None and not key.startswith(prefix + NESTING):
            key = prefix + NESTING + key[len(prefix) :]
        portable[key] = value
    return portable


def native_state_dict(
    model: torch.nn.Module, state_dict: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """A state dict saved in either layout -> the names `model` has on this line."""
    prefixes = flattened_vision_prefixes(model)
    native = {}
    for key, value in state_dict.items():
        prefix = next((p for p in prefixes if key.startswith(p + NESTING)), None)
        if prefix is not None:
            key = prefix + key[len(prefix + NESTING) :]
        native[key] = value
    return native
