"""Where checkpoints are opened: build a LLaVA model from its parts, or load a saved one."""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerBase,
)
from transformers import LlavaConfig as HFLlavaConfig

from llava.compat import native_state_dict
from llava.data.media import anyres_of
from llava.device import resolve_device
from llava.files import (
    CONFIG_FILE,
    MissingFileError,
    UnreadableFileError,
    check_files_present_in,
    check_model_folder,
    check_readable,
    read_json_object,
)
from llava.model.config import LlavaConfig
from llava.model.hf_llava import check_projector_shapes, llava_config, llava_state_dict
from llava.model.image_text_to_text import (
    image_text_to_text_architecture,
    image_text_to_text_class,
    structure_parts,
)
from llava.model.kinds import (
    CONNECTOR,
    HEAD,
    HF_LLAVA,
    VISION,
    ImageTextToTextKind,
    parts_by_role,
    recognise_checkpoint,
    recognise_import,
    saved_config,
)
from llava.model.llava import LlavaForCausalLM
from llava.model.projector import projector_reduction
from llava.model.vision_tower import (
    HF_TOWERS,
    HFVisionTower,
    describe_vision_tower,
    load_vision_tower,
)
from llava.model.weights import (
    ADAPTERS,
    FULL_MODEL,
    NON_LORA_TRAINABLES_FILE,
    PROJECTOR,
    PROJECTOR_FILE,
    read_non_lora_trainables,
    read_projector_file,
    saved_checkpoint_contents,
)

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
TOKENIZER_FILES = (
    "tokenizer_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


def looks_like_local_path(name_or_path: str) -> bool:
    """A path the user meant as a folder here, not a hub id such as 'lmsys/vicuna-7b-v1.5'."""
    return os.path.exists(name_or_path) or name_or_path.startswith((os.sep, ".", "~"))


def check_pretrained_source(name_or_path: str) -> None:
    """A local model folder gets its files checked; a hub id is left to transformers."""
    if looks_like_local_path(name_or_path):
        check_model_folder(os.path.expanduser(name_or_path))


def check_tokenizer_source(name_or_path: str) -> None:
    """A local tokenizer folder exists, is not empty, and its tokenizer files are whole."""
    if not looks_like_local_path(name_or_path):
        return
    folder = os.path.expanduser(name_or_path)
    expected = f"expected a tokenizer: {', '.join(TOKENIZER_FILES[:3])} or the like"
    if not os.path.isdir(folder):
        raise MissingFileError(folder, f"no such folder ({expected})")
    if not os.listdir(folder):
        raise UnreadableFileError(folder, f"empty folder ({expected})")
    check_files_present_in(folder, TOKENIZER_FILES)


def load_vision_tower_processor(
    vision_tower: str, select_feature: str = "patch", projector_type: str = "mlp2x_gelu"
) -> tuple[Any, int]:
    """(image processor, num_image_tokens) of a tower and projector, without loading weights."""
    return describe_vision_tower(vision_tower, select_feature, projector_reduction(projector_type))


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
    image_aspect_ratio: str = "pad",
    image_grid_pinpoints: str | list[list[int]] | None = None,
    mm_patch_merge_type: str = "flat",
    video_frames: int | None = None,
    video_pool_stride: int = 2,
) -> LlavaForCausalLM:
    """Join a pretrained causal LM and a pretrained vision tower with a fresh projector.

    `language_model_kwargs` go to `AutoModelForCausalLM.from_pretrained` (for example a
    `quantization_config` for QLoRA). With `image_aspect_ratio` anyres / anyres_max_N, images
    are tiled into `image_grid_pinpoints` (a range such as "(1x1),...,(3x3)" in tiles, or a list
    of resolutions) and laid out by `mm_patch_merge_type` (spatial_unpad or flat); such a model
    takes videos of `video_frames` frames, each frame's grid pooled by `video_pool_stride`.
    """
    check_pretrained_source(model_name_or_path)
    if os.path.isdir(vision_tower):  # an HF tower folder; open_clip specs and hub ids are not
        check_model_folder(vision_tower)
    if vision_tower_pretrained is not None and looks_like_local_path(vision_tower_pretrained):
        check_readable(vision_tower_pretrained)
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
    anyres = anyres_of(
        image_aspect_ratio,
        image_grid_pinpoints,
        mm_patch_merge_type,
        tower.geometry,
        video_frames,
        video_pool_stride,
    )
    if video_frames and anyres is None:
        raise ValueError(
            "--video_frames: videos train with --image_aspect_ratio anyres or anyres_max_N"
        )
    pinpoints = None if anyres is None else [list(pinpoint) for pinpoint in anyres.pinpoints]
    config = LlavaConfig(
        text_config=language_model.config,
        vision_tower_config=tower.config_dict(),
        mm_vision_tower=vision_tower,
        mm_vision_select_layer=mm_vision_select_layer,
        mm_vision_select_feature=mm_vision_select_feature,
        mm_projector_type=mm_projector_type,
        mm_hidden_size=tower.hidden_size,
        image_aspect_ratio=image_aspect_ratio,
        image_grid_pinpoints=pinpoints,
        mm_patch_merge_type=mm_patch_merge_type,
        video_frames=video_frames,
        video_pool_stride=video_pool_stride,
    )
    model = LlavaForCausalLM(config, vision_tower=tower, language_model=language_model)
    config.num_image_tokens = model.num_image_tokens  # with the projector's token reduction
    if torch_dtype is not None:
        model.projector.to(torch_dtype)
    return model


