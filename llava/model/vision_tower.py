"""Vision towers (HF CLIP, HF SigLIP, open_clip) behind one interface: pixels in, patch features out."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from llava.data.media import ImageGeometry, TokenReduction
from llava.files import (
    UnreadableFileError,
    load_safetensors_file,
    load_torch_file,
    read_json_object,
)

OPEN_CLIP_SCHEME = "open_clip:"


@dataclass(frozen=True)
class HFTowerKind:
    """The transformers classes that make up one kind of HF vision tower."""

    config_class: type
    model_class: type
    processor_class: type
    has_cls_token: bool


HF_TOWERS: dict[str, HFTowerKind] = {
    "clip": HFTowerKind(CLIPVisionConfig, CLIPVisionModel, CLIPImageProcessor, True),
    "siglip": HFTowerKind(SiglipVisionConfig, SiglipVisionModel, SiglipImageProcessor, False),
}
# model_type in a checkpoint's config.json -> tower kind (full models and vision-only ones).
HF_MODEL_TYPES = {
    "clip": "clip",
    "clip_vision_model": "clip",
    "siglip": "siglip",
    "siglip_vision_model": "siglip",
}


def hf_geometry(kind: HFTowerKind, config: Any, select_feature: str) -> ImageGeometry:
    """The geometry of a transformers CLIP / SigLIP vision config (a config object or dict)."""
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key)
    size, patch = get("image_size"), get("patch_size")
    return ImageGeometry((size, size), patch, kind.has_cls_token, select_feature)


def open_clip_geometry(model_cfg: dict[str, Any], select_feature: str) -> ImageGeometry:
    """The geometry of an open_clip model config's `vision_cfg` (a ViT with a CLS token)."""
    vision = model_cfg["vision_cfg"]
    size, patch = vision["image_size"], vision["patch_size"]
    size = (size, size) if isinstance(size, int) else tuple(size)
    patch = patch if isinstance(patch, int) else patch[0]
    return ImageGeometry(size, patch, True, select_feature)


def tower_geometry(tower_config: dict[str, Any], select_feature: str = "patch") -> ImageGeometry:
    """The geometry of a LlavaConfig's `vision_tower_config` (what `config_dict()` stored)."""
    if tower_config["tower_type"] == "open_clip":
        return open_clip_geometry(tower_config["vision_config"], select_feature)
    kind = HF_TOWERS[tower_config["tower_type"]]
    return hf_geometry(kind, tower_config["vision_config"], select_feature)


