"""The tiny VLM checkpoints load through the Auto classes and behave like the real families':
chat template renders image markers and answers, the processor expands images into tokens,
a forward gives a finite loss, generate runs."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from tests.fixtures.tiny_vlms import PROMPT_FAMILIES, VLM_FAMILIES, tiny_image

IMAGE_MARKERS = {
    "llava": "<image>",
    "idefics3": "<image>",
    "smolvlm": "<image>",
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen3_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen3_5": "<|vision_start|><|image_pad|><|vision_end|>",
    "gemma3": "<start_of_image>",
    "gemma4": "<|image|>",
    "llava_next": "<image>",
    "internvl": "<IMG_CONTEXT>",
    "mllama": "<|image|>",
    "molmo2": "<|image|>",
}
# The prompt-only families' processor inputs: a bare prompt (and the text to learn), no chat.
PROMPTS = {
    "paligemma": dict(text="<image>What is in the picture?", suffix="A red car on the road."),
    "fuyu": dict(text="What is in the picture?"),  # its processor writes the image itself
}
# Families whose template writes BOS itself: the tokenizer must not add a second one.
TEMPLATE_WRITES_BOS = {"gemma3", "gemma4", "mllama"}

MESSAGES = [
    {
        "role": "user",
        "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}],
    },
    {"role": "assistant", "content": [{"type": "text", "text": "A red car on the road."}]},
    {"role": "user", "content": [{"type": "text", "text": "What color is the sky?"}]},
    {"role": "assistant", "content": "The sky is blue."},
]


def load(folder: str):
    """Model in eval mode and processor, the way training code loads a hub checkpoint."""
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    return model, AutoProcessor.from_pretrained(folder)


def encode(processor, family: str, text: str, size: tuple[int, int]):
    """One rendered conversation with one image of `size`, as a batch of one."""
    kwargs = {"add_special_tokens": False} if family in TEMPLATE_WRITES_BOS else {}
    return processor(text=[text], images=[[tiny_image(size)]], return_tensors="pt", **kwargs)


def head_labels(model, input_ids: torch.Tensor) -> torch.Tensor:
    """The ids as labels, those the output head cannot predict ignored (Molmo2 embeds its image
    tokens past the head's vocabulary)."""
    labels = input_ids.clone()
    labels[labels >= model.get_output_embeddings().out_features] = -100
    return labels


def image_token_count(model, batch) -> int:
    return int((batch["input_ids"] == model.config.image_token_id).sum())


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_tiny_vlm_round_trip(tiny_vlm_paths, family):
    model, processor = load(tiny_vlm_paths[family])
    assert type(model).__name__.endswith("ForConditionalGeneration")

    text = processor.apply_chat_template(MESSAGES, tokenize=False)
    assert text.count(IMAGE_MARKERS[family]) == 1
    assert "A red car on the road." in text and "The sky is blue." in text

    batch = encode(processor, family, text, (56, 56))
    assert image_token_count(model, batch) > 0
    if model.config.text_config.bos_token_id is not None:
        assert (batch["input_ids"][0] == model.config.text_config.bos_token_id).sum() <= 1
    with torch.no_grad():
        loss = model(**batch, labels=head_labels(model, batch["input_ids"])).loss
        assert torch.isfinite(loss)
        generated = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] <= batch["input_ids"].shape[1] + 3


@pytest.mark.parametrize("family", PROMPT_FAMILIES)
def test_a_prompt_only_vlm_takes_a_bare_prompt(tiny_vlm_paths, family):
    """PaliGemma and Fuyu as their real checkpoints are: no chat template; the processor writes
    the image tokens and BOS before the prompt; PaliGemma's labels its suffix only (its
    token_type_ids), Fuyu's ends the prompt with its beginning-of-answer token <0x04>."""
    model, processor = load(tiny_vlm_paths[family])
    assert processor.chat_template is None and processor.tokenizer.chat_template is None
    prompt = PROMPTS[family]
    suffix = {"suffix": [prompt["suffix"]]} if "suffix" in prompt else {}
    batch = processor(
        text=[prompt["text"]], images=[[tiny_image((56, 56))]], return_tensors="pt", **suffix
    )
    assert image_token_count(model, batch) > 0
    if suffix:
        learnt = batch.pop("labels")[0]
        learnt = learnt[learnt != -100]
        eos = processor.tokenizer.eos_token
        assert processor.tokenizer.decode(learnt) == prompt["suffix"] + eos
    else:
        tokens = processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][0])
        assert tokens[-1] == "<0x04>" and "<s>" in tokens
    with torch.no_grad():
        assert torch.isfinite(model(**batch, labels=batch["input_ids"]).loss)
        generated = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] <= batch["input_ids"].shape[1] + 3


@pytest.mark.skipif("qwen2_vl" not in VLM_FAMILIES, reason="qwen2_vl not available")
def test_qwen2_vl_token_count_follows_image_size(tiny_vlm_paths):
    model, processor = load(tiny_vlm_paths["qwen2_vl"])
    text = processor.apply_chat_template(MESSAGES, tokenize=False)
    square = image_token_count(model, encode(processor, "qwen2_vl", text, (56, 56)))
    wide = image_token_count(model, encode(processor, "qwen2_vl", text, (64, 40)))
    assert square != wide


@pytest.mark.skipif("idefics3" not in VLM_FAMILIES, reason="idefics3 not available")
def test_idefics3_splits_an_image_into_tiles(tiny_vlm_paths):
    model, processor = load(tiny_vlm_paths["idefics3"])
    text = processor.apply_chat_template(MESSAGES, tokenize=False)
    batch = encode(processor, "idefics3", text, (64, 40))
    assert batch["pixel_values"].shape[1] > 1  # tiles + the global view
    # the tokenizer's decode: 4.55's Idefics3Processor.decode writes the tile markers as <image>
    assert "<row_1_col_1>" in processor.tokenizer.decode(batch["input_ids"][0])