def load_tokenizer(
    name_or_path: str, model_max_length: int | None = None, padding_side: str = "right"
) -> PreTrainedTokenizerBase:
    """The language model's tokenizer, with a pad token (unk or eos when it has none)."""
    check_tokenizer_source(name_or_path)
    kwargs: dict[str, Any] = {"padding_side": padding_side}
    if model_max_length is not None:
        kwargs["model_max_length"] = model_max_length
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


# ---------------------------------------------------------------------------------------------
# Loading a trained checkpoint, whatever kind it is, decided from the files it holds.

CHECKPOINT_KINDS = ("full", "lora", "projector")
# What a saved stage plan says the checkpoint holds -> the loader that opens it.
LOADER_FOR_CONTENTS = {FULL_MODEL: "full", ADAPTERS: "lora", PROJECTOR: "projector"}
CHECKPOINT_CONTENTS = (
    f"model weights and {CONFIG_FILE} (a full model), {ADAPTER_CONFIG_FILE} with the adapter "
    f"(LoRA), or {PROJECTOR_FILE} and {CONFIG_FILE} (a stage-1 projector)"
)


def is_model_weights_file(name: str) -> bool:
    """model.safetensors, pytorch_model.bin, their shards and shard indexes."""
    return name.startswith(("model", "pytorch_model")) and name.endswith(
        (".safetensors", ".bin", ".index.json")
    )


def checkpoint_kind(model_path: str) -> str:
    """'full' (weights + config), 'lora' (adapter + non-LoRA trainables) or 'projector'.

    Read from the stage plan its config.json records; checkpoints saved before plans were
    recorded (or by other programs) are told apart by their files. Never by the folder's name.
    """
    if not os.path.isdir(model_path):
        raise MissingFileError(
            model_path, f"no checkpoint folder here (expected {CHECKPOINT_CONTENTS})"
        )
    files = set(os.listdir(model_path))
    if not files:
        raise UnreadableFileError(model_path, f"empty folder (expected {CHECKPOINT_CONTENTS})")
    contents = saved_checkpoint_contents(saved_config(model_path) or {})
    if contents is not None:
        return LOADER_FOR_CONTENTS[contents]
    if ADAPTER_CONFIG_FILE in files:
        return "lora"
    if any(is_model_weights_file(name) for name in files):
        return "full"
    if PROJECTOR_FILE in files:
        return "projector"
    raise ValueError(
        f"{model_path!r} is not a checkpoint this project wrote: it has neither model weights, "
        f"{ADAPTER_CONFIG_FILE} nor {PROJECTOR_FILE} (files: {sorted(files)})"
    )