class VisionTower(nn.Module):
    """Base class: frozen (no grad) unless a parameter is made trainable.

    Subclasses set `tower_type`, `geometry`, `hidden_size`, `image_processor` and implement
    `features(pixel_values) -> (N, num_image_tokens, hidden_size)`.
    """

    tower_type: str
    geometry: ImageGeometry
    hidden_size: int
    image_processor: Any

    @property
    def num_image_tokens(self) -> int:
        return self.geometry.num_image_tokens

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the pixels the tower takes."""
        return self.geometry.image_size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        trainable = any(p.requires_grad for p in self.parameters())
        with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
            return self.features(pixel_values.to(self.dtype))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def blank_pixel_values(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """One all-zero image of the size the tower takes: (1, 3, H, W)."""
        height, width = self.image_size
        return torch.zeros(1, 3, height, width, device=device, dtype=self.dtype)

    def config_dict(self) -> dict[str, Any]:
        """What LlavaConfig stores to rebuild this tower without its original checkpoint."""
        raise NotImplementedError


class HFVisionTower(VisionTower):
    """A transformers CLIP or SigLIP vision encoder; features from hidden_states[select_layer]."""

    def __init__(
        self,
        tower_type: str,
        vision_model: nn.Module,
        image_processor: Any,
        select_layer: int,
        select_feature: str,
    ):
        super().__init__()
        kind = HF_TOWERS[tower_type]
        config = vision_model.config
        self.geometry = hf_geometry(kind, config, select_feature)
        num_states = config.num_hidden_layers + 1  # embeddings + every layer
        if not -num_states <= select_layer < num_states:
            raise ValueError(
                f"mm_vision_select_layer {select_layer} is out of range for a tower with "
                f"{config.num_hidden_layers} layers"
            )
        self.tower_type = tower_type
        self.vision_model = vision_model
        self.image_processor = image_processor
        self.select_layer = select_layer
        self.select_feature = select_feature
        self.hidden_size = config.hidden_size
        self.drop_cls = kind.has_cls_token and select_feature == "patch"

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        outputs = self.vision_model(pixel_values=pixel_values, output_hidden_states=True)
        hidden = outputs.hidden_states[self.select_layer]  # (N, 1 + P or P, C)
        return hidden[:, 1:] if self.drop_cls else hidden

    def config_dict(self) -> dict[str, Any]:
        return {
            "tower_type": self.tower_type,
            "vision_config": self.vision_model.config.to_dict(),
            "image_processor": self.image_processor.to_dict(),
        }


class OpenClipVisionTower(VisionTower):
    """The visual half of an open_clip model; features from one intermediate block."""

    tower_type = "open_clip"

    def __init__(
        self,
        visual: nn.Module,
        model_cfg: dict[str, Any],
        image_processor: Any,
        select_layer: int,
        select_feature: str,
    ):
        super().__init__()
        self.geometry = open_clip_geometry(model_cfg, select_feature)
        if self.geometry.grid != tuple(visual.grid_size):
            raise ValueError(
                f"open_clip config grid {self.geometry.grid} differs from the built model's "
                f"{tuple(visual.grid_size)}"
            )
        num_blocks = len(visual.transformer.resblocks)
        # Same convention as HF: index into [embeddings, block_0, ..., block_{L-1}].
        state_index = select_layer % (num_blocks + 1)
        if not -(num_blocks + 1) <= select_layer <= num_blocks or state_index == 0:
            raise ValueError(
                f"mm_vision_select_layer {select_layer} is out of range for an open_clip tower "
                f"with {num_blocks} blocks (the embeddings, index 0, are not available)"
            )
        self.visual = visual
        self.model_cfg = model_cfg
        self.image_processor = image_processor
        self.select_layer = select_layer
        self.select_feature = select_feature
        self.block_index = state_index - 1
        self.hidden_size = visual.transformer.width

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.visual.forward_intermediates(
            pixel_values,
            indices=[self.block_index],
            intermediates_only=True,
            output_fmt="NLC",
            output_extra_tokens=self.select_feature == "cls_patch",
        )
        patches = out["image_intermediates"][0]  # (N, P, C)
        if self.select_feature == "cls_patch":
            prefix = out["image_intermediates_prefix"][0]  # (N, 1, C)
            patches = torch.cat([prefix, patches], dim=1)
        return patches

    def config_dict(self) -> dict[str, Any]:
        return {
            "tower_type": self.tower_type,
            "vision_config": self.model_cfg,
            "image_processor": self.image_processor.to_dict(),
        }


# ---------------------------------------------------------------------------------------------
# Loading from a checkpoint (weights) and rebuilding from a saved LlavaConfig (no weights).


def hf_tower_type(name_or_path: str) -> str:
    model_type = AutoConfig.from_pretrained(name_or_path).model_type
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(
            f"Vision tower {name_or_path!r} has model_type {model_type!r}; supported: "
            f"{', '.join(sorted(HF_MODEL_TYPES))}, or '{OPEN_CLIP_SCHEME}<model name or local-dir:PATH>'"
        )
    return HF_MODEL_TYPES[model_type]


def default_hf_processor(kind: HFTowerKind, image_size: int) -> Any:
    if kind.processor_class is CLIPImageProcessor:
        return CLIPImageProcessor(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
        )
    return kind.processor_class(size={"height": image_size, "width": image_size})


def load_hf_processor(kind: HFTowerKind, name_or_path: str, image_size: int) -> Any:
    try:
        return kind.processor_class.from_pretrained(name_or_path)
    except OSError:  # a checkpoint saved without preprocessor_config.json
        return default_hf_processor(kind, image_size)


def load_hf_vision_tower(
    name_or_path: str,
    select_layer: int,
    select_feature: str,
    torch_dtype: torch.dtype | None = None,
    **model_kwargs: Any,
) -> HFVisionTower:
    tower_type = hf_tower_type(name_or_path)
    kind = HF_TOWERS[tower_type]
    vision_model = kind.model_class.from_pretrained(
        name_or_path, torch_dtype=torch_dtype, **model_kwargs
    )
    processor = load_hf_processor(kind, name_or_path, vision_model.config.image_size)
    return HFVisionTower(tower_type, vision_model, processor, select_layer, select_feature)


def open_clip_model_cfg(model_name: str) -> dict[str, Any]:
    """The model config open_clip would build `model_name` from (built-in name or local-dir:)."""
    import open_clip

    if model_name.startswith("local-dir:"):
        path = os.path.join(model_name[len("local-dir:") :], "open_clip_config.json")
        config = read_json_object(path)
        if "model_cfg" not in config:
            raise UnreadableFileError(path, "no 'model_cfg' in this open_clip config")
        return config["model_cfg"]
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ValueError(f"open_clip knows no model named {model_name!r}")
    return cfg


def open_clip_processor(visual: nn.Module) -> CLIPImageProcessor:
    """open_clip's preprocessing (resize shortest edge, centre crop, normalise) as an HF processor."""
    cfg = visual.preprocess_cfg
    size = cfg["size"]
    height, width = (size, size) if isinstance(size, int) else size
    return CLIPImageProcessor(
        size={"shortest_edge": min(height, width)},
        crop_size={"height": height, "width": width},
        image_mean=list(cfg["mean"]),
        image_std=list(cfg["std"]),
    )


@contextmanager
def quiet_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def building_on_meta() -> bool:
    """True inside transformers' empty-weights init (from_pretrained), where weights come later.

    open_clip moves its model to a device after building it, which fails for meta tensors
    unless the device is meta too.
    """
    return nn.Linear(1, 1).weight.is_meta


