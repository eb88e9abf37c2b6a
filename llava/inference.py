"""Asking a loaded model about images: prompts, pixels, left-padded batched generation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llava.constants import IMAGE_TOKEN
from llava.conversation import USER, Turn
from llava.data.images import load_image, process_images
from llava.data.tokenize import ConversationTokenizer
from llava.model.builder import LoadedModel


@dataclass
class Prompt:
    """One generation request: prompt ids (placeholders expanded) and its images' pixels."""

    input_ids: list[int]
    pixel_values: torch.Tensor | None  # (num_images, 3, H, W)


def with_image_tag(question: str, num_images: int) -> str:
    """Questions without an <image> tag get one per image in front, as LLaVA's eval does."""
    if num_images and IMAGE_TOKEN not in question:
        return (IMAGE_TOKEN + "\n") * num_images + question
    return question


class Answerer:
    """Turns questions about images into answers with one loaded model and chat template."""

    def __init__(self, loaded: LoadedModel, conv_mode: str):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.conversation = ConversationTokenizer(
            loaded.tokenizer,
            conv_mode,
            self.model.num_image_tokens,
            mm_use_im_start_end=bool(self.model.config.mm_use_im_start_end),
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def pixels(self, image_sources: Sequence[Any]) -> torch.Tensor | None:
        if not image_sources:
            return None
        images = [load_image(source) for source in image_sources]
        aspect = getattr(self.model.config, "image_aspect_ratio", "square") or "square"
        return process_images(images, self.loaded.image_processor, aspect)

    def prompt(self, turns: list[Turn], image_sources: Sequence[Any] = ()) -> Prompt:
        return Prompt(self.conversation.encode_prompt(turns), self.pixels(image_sources))

    def question_prompt(self, question: str, image_sources: Sequence[Any] = ()) -> Prompt:
        turns = [Turn(USER, with_image_tag(question, len(image_sources)))]
        return self.prompt(turns, image_sources)

    def generate(self, prompts: list[Prompt], **generate_kwargs: Any) -> list[str]:
        """Answers for a batch of prompts, left-padded so every answer starts at one column.

        The language model's generate() derives position ids from the attention mask (its
        cumsum), so padding shifts no row's positions: a batch answers as each prompt alone.
        """
        pad_id = self.tokenizer.pad_token_id
        width = max(len(p.input_ids) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt.input_ids) :] = torch.tensor(prompt.input_ids)
            attention_mask[row, width - len(prompt.input_ids) :] = 1
        images = [p.pixel_values for p in prompts if p.pixel_values is not None]
        pixel_values = torch.cat(images).to(self.device, self.model.dtype) if images else None
        output = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            pixel_values=pixel_values,
            pad_token_id=pad_id,
            **generate_kwargs,
        )
        return [
            text.strip() for text in self.tokenizer.batch_decode(output, skip_special_tokens=True)
        ]


def sampling_kwargs(temperature: float, top_p: float | None, num_beams: int, max_new_tokens: int):
    """generate() arguments: greedy at temperature 0, sampling above."""
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "num_beams": num_beams}
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kwargs