def adapter_weights_file(model_path: str) -> str:
    """The adapter's weights as peft saved them (safetensors, or .bin from older peft)."""
    for name in ADAPTER_WEIGHT_FILES:
        path = os.path.join(model_path, name)
        if os.path.exists(path):
            return path
    raise MissingFileError(
        model_path, f"no LoRA adapter weights (expected {' or '.join(ADAPTER_WEIGHT_FILES)})"
    )


def check_checkpoint_files(model_path: str, kind: str) -> None:
    """Every file the loader of `kind` reads is whole, checked before anything loads."""
    if kind == "full":
        check_model_folder(model_path)
        return
    read_json_object(os.path.join(model_path, CONFIG_FILE))
    if kind == "projector":
        check_readable(os.path.join(model_path, PROJECTOR_FILE))
        return
    read_json_object(os.path.join(model_path, ADAPTER_CONFIG_FILE))
    check_readable(adapter_weights_file(model_path))
    check_readable(os.path.join(model_path, NON_LORA_TRAINABLES_FILE))


@dataclass
class LoadedModel:
    """A model ready to answer, with what its inputs are made with.

    `processor`: the model's own processor where prompts and images go through it (transformers'
    image-text-to-text kind: its chat template, its image expansion); None for the composed
    kind, whose prompts use this project's templates and whose images `image_processor` makes.
    """

    tokenizer: PreTrainedTokenizerBase
    model: torch.nn.Module
    image_processor: Any
    context_length: int
    processor: Any | None = None


def has_tokenizer(folder: str) -> bool:
    names = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")
    return any(os.path.exists(os.path.join(folder, name)) for name in names)


def base_with_saved_config(
    model_path: str,
    model_base: str | None,
    vision_tower: str | None,
    torch_dtype: torch.dtype | None,
    language_model_kwargs: dict[str, Any],
) -> LlavaForCausalLM:
    """The base LLM + tower named in a partial checkpoint's config, with a fresh projector."""
    if model_base is None:
        raise ValueError(
            f"{model_path!r} holds only part of a model; pass --model-base with the language "
            "model it was trained from"
        )
    imported = recognise_import(model_base)
    if imported is not None:  # a complete VLM (llava-hf): its own tower, projector replaced later
        return IMPORTERS[imported](model_base, torch_dtype, **language_model_kwargs)[0]
    config = LlavaConfig.from_pretrained(model_path)
    tower = vision_tower or config.mm_vision_tower
    if not tower.startswith("open_clip:") and not os.path.exists(tower) and os.path.isabs(tower):
        raise FileNotFoundError(
            f"The vision tower this checkpoint was trained with, {tower!r}, is gone; pass "
            "--vision-tower with its new location"
        )
    return build_llava_model(
        model_base,
        tower,
        mm_projector_type=config.mm_projector_type,
        mm_vision_select_layer=config.mm_vision_select_layer,
        mm_vision_select_feature=config.mm_vision_select_feature,
        torch_dtype=torch_dtype,
        language_model_kwargs=language_model_kwargs,
        image_aspect_ratio=config.image_aspect_ratio,
        image_grid_pinpoints=getattr(config, "image_grid_pinpoints", None),
        mm_patch_merge_type=getattr(config, "mm_patch_merge_type", "flat"),
        video_frames=getattr(config, "video_frames", None),
        video_pool_stride=getattr(config, "video_pool_stride", 2),
    )


def resize_to_tokenizer(model: LlavaForCausalLM, tokenizer: PreTrainedTokenizerBase) -> None:
    """Tokens added in training (--mm_use_im_start_end) need their embedding rows back."""
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.language_model.resize_token_embeddings(len(tokenizer))


