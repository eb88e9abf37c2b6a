"""LlavaConfig: the language model's config, the vision tower's spec and the projector's."""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig

from llava.compat import portable_config_dict


class LlavaConfig(PretrainedConfig):
    """Config of `LlavaForCausalLM`.

    Keys keep the original LLaVA names (`mm_vision_tower`, `mm_projector_type`, ...).
    `vision_tower_config` holds what is needed to rebuild the tower with no access to the
    checkpoint it came from (its own config and its image processor).
    """

    model_type = "llava_composed"
    sub_configs = {"text_config": AutoConfig}

    def __init__(
        self,
        text_config: dict[str, Any] | PretrainedConfig | None = None,
        vision_tower_config: dict[str, Any] | None = None,
        mm_vision_tower: str | None = None,
        mm_vision_select_layer: int = -2,
        mm_vision_select_feature: str = "patch",
        mm_projector_type: str = "mlp2x_gelu",
        mm_hidden_size: int | None = None,
        image_aspect_ratio: str = "pad",
        mm_use_im_start_end: bool = False,
        num_image_tokens: int | None = None,
        image_grid_pinpoints: list[list[int]] | None = None,
        mm_patch_merge_type: str = "flat",
        video_frames: int | None = None,
        video_pool_stride: int = 2,
        **kwargs: Any,
    ):
        """With `image_aspect_ratio` anyres (or anyres_max_N), `image_grid_pinpoints` are the
        (height, width) resolutions images are tiled into and `mm_patch_merge_type`
        (spatial_unpad or flat) how the tiles' features are laid out; `num_image_tokens` is then
        a square image's count (each image's follows from its size). `video_frames` (None: the
        model takes no videos) and `video_pool_stride` say how an anyres model sees a video."""
        if isinstance(text_config, dict):
            text_config = dict(text_config)
            text_config = AutoConfig.for_model(text_config.pop("model_type"), **text_config)
        self.vision_tower_config = vision_tower_config
        self.mm_vision_tower = mm_vision_tower
        self.mm_vision_select_layer = mm_vision_select_layer
        self.mm_vision_select_feature = mm_vision_select_feature
        self.mm_projector_type = mm_projector_type
        self.mm_hidden_size = mm_hidden_size
        self.image_aspect_ratio = image_aspect_ratio
        self.mm_use_im_start_end = mm_use_im_start_end
        self.num_image_tokens = num_image_tokens
        self.image_grid_pinpoints = image_grid_pinpoints
        self.mm_patch_merge_type = mm_patch_merge_type
        self.video_frames = video_frames
        self.video_pool_stride = video_pool_stride
        if text_config is not None:
            kwargs.setdefault("tie_word_embeddings", text_config.tie_word_embeddings)
        super().__init__(**kwargs)
        # Set after the base __init__, whose attn_implementation default would overwrite the
        # text config's own choice through the sub-config propagation.
        self.text_config = text_config

    def to_dict(self) -> dict[str, Any]:
        """As saved in config.json: readable by both transformers lines (see llava.compat)."""
        return portable_config_dict(super().to_dict())

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.text_config.vocab_size