def build_open_clip_visual(model_cfg: dict[str, Any], weights: str | None) -> nn.Module:
    """Build an open_clip model from its config (through the public local-dir: path), keep `.visual`."""
    import open_clip

    device = "meta" if building_on_meta() else "cpu"
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "open_clip_config.json"), "w") as f:
            json.dump({"model_cfg": model_cfg}, f)
        with quiet_root_logger():  # open_clip warns "initialized randomly"; weights follow below
            model = open_clip.create_model(f"local-dir:{folder}", load_weights=False, device=device)
    if weights is not None:
        state = open_clip_state_dict(weights)
        model.load_state_dict(state)
    return model.visual


def open_clip_state_dict(weights: str) -> dict[str, torch.Tensor]:
    """The tower's weights file; a missing, truncated or unreadable one is an error naming it."""
    if weights.endswith(".safetensors"):
        return load_safetensors_file(weights)
    state = load_torch_file(weights)
    if not isinstance(state, dict):
        raise UnreadableFileError(weights, "does not hold a state dict")
    return state.get("state_dict", state)


def open_clip_weights_path(model_name: str, pretrained: str | None) -> str | None:
    if pretrained is not None:
        return pretrained
    if model_name.startswith("local-dir:"):
        folder = model_name[len("local-dir:") :]
        for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            if os.path.exists(os.path.join(folder, name)):
                return os.path.join(folder, name)
    return None


def load_open_clip_vision_tower(
    spec: str,
    select_layer: int,
    select_feature: str,
    pretrained: str | None = None,
    torch_dtype: torch.dtype | None = None,
) -> OpenClipVisionTower:
    model_name = spec[len(OPEN_CLIP_SCHEME) :]
    model_cfg = open_clip_model_cfg(model_name)
    weights = open_clip_weights_path(model_name, pretrained)
    if weights is None:
        raise ValueError(
            f"open_clip tower {spec!r} has no weights: pass --vision_tower_pretrained FILE or use "
            "open_clip:local-dir:FOLDER holding open_clip_model.safetensors"
        )
    visual = build_open_clip_visual(model_cfg, weights)
    if torch_dtype is not None:
        visual = visual.to(torch_dtype)
    processor = open_clip_processor(visual)
    return OpenClipVisionTower(visual, model_cfg, processor, select_layer, select_feature)


def load_vision_tower(
    spec: str,
    select_layer: int = -2,
    select_feature: str = "patch",
    pretrained: str | None = None,
    torch_dtype: torch.dtype | None = None,
) -> VisionTower:
    """Load a tower with its weights: an HF path/hub name, or 'open_clip:<name or local-dir:PATH>'."""
    if spec.startswith(OPEN_CLIP_SCHEME):
        return load_open_clip_vision_tower(
            spec, select_layer, select_feature, pretrained, torch_dtype
        )
    if pretrained is not None:
        raise ValueError("--vision_tower_pretrained is only for open_clip towers")
    return load_hf_vision_tower(spec, select_layer, select_feature, torch_dtype)


def processor_from_dict(processor_dict: dict[str, Any]) -> Any:
    classes = {cls.__name__: cls for cls in (CLIPImageProcessor, SiglipImageProcessor)}
    name = processor_dict.get("image_processor_type", "CLIPImageProcessor")
    return classes[name].from_dict(processor_dict)


def build_vision_tower_from_config(
    tower_config: dict[str, Any], select_layer: int, select_feature: str
) -> VisionTower:
    """Rebuild a tower (random weights, right shapes) from what `config_dict()` stored."""
    tower_type = tower_config["tower_type"]
    processor = processor_from_dict(tower_config["image_processor"])
    if tower_type == "open_clip":
        visual = build_open_clip_visual(tower_config["vision_config"], weights=None)
        return OpenClipVisionTower(
            visual, tower_config["vision_config"], processor, select_layer, select_feature
        )
    kind = HF_TOWERS[tower_type]
    vision_config = kind.config_class.from_dict(tower_config["vision_config"])
    vision_model = kind.model_class(vision_config)
    return HFVisionTower(tower_type, vision_model, processor, select_layer, select_feature)


def describe_tower(spec: str, select_feature: str = "patch") -> tuple[Any, ImageGeometry]:
    """(image processor, geometry) of a tower, without loading its weights."""
    if spec.startswith(OPEN_CLIP_SCHEME):
        model_cfg = open_clip_model_cfg(spec[len(OPEN_CLIP_SCHEME) :])
        geometry = open_clip_geometry(model_cfg, select_feature)
        return open_clip_processor(build_open_clip_visual(model_cfg, weights=None)), geometry
    kind = HF_TOWERS[hf_tower_type(spec)]
    config = kind.config_class.from_pretrained(spec)
    geometry = hf_geometry(kind, config, select_feature)
    return load_hf_processor(kind, spec, config.image_size), geometry


def describe_vision_tower(
    spec: str, select_feature: str = "patch", reduction: TokenReduction | None = None
) -> tuple[Any, int]:
    """(image processor, num_image_tokens) of a tower, without loading its weights; with a
    projector's token `reduction`, the tokens after it."""
    processor, geometry = describe_tower(spec, select_feature)
    return processor, replace(geometry, reduction=reduction).num_image_tokens