def load_pretrained_model(
    model_path: str,
    model_base: str | None = None,
    load_8bit: bool = False,
    load_4bit: bool = False,
    torch_dtype: torch.dtype | None = None,
    vision_tower: str | None = None,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """Open a full, LoRA (over `model_base`) or stage-1 projector (over `model_base`) checkpoint.

    The kind is decided from the files in `model_path`, never from its name: a config.json
    naming a transformers image-text-to-text class (a plain VLM folder, or a fine-tune of one)
    opens as that class with its processor; any other as the composed model. LoRA adapters
    are merged into the base weights for inference.
    """
    kind = checkpoint_kind(model_path)
    check_checkpoint_files(model_path, kind)
    if kind != "full" and model_base is not None:
        check_pretrained_source(model_base)  # before its tokenizer loads
    language_model_kwargs = quantized_loading_kwargs(load_8bit, load_4bit)
    if language_model_kwargs:  # bitsandbytes places the weights it quantizes
        language_model_kwargs["device_map"] = {"": str(device)}
    if isinstance(recognise_checkpoint(model_path), ImageTextToTextKind):
        loaded = load_vision_language_checkpoint(
            model_path, kind, model_base, vision_tower, torch_dtype, language_model_kwargs
        )
    else:
        loaded = load_composed_checkpoint(
            model_path, kind, model_base, vision_tower, torch_dtype, language_model_kwargs
        )
    model = loaded.model
    if not language_model_kwargs:
        model.to(device)
    elif loaded.processor is None:  # the composed model's quantized language model is placed
        parts = parts_by_role(model)
        parts[VISION].to(device)
        parts[CONNECTOR].to(device)
    model.eval()  # (a model with a processor loads whole, placed by its device map)
    return loaded


def load_composed_checkpoint(
    model_path: str,
    kind: str,
    model_base: str | None,
    vision_tower: str | None,
    torch_dtype: torch.dtype | None,
    language_model_kwargs: dict[str, Any],
) -> LoadedModel:
    """A checkpoint of this project's composed model (or a llava-hf folder, imported as it)."""
    tokenizer_path = model_path if has_tokenizer(model_path) else model_base
    if tokenizer_path is None:
        raise ValueError(f"{model_path!r} has no tokenizer; pass --model-base")
    tokenizer = load_tokenizer(tokenizer_path)
    imported = recognise_import(model_path) if kind == "full" else None
    if imported is not None:
        model, processor = IMPORTERS[imported](model_path, torch_dtype, **language_model_kwargs)
        if tokenizer.chat_template is None:  # older folders keep it with the processor only
            tokenizer.chat_template = processor.chat_template
    elif kind == "full":
        model = full_model_class(model_path).from_pretrained(
            model_path, torch_dtype=torch_dtype, **language_model_kwargs
        )
    else:
        model = base_with_saved_config(
            model_path, model_base, vision_tower, torch_dtype, language_model_kwargs
        )
        resize_to_tokenizer(model, tokenizer)
        if kind == "projector":
            load_connector(model, model_path)
        else:
            model = merge_lora_checkpoint(model, model_path)
    context_length = getattr(model.config.text_config, "max_position_embeddings", 2048)
    return LoadedModel(tokenizer, model, model.vision_tower.image_processor, context_length)


def load_vision_language_checkpoint(
    model_path: str,
    kind: str,
    model_base: str | None,
    vision_tower: str | None,
    torch_dtype: torch.dtype | None,
    model_kwargs: dict[str, Any],
) -> LoadedModel:
    """A transformers image-text-to-text model: a full folder (a fine-tune's output or a plain
    transformers one) by the class its config names; a LoRA or projector output over
    `model_base`, the VLM folder it was trained from. Its processor comes along: the output's
    own where it holds one (training saves it), else the base's."""
    architecture = image_text_to_text_architecture(saved_config(model_path) or {})
    if vision_tower is not None:
        raise ValueError(
            f"--vision-tower {vision_tower}: {model_path} is a {architecture} with its own "
            "vision tower; leave the flag out"
        )
    if kind == "full":
        model, processor = load_image_text_to_text(model_path, torch_dtype, **model_kwargs)
    else:
        if model_base is None:
            raise ValueError(
                f"{model_path!r} holds {'LoRA adapters' if kind == 'lora' else 'a connector'} "
                f"of a {architecture}; pass --model-base with the vision-language model folder "
                "it was trained from"
            )
        check_same_base(model_path, model_base)
        model, processor = load_image_text_to_text(model_base, torch_dtype, **model_kwargs)
        if has_processor(model_path):
            processor = AutoProcessor.from_pretrained(model_path)
        if kind == "projector":
            load_connector(model, model_path)
        else:
            model = merge_lora_checkpoint(model, model_path)
    tokenizer = processor.tokenizer
    if tokenizer.pad_token is None:  # as training sets it up (train.processor_tokenizer)
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    context_length = getattr(
        model.config.get_text_config(), "max_position_embeddings", tokenizer.model_max_length
    )
    image_processor = getattr(processor, "image_processor", None)
    return LoadedModel(tokenizer, model, image_processor, context_length, processor)


def has_processor(folder: str) -> bool:
    """A processor saved beside the model: its tokenizer and image processor's files."""
    names = ("processor_config.json", "preprocessor_config.json")
    return has_tokenizer(folder) and any(os.path.exists(os.path.join(folder, n)) for n in names)


# Sizes that tell two models of one class apart, compared in each sub-model's config.
SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")


def check_same_base(model_path: str, model_base: str) -> None:
    """`model_base` is the vision-language model the checkpoint in `model_path` was trained
    from, by its config: the same class and the same sizes of its text and vision models."""
    trained, base = AutoConfig.from_pretrained(model_path), AutoConfig.from_pretrained(model_base)
    trained_class = image_text_to_text_architecture(trained.to_dict())
    base_class = image_text_to_text_architecture(base.to_dict())
    if trained_class != base_class:
        raise ValueError(
            f"--model-base {model_base} is not the model {model_path} was trained from: its "
            f"config names {base_class or base.model_type}, the checkpoint's {trained_class}"
        )
    sub_configs = {
        "text model": (trained.get_text_config(), base.get_text_config()),
        "vision model": (
            getattr(trained, "vision_config", None),
            getattr(base, "vision_config", None),
        ),
    }
    for part, (ours, theirs) in sub_configs.items():
        for key in SHAPE_KEYS:
            mine, other = getattr(ours, key, None), getattr(theirs, key, None)
            if mine != other:
                raise ValueError(
                    f"--model-base {model_base} is not the model {model_path} was trained from: "
                    f"its {part} has {key} {other}, the checkpoint's {mine}"
                )


def load_connector(model: torch.nn.Module, model_path: str) -> None:
    """A stage-1 checkpoint's mm_projector.bin into the model's connector."""
    parts_by_role(model)[CONNECTOR].load_state_dict(
        read_projector_file(os.path.join(model_path, PROJECTOR_FILE))
    )


def full_model_class(model_path: str) -> type[LlavaForCausalLM]:
    """The class of the model kind that recognises the checkpoint's config (the composed
    LlavaForCausalLM for configs no kind recognises, as before kinds were recorded)."""
    kind = recognise_checkpoint(model_path)
    return kind.model_class if kind is not None else LlavaForCausalLM


def load_hf_llava(
    folder: str, torch_dtype: torch.dtype | None = None, **model_kwargs: Any
) -> tuple[LlavaForCausalLM, LlavaProcessor]:
    """A transformers LlavaForConditionalGeneration folder (llava-hf) as LlavaForCausalLM, and
    the folder's processor (tokenizer, image processor, chat template).

    The config is checked before any weight loads (`hf_llava.llava_config`). Our model takes
    over transformers' modules (tower, decoder, head), so nothing is copied and the dtype,
    device map or quantization of `model_kwargs` carry over; the projector's weights move over
    by name (`hf_llava.llava_state_dict`).
    """
    hf_config = HFLlavaConfig.from_pretrained(folder)
    processor = LlavaProcessor.from_pretrained(folder)
    config = llava_config(hf_config, processor.image_processor, source=folder)
    hf_model = LlavaForConditionalGeneration.from_pretrained(
        folder, config=hf_config, torch_dtype=torch_dtype, **model_kwargs
    )
    parts = hf_model.model
    check_projector_shapes(parts.multi_modal_projector, hf_config)
    tower_type = config.vision_tower_config["tower_type"]
    if not isinstance(parts.vision_tower, HF_TOWERS[tower_type].model_class):
        raise ValueError(f"{folder}: the vision tower is a {type(parts.vision_tower).__name__}")
    tower = HFVisionTower(
        tower_type,
        parts.vision_tower,
        processor.image_processor,
        config.mm_vision_select_layer,
        config.mm_vision_select_feature,
    )
    # Only a shell: its decoder and head are replaced below. Built by its class, not
    # from_config, which under ZeRO-3 would partition and initialise it.
    causal_lm_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config.text_config)]
    with torch.device("meta"):
        language_model = causal_lm_class(config.text_config)
    setattr(language_model, language_model.base_model_prefix, parts.language_model)
    language_model.set_output_embeddings(hf_model.get_output_embeddings())
    language_model.generation_config = hf_model.generation_config
    model = LlavaForCausalLM(config, vision_tower=tower, language_model=language_model)
    weights = native_state_dict(model, llava_state_dict(hf_model.state_dict()))
    model.projector.load_state_dict(projector_state_of(parts.multi_modal_projector))
    left_out = set(weights) ^ set(model.state_dict())
    if left_out or any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise RuntimeError(f"{folder}: weights that did not carry over: {sorted(left_out)[:5]}")
    return model, processor


