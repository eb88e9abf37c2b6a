"""Synthetic benchmark data: an in-memory word-level tokenizer, LLaVA JSON records and JPEGs.

Stage-1 records are image-caption pairs (a short instruction, a caption of 4-40 words); stage-2
records are multi-turn conversations about an image (1 to `max_turns` question/answer pairs;
answers from one word to a few hundred, as in LLaVA's 665K mixture), about 5% text-only. Words
follow a Zipf law over the vocabulary, so lengths and contents vary like real text.
"""

from __future__ import annotations

import json
import os
import random
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from llava.bench.configs import BenchConfig
from llava.conversation import VICUNA_SYSTEM
from llava.data.images import load_image

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<image>"]
# Words of the templates and instructions, so rendered prompts hold no unknown words.
TEMPLATE_WORDS = (
    VICUNA_SYSTEM + " USER ASSISTANT Describe the image briefly . , : ? ! ' \n"
).split()
CAPTION_PROMPT = "Describe the image briefly.\n<image>"
TEXT_ONLY_FRACTION = 0.05
NUM_SOURCE_IMAGES = 32  # distinct JPEG files; records reuse them
PROMPT_TOKENS = 48  # BOS and the system prompt, with room to spare
TURN_TOKENS = 9  # USER : ASSISTANT : </s>, two sentence ends, room to spare


def vocabulary(size: int) -> list[str]:
    """`size` distinct words: special tokens, template words, then w0, w1, ..."""
    words = list(dict.fromkeys(SPECIAL_TOKENS + TEMPLATE_WORDS))
    words += [f"w{i}" for i in range(size - len(words))]
    return words[:size]


def build_tokenizer(vocab_size: int) -> Any:
    """A whitespace word-level fast tokenizer with exactly `vocab_size` ids; BOS is prepended."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: index for index, word in enumerate(vocabulary(vocab_size))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.pad_token = tokenizer.unk_token  # LLaVA v1 pads with unk
    assert len(tokenizer) == vocab_size
    return tokenizer


class TextSampler:
    """Random sentences of Zipf-distributed synthetic words."""

    def __init__(self, vocab_size: int, seed: int):
        self.rng = random.Random(seed)
        self.np_rng = np.random.default_rng(seed)
        self.first_word = len(dict.fromkeys(SPECIAL_TOKENS + TEMPLATE_WORDS))
        self.num_words = vocab_size - self.first_word

    def words(self, count: int) -> str:
        ranks = self.np_rng.zipf(1.2, size=count) % self.num_words
        words = [f"w{rank}" for rank in ranks]
        return " ".join(words) + self.rng.choice([".", ".", "?", "!"])

    def answer_length(self) -> int:
        """LLaVA-like answers: short VQA answers, sentences, and long descriptions."""
        kind = self.rng.random()
        if kind < 0.45:
            return self.rng.randint(1, 4)
        if kind < 0.85:
            return self.rng.randint(8, 60)
        return self.rng.randint(80, 260)


def caption_record(index: int, sampler: TextSampler, config: BenchConfig) -> dict[str, Any]:
    low, high = config.caption_words
    return {
        "id": f"cap{index}",
        "image": f"{index % NUM_SOURCE_IMAGES:03d}.jpg",
        "conversations": [
            {"from": "human", "value": CAPTION_PROMPT},
            {"from": "gpt", "value": sampler.words(sampler.rng.randint(low, high))},
        ],
    }


def conversation_record(
    index: int, sampler: TextSampler, config: BenchConfig, image_tokens: int | None = None
) -> dict[str, Any]:
    """1 to `max_turns` question/answer pairs that fit `model_max_length` with the image
    (nothing is truncated, so every data path sees the same tokens). `image_tokens`: the most
    tokens an image can take (default: the config's CLIP count; a processor that sizes images
    itself, Qwen2-VL's or Idefics3's, gives its own bound)."""
    rng = sampler.rng
    num_turns = min(config.max_turns, 1 + int(rng.expovariate(0.45)))
    if image_tokens is None:
        image_tokens = config.num_image_tokens
    budget = config.model_max_length - image_tokens - PROMPT_TOKENS
    turns = []
    for _ in range(num_turns):
        question_words = rng.randint(4, 30)
        answer_words = min(sampler.answer_length(), budget - question_words - TURN_TOKENS)
        if answer_words < 1:
            break
        budget -= question_words + answer_words + TURN_TOKENS
        turns.append({"from": "human", "value": sampler.words(question_words)})
        turns.append({"from": "gpt", "value": sampler.words(answer_words)})
    record = {"id": f"conv{index}", "conversations": turns}
    if rng.random() >= TEXT_ONLY_FRACTION:
        record["image"] = f"{index % NUM_SOURCE_IMAGES:03d}.jpg"
        turns[0]["value"] = "<image>\n" + turns[0]["value"]
    return record


def make_records(
    stage: str, count: int, config: BenchConfig, seed: int, image_tokens: int | None = None
) -> list[dict[str, Any]]:
    """`count` LLaVA JSON records: captions for pretrain, conversations for the finetunes (and
    the image-text-to-text families, whose images take up to `image_tokens` tokens)."""
    sampler = TextSampler(config.vocab_size, seed)
    if stage == "pretrain":
        return [caption_record(index, sampler, config) for index in range(count)]
    return [conversation_record(i, sampler, config, image_tokens) for i in range(count)]


def write_images(folder: str, config: BenchConfig, seed: int = 0) -> None:
    """JPEGs of varied sizes and aspect ratios (shapes on a gradient), as photos are."""
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(seed)
    low, high = config.source_image_sizes
    for index in range(NUM_SOURCE_IMAGES):
        width, height = rng.randint(low, high), rng.randint(low, high)
        gradient = np.linspace(0, 255, width, dtype=np.uint8)[None, :, None]
        pixels = np.broadcast_to(gradient, (height, width, 3)).copy()
        pixels[..., rng.randrange(3)] //= 2
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x, y = rng.randrange(width), rng.randrange(height)
            size = rng.randint(8, max(9, min(width, height) // 3))
            colour = tuple(rng.randrange(256) for _ in range(3))
            draw.ellipse([x, y, x + size, y + size], fill=colour)
        image.save(os.path.join(folder, f"{index:03d}.jpg"), quality=90)
    load_image(os.path.join(folder, "000.jpg"))  # fails here, not in a worker, if PIL cannot


def write_data(
    folder: str,
    stage: str,
    count: int,
    config: BenchConfig,
    seed: int,
    image_tokens: int | None = None,
) -> str:
    """Write `count` records of a stage as LLaVA JSON; returns the file's path."""
    path = os.path.join(folder, f"{stage}-{seed}.json")
    with open(path, "w") as f:
        json.dump(make_records(stage, count, config, seed, image_tokens), f)
    return path
