"""LlavaForCausalLM: a vision tower, a projector and any causal LM, joined at image placeholders."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import AttentionInterface

from llava.compat import portable_state_dict
from llava.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID
from llava.data.media import TILED, ImageGeometry, anyres_of
from llava.model.anyres import pack_medium
from llava.model.config import LlavaConfig
from llava.model.projector import build_projector, projector_reduction
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


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T + bias`, chunk by chunk, with the gradients
    worked out in the forward pass.

    Each chunk's float32 logits live only while the chunk is processed: nothing of size
    (n, V) is kept for backward, and nothing is recomputed there (unlike checkpointed chunks,
    which run the head twice). Backward only scales the stored gradients.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, softcap, chunk_size):
        # hidden (N, D), weight (V, D), bias (V,) or None, targets (N,)
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        total = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = grad_bias = None  # float32 sums over the chunks
        for start in range(0, hidden.shape[0], chunk_size):
            chunk = slice(start, start + chunk_size)
            h, t = hidden[chunk], targets[chunk]  # (n, D), (n,)
            logits = F.linear(h, weight, bias).float()  # (n, V)
            capped = None
            if softcap is not None:
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            log_normaliser = torch.logsumexp(logits, dim=-1)  # (n,)
            total += (log_normaliser - logits.gather(1, t[:, None]).squeeze(1)).sum()
            grad = logits.sub_(log_normaliser[:, None]).exp_()  # softmax, in place (n, V)
            grad[torch.arange(t.shape[0], device=t.device), t] -= 1
            if capped is not None:
                grad.mul_(1 - capped * capped)
            if need_bias:
                part = grad.sum(dim=0)
                grad_bias = part if grad_bias is None else grad_bias.add_(part)
            grad = grad.to(hidden.dtype)
            if need_hidden:
                grad_hidden[chunk] = grad @ weight
            if need_weight:
                part = (grad.T @ h).float()  # (V, D)
                grad_weight = part if grad_weight is None else grad_weight.add_(part)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        ctx.used = False
        return total

    @staticmethod
    def backward(ctx, grad_total):
        if ctx.used:  # the stored gradients are scaled in place
            raise RuntimeError("LinearCrossEntropy cannot run backward twice (retain_graph)")
        ctx.used = True
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        scale = grad_total.to(torch.float32)
        return (
            None if grad_hidden is None else grad_hidden.mul_(scale.to(grad_hidden.dtype)),
            None if grad_weight is None else grad_weight.mul_(scale).to(weight_dtype),
            None if grad_bias is None else grad_bias.mul_(scale).to(bias_dtype),
            None,
            None,
            None,
        )


def fusable_head(lm_head: nn.Module) -> bool:
    """A plain Linear head whose weight is all here (not a ZeRO-3 shard, not quantized)."""
    return (
        type(lm_head) is nn.Linear
        and not hasattr(lm_head.weight, "ds_id")
        and lm_head.weight.dtype.is_floating_point
    )


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
    In training, a plain Linear head computes its gradients in the forward pass
    (`LinearCrossEntropy`); other heads (ZeRO-3 shards, adapters) checkpoint each chunk.
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
    elif torch.is_grad_enabled() and fusable_head(lm_head):
        total = LinearCrossEntropy.apply(
            selected, lm_head.weight, lm_head.bias, selected_targets, softcap, chunk_size
        )
    else:
        recompute = torch.is_grad_enabled() and selected.shape[0] > chunk_size
        for start in range(0, selected.shape[0], chunk_size):
            chunk = slice(start, start + chunk_size)
            args = (selected[chunk], selected_targets[chunk])
            if recompute:  # logits of a chunk are rebuilt in backward instead of kept
                total = total + checkpoint(
                    chunk_cross_entropy, *args, lm_head, softcap, use_reentrant=False
                )
            else:
                total = total + chunk_cross_entropy(*args, lm_head, softcap)
    if num_items_in_batch is None:
        num_items_in_batch = supervised.sum().clamp(min=1)
    return total / num_items_in_batch


# -- attention over packed samples ----------------------------------------------------------------
# `--attn_implementation sdpa_packed`: sdpa, except that a batch flattened into one row with
# `cu_seq_lens_q` (llava.data.packing) runs attention sample by sample, each causal and
# unmasked. Plain sdpa reads the same batch from its position ids and masks a T x T product
# for a T-token row; per sample the cost is the sum of S x S / 2. The mask transformers builds
# is sdpa's (so without cu_seq_lens this is sdpa) and goes unused for flattened batches.
PACKED_SDPA = "sdpa_packed"


def packed_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cu_seq_lens_q: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query (1, H, T, d), key and value (1, H_kv, T, d) -> (1, T, H, d); see PACKED_SDPA."""
    kwargs.pop("is_causal", None)
    if cu_seq_lens_q is None or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    bounds = cu_seq_lens_q.tolist()  # a device sync on GPU, where flash_attention_2 is the choice
    outputs = [
        sdpa_attention_forward(
            module, query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], None,
            is_causal=True, **kwargs,
        )[0]
        for start, end in zip(bounds[:-1], bounds[1:])
    ]  # fmt: skip
    return torch.cat(outputs, dim=1), None