def projector_state_of(projector: torch.nn.Module) -> dict[str, torch.Tensor]:
    """transformers' Llava projector (linear_1, GELU, linear_2) as our mlp2x_gelu's state dict
    (0, 2), gathered first when ZeRO-3 has partitioned it (a collective: every rank calls it)."""
    parameters = list(projector.parameters())
    partitioned = [p for p in parameters if hasattr(p, "ds_id")]
    gather = contextlib.nullcontext()
    if partitioned:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(partitioned)
    with gather:
        return {
            key.replace("linear_1.", "0.").replace("linear_2.", "2."): value.detach().clone()
            for key, value in projector.state_dict().items()
        }


def describe_hf_llava(folder: str) -> tuple[Any, int]:
    """(image processor, num_image_tokens) of a llava-hf folder, from its configs alone."""
    hf_config = HFLlavaConfig.from_pretrained(folder)
    processor = LlavaProcessor.from_pretrained(folder)
    config = llava_config(hf_config, processor.image_processor, source=folder)
    return processor.image_processor, config.num_image_tokens


# Loaders of the checkpoints other programs write (kinds.IMPORTED_FORMATS recognises them),
# and what their data pipeline needs to know without loading weights.
IMPORTERS = {HF_LLAVA: load_hf_llava}
DESCRIBERS = {HF_LLAVA: describe_hf_llava}


