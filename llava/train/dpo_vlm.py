"""DPO's answer log-probabilities on transformers image-text-to-text models (the model kind of
llava/model/image_text_to_text.py), batches from llava/data/processor_preference.py.

A batch holds 2B rows, the B chosen sequences then the B rejected ones, and under
`image_inputs` the pairs' images once. The model runs on all 2B rows with `logits_to_keep` at
the supervised positions (as the stage-2 loss, `loss_inputs`): the head runs only where some
row's next token is an answer token or its end token, never over the prompt or the images.

The images go through the vision tower and connector once per pair where the family's forward
merges precomputed image features: `get_image_features` runs on the B pairs' images, its
`pooler_output` is given to both halves (chosen rows, then rejected rows), and the forward takes
it as `mm_encoder_outputs={"image": ...}` with the input_ids, so each family places the
features, and builds its positions (Qwen2-VL's M-RoPE from input_ids and image_grid_thw) and
masks (Gemma 3's token_type_ids), its own way. The families checked (by tests/test_dpo_vlm.py)
to take their features that way are `SHARED_IMAGE_FEATURES`: llava (llava-hf), LLaVA-NeXT,
InternVL, Qwen2-VL, Qwen2.5-VL, Idefics3, SmolVLM and Gemma 3. Every other family is given
the images in both rows, and its tower runs on them twice per pair (with the same result):
Qwen3-VL (its forward also reads the encoder's deepstack features, per layer), Mllama (cross
attention on the pixels), and any family not yet checked.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from llava.constants import IGNORE_INDEX
from llava.data.processor_preference import IMAGE_INPUTS
from llava.model.image_text_to_text import accepts_logits_to_keep, supervised_positions
from llava.model.kinds import unwrap_base

# Families (config.model_type) whose forward takes mm_encoder_outputs["image"] and reads only
# its pooler_output: a list of per-image (or per-sample) features in row order, or an
# image-major tensor, which it concatenates and writes at the image tokens.
SHARED_IMAGE_FEATURES = frozenset(
    {"llava", "llava_next", "internvl", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm", "gemma3"}
)


def shares_image_features(model: nn.Module) -> bool:
    """Whether the tower runs once per pair for this model (see the module docstring): a
    family of SHARED_IMAGE_FEATURES whose forward takes `mm_encoder_outputs` (transformers 5;
    the 4.55 line's forward does not, and its families take the images twice)."""
    base = unwrap_base(model)
    takes = "mm_encoder_outputs" in inspect.signature(base.forward).parameters
    return takes and base.config.model_type in SHARED_IMAGE_FEATURES


def twice(value: Any) -> Any:
    """A pair-level input for 2B rows: the chosen rows' then the rejected rows' (dim 0)."""
    if isinstance(value, torch.Tensor):
        return torch.cat([value, value])
    return [*value, *value]  # a list of per-image (or per-sample) features


def on_model(model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
    """Floating inputs (pixels) in the model's dtype, on its device."""
    parameter = next(model.parameters())
    return {
        name: value.to(parameter.device, parameter.dtype if value.is_floating_point() else None)
        for name, value in inputs.items()
    }


def image_forward_inputs(model: nn.Module, image_inputs: dict[str, Any]) -> dict[str, Any]:
    """The forward's image inputs for the 2B rows: the tower once (pooler_output given to both
    halves) where the family allows it, else every image input twice."""
    base = unwrap_base(model)
    if not image_inputs:
        return {}
    image_inputs = on_model(base, image_inputs)
    if not shares_image_features(base):
        return {name: twice(value) for name, value in image_inputs.items()}
    names = inspect.signature(base.get_image_features).parameters
    features = base.get_image_features(
        **{name: value for name, value in image_inputs.items() if name in names}, return_dict=True
    )
    shared = BaseModelOutputWithPooling(pooler_output=twice(features.pooler_output))
    # the pixels stay out of the forward (it refuses them beside mm_encoder_outputs); what
    # places or positions the features (image_grid_thw, image_sizes) goes in for 2B rows
    rest = {name: twice(v) for name, v in image_inputs.items() if not name.startswith("pixel_")}
    return {**rest, "mm_encoder_outputs": {"image": shared}}


def image_text_to_text_log_probs(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """(2B,) each row's summed log-probability of its supervised labels (the answer and its end
    token); `model` may be in a peft wrapper (disable_adapter() reaches here)."""
    labels = batch["labels"]  # (2B, T)
    inputs = {name: value for name, value in batch.items() if name not in ("labels", IMAGE_INPUTS)}
    inputs.update(image_forward_inputs(model, batch.get(IMAGE_INPUTS) or {}))
    positions = supervised_positions(labels)  # (K,)
    if accepts_logits_to_keep(unwrap_base(model)):
        inputs["logits_to_keep"] = positions
    logits = model(**inputs, use_cache=False).logits  # (2B, K, V), or (2B, T, V)
    if logits.shape[1] != positions.shape[0]:  # the forward kept every position
        logits = logits[:, positions]
    targets = labels[:, positions + 1]  # (2B, K)
    supervised = targets != IGNORE_INDEX
    rows = supervised.nonzero()[:, 0]  # (N,) row of each supervised position, row-major
    picked = -F.cross_entropy(
        logits[supervised].float(), targets[supervised], reduction="none"
    )  # (N,)
    sums = logits.new_zeros(labels.shape[0], dtype=torch.float32)  # (2B,)
    if picked.shape[0] == 0:
        return sums + 0.0 * logits.sum()  # keep the graph connected
    return sums.index_add(0, rows, picked)