def register_packed_attention() -> None:
    """Make `sdpa_packed` an attention implementation transformers accepts (idempotent)."""
    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)


ANYRES_NEWLINE = "image_newline"  # the projector's learned end-of-row token (spatial_unpad)


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
        # the tower's view of an image with the projector's token reduction (if its type has one)
        reduction = projector_reduction(config.mm_projector_type)
        self.geometry: ImageGeometry = replace(vision_tower.geometry, reduction=reduction)
        self.projector = build_projector(
            config.mm_projector_type,
            vision_tower.hidden_size,
            config.text_config.hidden_size,
            grid=self.geometry.grid,
        )
        self.language_model = language_model
        self.anyres = anyres_of(
            config.image_aspect_ratio,
            config.image_grid_pinpoints,
            config.mm_patch_merge_type,
            vision_tower.geometry,
            getattr(config, "video_frames", None),
            getattr(config, "video_pool_stride", 2),
        )
        if self.anyres is not None and reduction is not None:
            raise ValueError(
                f"--image_aspect_ratio {config.image_aspect_ratio} takes a projector without a "
                f"token reduction, not {config.mm_projector_type}"
            )
        if self.anyres is not None and self.anyres.merge == "spatial_unpad":
            width = config.text_config.hidden_size  # LLaVA-NeXT's init: N(0, 1 / width)
            newline = nn.Parameter(torch.randn(width) / math.sqrt(width))
            self.projector.register_parameter(ANYRES_NEWLINE, newline)
        self._no_split_modules = list(getattr(language_model, "_no_split_modules", None) or [])
        # Collects the parts' tied weights and other static properties (5.x needs them to load
        # and save). Initialises only what is not initialised yet: the projector (a no-op,
        # see _init_weights); the pretrained parts are marked initialised by their own.
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Pretrained parts arrive initialised; the projector keeps nn.Linear's default init."""

    def save_pretrained(self, save_directory: str, *args: Any, state_dict=None, **kwargs: Any):
        """As transformers saves, with the weight names both lines load (llava.compat)."""
        state_dict = self.state_dict() if state_dict is None else state_dict
        state_dict = portable_state_dict(self, state_dict)
        return super().save_pretrained(save_directory, *args, state_dict=state_dict, **kwargs)

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
        return self.geometry.num_image_tokens

    # -- images into embeddings ---------------------------------------------------------------
    def encode_images(
        self, pixel_values: torch.Tensor | None, tower_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(N, 3, H, W) pixels -> (N, num_image_tokens, D) language-model embeddings; given
        `tower_features` (N, P, C), the tower's selected features read from a feature cache
        (llava.data.feature_cache), only the projector runs."""
        if tower_features is None:
            tower_features = self.tower_features(pixel_values)  # (N, P, C)
        return self.projector(tower_features.to(self.projector_dtype))

    def tower_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The tower's features; a frozen tower runs in inference mode (no autograd records,
        no version counters), except under ZeRO-3, whose weight gathers must stay ordinary."""
        parameters = list(self.vision_tower.parameters())
        if any(p.requires_grad for p in parameters) or any(hasattr(p, "ds_id") for p in parameters):
            return self.vision_tower(pixel_values)
        with torch.inference_mode():
            features = self.vision_tower(pixel_values)  # (N, P, C)
        # An inference tensor cannot be saved for backward (the projector's first linear does).
        return features.clone() if torch.is_grad_enabled() else features

    @property
    def projector_dtype(self) -> torch.dtype:
        weights = [p for p in self.projector.parameters()]
        return weights[0].dtype if weights else self.get_input_embeddings().weight.dtype

    def check_image_tokens(
        self, image_mask: torch.Tensor, num_images: int | torch.Tensor, per_image: int | None
    ) -> None:
        """Raise when the placeholders and the image features differ in number.

        Reading the count waits for the device, so in training on an accelerator the check is
        deferred: mismatches are counted on the device and `raise_deferred_image_errors()`
        (called by the trainer at each logging step, where it waits anyway) raises. The data
        pipeline builds the counts to match, so this guards against a foreign collator.
        """
        if image_mask.device.type != "cpu" and self.training:
            mismatch = (image_mask.sum() != num_images * (per_image or 1)).long()
            pending = getattr(self, "deferred_image_errors", None)
            self.deferred_image_errors = mismatch if pending is None else pending + mismatch
            return
        num_tokens, num_images = int(image_mask.sum()), int(num_images)
        num_features = num_images * (per_image or 1)
        if num_tokens == num_features:
            return
        if num_images == 0:
            raise ValueError(
                f"input_ids hold {num_tokens} image placeholder tokens but no pixel_values were "
                "given"
            )
        each = f"{num_images} images x {per_image} tokens each" if per_image else "anyres"
        raise ValueError(
            f"Image features and image tokens do not match: tokens: {num_tokens}, features: "
            f"{num_features} ({each})"
        )

    def raise_deferred_image_errors(self) -> None:
        """Raise if a deferred check (see `check_image_tokens`) found a mismatch."""
        pending = getattr(self, "deferred_image_errors", None)
        self.deferred_image_errors = None
        if pending is not None and int(pending):
            raise ValueError(
                f"Image features and image tokens did not match in {int(pending)} batch(es) "
                "since the last logging step"
            )

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        num_images: int | torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        media_kinds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with each image's features written over its placeholder run.

        input_ids (B, T) hold IMAGE_PLACEHOLDER_ID at image positions; the k-th run of
        placeholders (in row-major order) receives the k-th image of pixel_values.
        `num_images` says how many images of pixel_values are real when a static-shape batch
        pads them with blank ones after the real (None: all are real); masked_scatter takes the
        features in order, so the blank ones are never written. With anyres, pixel_values are
        every medium's views (an image's base and tiles, a whole image, a video's frames),
        `image_sizes` (N, 2) each medium's (height, width) and `media_kinds` (N,) how each is
        seen (llava.data.media: TILED, WHOLE, VIDEO; None: all tiled).
        `image_features` (N, P, C), the tower's selected features read from a feature cache
        (llava.data.feature_cache), take the place of pixel_values: only the projector runs.
        """
        if image_features is not None and pixel_values is not None:
            raise ValueError("give pixel_values or (cached) image_features, not both")
        images = pixel_values if image_features is None else image_features
        image_mask = input_ids == IMAGE_PLACEHOLDER_ID  # (B, T)
        embed_tokens = self.get_input_embeddings()
        embeds = embed_tokens(input_ids.masked_fill(image_mask, 0))  # (B, T, D)
        if images is None or images.shape[0] == 0:
            self.check_image_tokens(image_mask, 0, self.num_image_tokens)
            if torch.is_grad_enabled() and self.training:
                embeds = embeds + 0.0 * self.image_path_dummy_output(embeds, image_features)
            return embeds
        if self.anyres is not None:
            if image_features is not None:
                raise ValueError("cached image_features cannot serve anyres images")
            projected = self.encode_anyres_images(pixel_values, image_sizes, media_kinds)
            self.check_image_tokens(image_mask, projected.shape[0], None)
        else:
            projected = self.encode_images(pixel_values, image_features)  # (N, P, D)
            real = projected.shape[0] if num_images is None else num_images
            self.check_image_tokens(image_mask, real, projected.shape[1])
        return embeds.masked_scatter(image_mask.unsqueeze(-1), projected.to(embeds.dtype))

    def encode_anyres_images(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor | None,
        media_kinds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Every medium's views (views, 3, H, W) -> (M, D): each medium's tokens as its kind and
        layout pack them (llava.model.anyres), media in order."""
        if image_sizes is None:
            raise ValueError("anyres pixel_values need image_sizes, each image's (height, width)")
        sizes = [(width, height) for height, width in image_sizes.tolist()]
        kinds = [TILED] * len(sizes) if media_kinds is None else media_kinds.tolist()
        counts = [self.anyres.medium_views(kind, size) for kind, size in zip(kinds, sizes)]
        if sum(counts) != pixel_values.shape[0]:
            raise ValueError(
                f"anyres pixel_values hold {pixel_values.shape[0]} views; the media's kinds "
                f"{kinds} and sizes {sizes} make {sum(counts)}"
            )
        features = self.encode_images(pixel_values)  # (views, P, D)
        newline = getattr(self.projector, ANYRES_NEWLINE, None)
        packed = [
            pack_medium(chunk, kind, self.anyres, size, newline)
            for chunk, kind, size in zip(features.split(counts), kinds, sizes)
        ]
        return torch.cat(packed)

    def image_path_dummy_output(
        self, like: torch.Tensor, cached: torch.Tensor | None = None
    ) -> torch.Tensor:
        """A scalar that depends on the whole image path: one blank image through tower and projector.

        Multiplied by zero and added to text-only batches, so every rank runs the same modules
        whatever its batch holds: ZeRO-3 gathers each module's partitioned weights collectively
        (a rank that skipped the tower would hang the others), and DDP and DeepSpeed expect a
        gradient for every trainable parameter (the projector) on every rank. Where the batches
        bring `cached` tower features (an empty (0, P, C) here), no rank runs the tower: blank
        features go through the projector alone.
        """
        if cached is not None:
            blank = like.new_zeros((1, *cached.shape[1:]))  # (1, P, C)
            output = self.encode_images(None, blank).sum()
        else:
            blank = self.vision_tower.blank_pixel_values(like.device)  # (1, 3, H, W)
            output = self.encode_images(blank).sum()
        newline = getattr(self.projector, ANYRES_NEWLINE, None)
        if newline is not None:  # anyres's row ends are trained beside the projector
            output = output + newline.sum()
        return output.to(like.dtype)

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
        num_images: torch.Tensor | int | None = None,
        image_sizes: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        media_kinds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """With labels: loss on supervised positions only (no logits). Without: the LM's output.
        `image_features`: cached tower features in place of pixel_values (see embed_inputs)."""
        if inputs_embeds is None:
            inputs_embeds = self.embed_inputs(
                input_ids, pixel_values, num_images, image_sizes, image_features, media_kinds
            )
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
        image_sizes: torch.Tensor | None = None,
        media_kinds: torch.Tensor | None = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """Generate from a prompt with images; returns only the new tokens (B, new)."""
        inputs_embeds = self.embed_inputs(
            input_ids, pixel_values, image_sizes=image_sizes, media_kinds=media_kinds
        )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.language_model.generate(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, **generate_kwargs
        )