def describe_complete_model(model_name_or_path: str) -> tuple[Any, int] | None:
    """(image processor, num_image_tokens) when `model_name_or_path` is a complete VLM another
    program wrote; None when it is a language model (to compose with a tower)."""
    imported = recognise_import(model_name_or_path)
    return None if imported is None else DESCRIBERS[imported](model_name_or_path)


def load_image_text_to_text(
    folder: str, torch_dtype: torch.dtype | None = None, **model_kwargs: Any
) -> tuple[torch.nn.Module, Any]:
    """A transformers image-text-to-text checkpoint (Qwen2-VL, Idefics3, Gemma 3, ...) by the
    class its config.json names, and its processor (tokenizer, image processor, chat template).

    Its parts are found at once, so a model whose structure the adapter cannot read fails here
    with what is missing (llava/model/image_text_to_text.py)."""
    architecture = image_text_to_text_architecture(saved_config(folder) or {})
    model_class = image_text_to_text_class(architecture)
    processor = AutoProcessor.from_pretrained(folder)
    if model_kwargs.get("quantization_config") is not None:
        quantization = model_kwargs["quantization_config"]
        model_kwargs["quantization_config"] = language_model_only(quantization, model_class, folder)
    model = model_class.from_pretrained(folder, torch_dtype=torch_dtype, **model_kwargs)
    structure_parts(model)
    return model, processor


def language_model_only(quantization: Any, model_class: type, folder: str) -> Any:
    """`quantization` (a BitsAndBytesConfig, QLoRA's) limited to the language model, as the
    composed model quantizes its language model alone: the vision model, connector and head
    stay in the compute dtype (they train, or feed what trains, and bitsandbytes' layers take
    no gradient). Their names are read from the model's structure on a meta-device copy."""
    with torch.device("meta"):
        skeleton = model_class._from_config(AutoConfig.from_pretrained(folder))
    parts = structure_parts(skeleton)
    keep = [name for role in (VISION, CONNECTOR, HEAD) for name in parts[role]]
    limited = copy.deepcopy(quantization)
    limited.llm_int8_skip_modules = sorted({*(limited.llm_int8_skip_modules or ()), *keep})
    return limited


