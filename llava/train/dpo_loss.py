"""DPO's pieces: each answer's summed log-probability from the supervised-positions head, and
the preference losses (sigmoid, IPO, robust) with their rewards.

A batch holds 2B rows, the B chosen sequences then the B rejected ones (llava/data/preference.py),
and the pairs' images once. The images go through the tower and projector once; each image's
features are written into its chosen and its rejected row. The language model runs on all 2B
rows; its final hidden states are gathered where a label is supervised (the answer and its
end token), and only there does the head run, chunk by chunk in float32, as the stage-2 loss
does (llava/model/llava.py): no logits for the image or the prompt. That is the composed
model's computation; transformers' image-text-to-text models have theirs in
llava/train/dpo_vlm.py, chosen by the model's kind (`sequence_log_probs`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llava.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID
from llava.model.kinds import ComposedKind, ImageTextToTextKind, kind_of, unwrap_base
from llava.model.llava import LOSS_CHUNK_SIZE, LlavaForCausalLM
from llava.train.dpo_vlm import image_text_to_text_log_probs

DPO_LOSSES = ("sigmoid", "ipo", "robust")


def chunk_log_probs(
    hidden: torch.Tensor, targets: torch.Tensor, lm_head: nn.Module, softcap: float | None
) -> torch.Tensor:
    """(n,) float32 log-probabilities of `targets` (n,) under the head on `hidden` (n, D)."""
    logits = lm_head(hidden).float()  # (n, V)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    picked = logits.gather(1, targets[:, None]).squeeze(1)
    return picked - torch.logsumexp(logits, dim=-1)


def summed_log_probs(
    hidden_states: torch.Tensor,
    labels: torch.Tensor,
    lm_head: nn.Module,
    softcap: float | None = None,
    chunk_size: int = LOSS_CHUNK_SIZE,
) -> torch.Tensor:
    """(B,) each row's summed log-probability of its supervised labels.

    hidden_states (B, T, D) predict labels (B, T) shifted by one; the head runs only on the
    supervised rows, chunk by chunk; in training a chunk's logits are rebuilt in backward
    instead of kept (as supervised_loss does for heads it cannot fuse).
    """
    targets = labels[:, 1:]  # (B, T-1)
    supervised = targets != IGNORE_INDEX
    rows = supervised.nonzero()[:, 0]  # (N,) row of each supervised position, row-major
    selected = hidden_states[:, :-1][supervised]  # (N, D)
    selected_targets = targets[supervised]  # (N,)
    recompute = torch.is_grad_enabled() and selected.shape[0] > chunk_size
    pieces = []
    for start in range(0, selected.shape[0], chunk_size):
        chunk = slice(start, start + chunk_size)
        args = (selected[chunk], selected_targets[chunk], lm_head, softcap)
        if recompute:
            pieces.append(checkpoint(chunk_log_probs, *args, use_reentrant=False))
        else:
            pieces.append(chunk_log_probs(*args))
    sums = hidden_states.new_zeros(labels.shape[0], dtype=torch.float32)  # (B,)
    if not pieces:
        return sums + 0.0 * hidden_states.sum()  # keep the graph connected
    return sums.index_add(0, rows, torch.cat(pieces))


def pair_embeddings(
    model: LlavaForCausalLM,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None,
    image_sizes: torch.Tensor | None = None,
    media_kinds: torch.Tensor | None = None,
) -> torch.Tensor:
    """(2B, T, D) token embeddings with image features written at the placeholders of both
    halves; pixel_values hold the B pairs' images once and go through the tower once.

    With AnyRes, pixel_values are the pairs' views, `image_sizes` (N, 2) and `media_kinds` (N,)
    each image's, and the features are packed (unpadded, newlines) as the model's own forward
    packs them (embed_inputs: the same encode_anyres_images), N images' tokens in order."""
    if pixel_values is None or pixel_values.shape[0] == 0:
        return model.embed_inputs(input_ids)  # text only: the model keeps its image path alive
    image_mask = input_ids == IMAGE_PLACEHOLDER_ID  # (2B, T)
    embeds = model.get_input_embeddings()(input_ids.masked_fill(image_mask, 0))  # (2B, T, D)
    if model.anyres is not None:
        features = model.encode_anyres_images(pixel_values, image_sizes, media_kinds)  # (M, D)
        model.check_image_tokens(image_mask, 2 * features.shape[0], None)
    else:
        features = model.encode_images(pixel_values)  # (N, P, D)
        model.check_image_tokens(image_mask, 2 * features.shape[0], features.shape[1])
    features = torch.cat([features, features]).to(embeds.dtype)  # chosen rows, rejected rows
    return embeds.masked_scatter(image_mask.unsqueeze(-1), features)


def composed_log_probs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(2B,) each row's summed log-probability of its answer; `model` is the composed model
    (in a peft wrapper or not: LoRA layers sit inside it, so disable_adapter() reaches here)."""
    base = unwrap_base(model)
    embeds = pair_embeddings(
        base,
        batch["input_ids"],
        batch.get("pixel_values"),
        batch.get("image_sizes"),
        batch.get("media_kinds"),
    )
    decoder = base.language_model.get_decoder()
    hidden = decoder(
        inputs_embeds=embeds, attention_mask=batch.get("attention_mask"), use_cache=False
    ).last_hidden_state  # (2B, T, D)
    softcap = getattr(base.config.text_config, "final_logit_softcapping", None)
    return summed_log_probs(hidden, batch["labels"], base.get_output_embeddings(), softcap)


# How each model kind computes its rows' answer log-probabilities (the kind seam).
LOG_PROBS_BY_KIND = {
    ComposedKind: composed_log_probs,
    ImageTextToTextKind: image_text_to_text_log_probs,
}


def sequence_log_probs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(2B,) each row's summed log-probability of its answer, by the model's kind."""
    return LOG_PROBS_BY_KIND[type(kind_of(model))](model, batch)


@dataclass
class PreferenceLoss:
    """Per pair (B,): the loss and the implicit rewards beta * (log pi - log pi_ref)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor | None,
    reference_rejected: torch.Tensor | None,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """DPO's losses on summed answer log-probabilities (B,) each; no reference (None) is
    reference-free DPO (the reference log-probabilities taken as 0).

    sigmoid: -log s(beta h) (1 - eps) - log s(-beta h) eps (cDPO's label smoothing eps);
    robust: (-log s(beta h) (1 - eps) + log s(-beta h) eps) / (1 - 2 eps) (rDPO);
    ipo: (h - 1 / (2 beta))^2 (IPO, on summed log-probabilities as the paper writes it; TRL
    averages them over the answer's tokens first);
    where h = (log pi(c) - log pi(r)) - (log ref(c) - log ref(r)).
    """
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"--dpo_loss must be one of {', '.join(DPO_LOSSES)}, not {loss_type!r}")
    if reference_chosen is None or reference_rejected is None:
        reference_chosen = reference_rejected = torch.zeros_like(policy_chosen)
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = (
            -F.logsigmoid(beta * h) * (1 - label_smoothing)
            - F.logsigmoid(-beta * h) * label_smoothing
        )
    elif loss_type == "robust":
        losses = (
            -F.logsigmoid(beta * h) * (1 - label_smoothing)
            + F.logsigmoid(-beta * h) * label_smoothing
        ) / (1 - 2 * label_smoothing)
    else:
        losses = (h - 1 / (2 * beta)) ** 2
    return PreferenceLoss(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())
