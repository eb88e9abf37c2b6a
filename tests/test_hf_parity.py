"""Parity with transformers' LlavaForConditionalGeneration on the same weights and input."""

from __future__ import annotations

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from llava.constants import IMAGE_PLACEHOLDER_ID
from llava.model.builder import build_llava_model
from llava.model.hf_llava import check_exportable, hf_llava_config, hf_llava_state_dict
from tests.fixtures.models import TINY_IMAGE_SIZE, TINY_VOCAB_SIZE

IMAGE_TOKEN_ID = TINY_VOCAB_SIZE - 1


@pytest.mark.parametrize("llm", ["llama", "qwen2"])
@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_logits_match_transformers_llava(llm, tower, tiny_llms, tiny_towers):
    torch.manual_seed(0)
    ours = build_llava_model(tiny_llms[llm], tiny_towers[tower]).eval()
    theirs = LlavaForConditionalGeneration(hf_llava_config(ours.config, IMAGE_TOKEN_ID)).eval()
    missing, unexpected = theirs.load_state_dict(
        hf_llava_state_dict(ours.state_dict()), strict=False
    )
    assert unexpected == []
    assert missing == []

    num = ours.num_image_tokens
    text = [1, 17, 18, 19]
    ids = torch.tensor([text + [IMAGE_PLACEHOLDER_ID] * num + [25, 26, 27]])
    pixel_values = torch.randn(1, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    with torch.no_grad():
        our_logits = ours(input_ids=ids, pixel_values=pixel_values).logits
        their_logits = theirs(
            input_ids=ids.masked_fill(ids == IMAGE_PLACEHOLDER_ID, IMAGE_TOKEN_ID),
            pixel_values=pixel_values,
        ).logits
    assert torch.allclose(our_logits, their_logits, atol=1e-5, rtol=1e-5)


def test_only_mlp2x_gelu_with_an_hf_tower_maps(
    tiny_llama_path, tiny_clip_path, tiny_open_clip_spec
):
    linear = build_llava_model(tiny_llama_path, tiny_clip_path, mm_projector_type="linear")
    with pytest.raises(ValueError, match="Only mlp2x_gelu"):
        check_exportable(linear.config)
    open_clip = build_llava_model(tiny_llama_path, tiny_open_clip_spec)
    with pytest.raises(ValueError, match="'open_clip'"):
        check_exportable(open_clip.config)
