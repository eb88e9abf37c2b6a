"""LlavaForCausalLM: a vision tower, a projector and any causal LM, joined at image placeholders."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from llava.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID
from llava.model.config import LlavaConfig
from llava.model.projector import build_projector
from llava.model.vision_tower import VisionTower, build_vision_tower_from_config

# Supervised positions per cross-entropy chunk: bounds the float32 logits held at once.
LOSS_CHUNK_SIZE = 1024


def chunk_cross_entropy(
    hidden: torch.Tensor, targets: torch.Tensor, lm_head: nn.Module, softcap: float | None
) -> torch.Tensor:
    """Summed float32 cross-entropy of one chunk of supervised hidden states (n, D)."""
    logits = lm_head(hidden).float()  # (n, V)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum")


def supervised_loss(
    hidden_states: torch.Tensor,
    labels: torch.Tensor,
    lm_head: nn.Module,
    num_items_in_batch: int | torch.Tensor | None = None,
    softcap: float | None = None,
    chunk_size: int = LOSS_CHUNK_SIZE,
) -> torch.Tensor:
    """Next-token loss computed only where a label is supervised.

    hidden_states (B, T, D) predict labels shifted by one; the lm_head runs only on the
    supervised rows, chunk by chunk, so logits are never built for image or prompt tokens.
    The sum is divided by `num_items_in_batch` when the trainer gives it (the supervised-token
    count of the whole accumulated batch), else by this batch's supervised-token count.
    """
    targets = labels[:, 1:]  # (B, T-1)
    supervised = targets != IGNORE_INDEX
    selected = hidden_states[:, :-1][supervised]  # (N, D)
    selected_targets = targets[supervised]  # (N,)
    total = hidden_states.new_zeros((), dtype=torch.float32)
    if selected.shape[0] == 0:
        total = total + 0.0 * hidden_states.sum()  # keep the graph connected
    recompute = torch.is_grad_enabled() and selected.shape[0] > chunk_size
    for start in range(0, selected.shape[0], chunk_size):
        args = (selected[start : start + chunk_size], selected_targets[start : start + chunk_size])
        if recompute:  # logits of a chunk are rebuilt in backward instead of kept
            total = total + checkpoint(
                chunk_cross_entropy, *args, lm_head, softcap, use_reentrant=False
            )
        else:
            total = total + chunk_cross_entropy(*args, lm_head, softcap)
    if num_items_in_batch is None:
        num_items_in_batch = supervised.sum().clamp(min=1)
    return total / num_items_in_batch


class LlavaForCausalLM(PreTrainedModel):
    """Composition of `vision_tower`, `projector` and `language_model` (any causal LM)."""

    config_class = LlavaConfig
    base_model_prefix = "llava"  # no attribute of that name: checkpoints load without renaming
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules: list[str] = []

    def __init__(
        self,
        config: LlavaConfig,
        vision_tower: VisionTower | None = None,
        language_model: PreTrainedModel | None = None,
    ):
        super().__init__(config)
        if vision_tower is None:
            vision_tower = build_vision_tower_from_config(
                config.vision_tower_config,
                config.mm_vision_select_layer,
                config.mm_vision_select_feature,
            )
        if language_model is None:
            language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.vision_tower = vision_tower
        self.projector = build_projector(
            config.mm_projector_type, vision_tower.hidden_size, config.text_config.hidden_size
        )
        self.language_model = language_model
        self._no_split_modules = list(getattr(language_model, "_no_split_modules", None) or [])

    def _init_weights(self, module: nn.Module) -> None:
        """Pretrained parts arrive initialised; the projector keeps nn.Linear's default init."""

    # -- pieces transformers and peft look for ------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    @property
    def num_image_tokens(self) -> int:
        return self.vision_tower.num_image_tokens

    # -- images into embeddings ---------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) pixels -> (N, num_image_tokens, D) language-model embeddings."""
        features = self.vision_tower(pixel_values)  # (N, P, C)
        return self.projector(features.to(self.projector_dtype))

    @property
    def projector_dtype(self) -> torch.dtype:
        weights = [p for p in self.projector.parameters()]
        return weights[0].dtype if weights else self.get_input_embeddings().weight.dtype

    def embed_inputs(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token embeddings with each image's features written over its placeholder run.

        input_ids (B, T) hold IMAGE_PLACEHOLDER_ID at image positions; the k-th run of
        placeholders (in row-major order) receives the k-th image of pixel_values.
        """
        image_mask = input_ids == IMAGE_PLACEHOLDER_ID  # (B, T)
        embed_tokens = self.get_input_embeddings()
        embeds = embed_tokens(input_ids.masked_fill(image_mask, 0))  # (B, T, D)
        if pixel_values is None or pixel_values.shape[0] == 0:
            num_placeholders = int(image_mask.sum())
            if num_placeholders:
                raise ValueError(
                    f"input_ids hold {num_placeholders} image placeholder tokens but no "
                    "pixel_values were given"
                )
            if torch.is_grad_enabled() and self.training:
                embeds = embeds + 0.0 * self.image_path_dummy_output(embeds)
            return embeds
        image_features = self.encode_images(pixel_values)  # (N, P, D)
        num_tokens = int(image_mask.sum())
        num_features = image_features.shape[0] * image_features.shape[1]
        if num_tokens != num_features:
            raise ValueError(
                f"Image features and image tokens do not match: tokens: {num_tokens}, features: "
                f"{num_features} ({image_features.shape[0]} images x {image_features.shape[1]} "
                "tokens each)"
            )
        return embeds.masked_scatter(image_mask.unsqueeze(-1), image_features.to(embeds.dtype))

    def image_path_dummy_output(self, like: torch.Tensor) -> torch.Tensor:
        """A scalar that depends on the whole image path: one blank image through tower and projector.

        Multiplied by zero and added to text-only batches, so every rank runs the same modules
        whatever its batch holds: ZeRO-3 gathers each module's partitioned weights collectively
        (a rank that skipped the tower would hang the others), and DDP and DeepSpeed expect a
        gradient for every trainable parameter (the projector) on every rank.
        """
        blank = self.vision_tower.blank_pixel_values(like.device)  # (1, 3, H, W)
        return self.encode_images(blank).sum().to(like.dtype)

    # -- forward and generate -----------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """With labels: loss on supervised positions only (no logits). Without: the LM's output."""
        if inputs_embeds is None:
            inputs_embeds = self.embed_inputs(input_ids, pixel_values)
        if labels is None:
            return self.language_model(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                **kwargs,
            )
        decoder = self.language_model.get_decoder()
        outputs = decoder(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            **kwargs,
        )
        loss = supervised_loss(
            outputs.last_hidden_state,
            labels,
            self.get_output_embeddings(),
            num_items_in_batch,
            softcap=getattr(self.config.text_config, "final_logit_softcapping", None),
        )
        return CausalLMOutputWithPast(loss=loss)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """Generate from a prompt with images; returns only the new tokens (B, new)."""
        inputs_embeds = self.embed_inputs(input_ids, pixel_values)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.language_model.generate(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, **generate_kwargs
        )