@dataclass(frozen=True)
class CompleteModel:
    """A complete vision-language model training starts from; `processor` is its own where
    its data goes through it (transformers' image-text-to-text kind), None where the data
    pipeline uses the model's vision tower (the composed kind, llava-hf imported as it)."""

    model: torch.nn.Module
    processor: Any | None


def open_complete_model(
    model_name_or_path: str,
    vision_tower: str | None,
    torch_dtype: torch.dtype | None = None,
    **model_kwargs: Any,
) -> CompleteModel | None:
    """The model training starts from when --model_name_or_path names a complete
    vision-language model (recognised from its config.json): a llava-hf folder opens as this
    project's model, any other transformers image-text-to-text checkpoint as itself. None when
    it names a language model to compose with --vision_tower."""
    imported = recognise_import(model_name_or_path)
    config = saved_config(model_name_or_path) or {}
    vision_language = imported is None and image_text_to_text_architecture(config) is not None
    if imported is None and not vision_language:
        return None
    if vision_tower:
        described = imported or image_text_to_text_architecture(config)
        raise ValueError(
            f"--model_name_or_path {model_name_or_path} is a complete vision-language model "
            f"({described}) with its own vision tower: leave out --vision_tower {vision_tower}"
        )
    if imported is not None:
        return CompleteModel(
            IMPORTERS[imported](model_name_or_path, torch_dtype, **model_kwargs)[0], None
        )
    return CompleteModel(*load_image_text_to_text(model_name_or_path, torch_dtype, **model_kwargs))


def merge_lora_checkpoint(model: torch.nn.Module, model_path: str) -> torch.nn.Module:
    """Load non_lora_trainables.bin and the adapter onto the base, then merge the adapter (any
    model kind: an image-text-to-text adapter's modules_to_save come back with it too)."""
    from peft import PeftModel

    non_lora = read_non_lora_trainables(os.path.join(model_path, NON_LORA_TRAINABLES_FILE), model)
    missing = sorted(set(non_lora) - set(model.state_dict()))
    if missing:
        raise ValueError(f"{model_path}: non-LoRA weights for unknown parameters {missing[:5]}")
    model.load_state_dict(non_lora, strict=False)
    model = PeftModel.from_pretrained(model, model_path)
    return model.merge_and_unload()


def add_loading_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of the commands that load a trained model (model_vqa, cli, perplexity)."""
    parser.add_argument("--model-path", required=True, help="a checkpoint folder")
    parser.add_argument(
        "--model-base",
        default=None,
        help="base of LoRA/projector ones: the LLM (composed LLaVA), or the VLM folder",
    )
    parser.add_argument("--device", default="auto", help="auto (cuda, hpu, cpu), or a device")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--load-8bit", action="store_true", help="bitsandbytes 8-bit (CUDA)")
    group.add_argument("--load-4bit", action="store_true", help="bitsandbytes 4-bit NF4 (CUDA)")


def load_from_flags(args: argparse.Namespace) -> LoadedModel:
    """load_pretrained_model with what add_loading_flags parsed."""
    return load_pretrained_model(
        args.model_path,
        args.model_base,
        load_8bit=args.load_8bit,
        load_4bit=args.load_4bit,
        device=resolve_device(args.device),
    )


def quantized_loading_kwargs(load_8bit: bool, load_4bit: bool) -> dict[str, Any]:
    if not (load_8bit or load_4bit):
        return {}
    if not torch.cuda.is_available():
        raise ValueError("--load-8bit / --load-4bit need bitsandbytes on a CUDA GPU")
    from transformers import BitsAndBytesConfig

    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_8bit=load_8bit,
            load_in_4bit=load_4bit,
            bnb_4bit_compute_dtype=torch.float16,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_quant_type="nf4",
        )
    }
