"""Batching: dynamic padding (right by default), attention masks, and stacked image pixels.

`pixel_values` of a batch are every sample's images concatenated in sample order, which is
the order in which the model fills the runs of image placeholders. A batch without images has
no `pixel_values` key.

For static-shape devices (Gaudi lazy mode compiles a graph per shape) a `StaticShapes` policy
pads every batch to one of a few lengths and to a fixed number of image slots: blank images
after the real ones, and `num_images` saying how many are real, so text-only batches have the
same shapes as the others.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from llava.constants import IGNORE_INDEX


def pad_token_id_of(tokenizer: Any) -> int:
    """The tokenizer's pad id, else unk (LLaVA's choice for v1), else eos, else 0."""
    for name in ("pad_token_id", "unk_token_id", "eos_token_id"):
        token_id = getattr(tokenizer, name, None)
        if token_id is not None:
            return int(token_id)
    return 0


@dataclass(frozen=True)
class StaticShapes:
    """Batch shapes from a fixed set: lengths (ascending) and image slots of one image shape."""

    lengths: tuple[int, ...]
    image_slots: int
    image_shape: tuple[int, int, int]  # (3, H, W)

    def padded_length(self, longest: int) -> int:
        for length in self.lengths:
            if longest <= length:
                return length
        raise ValueError(f"a sample of {longest} tokens is longer than the longest bucket")


def bucket_lengths(max_length: int, num_buckets: int, multiple: int = 8) -> tuple[int, ...]:
    """`num_buckets` evenly spaced lengths up to `max_length`, each a multiple of `multiple`."""
    lengths = {
        min(max_length, math.ceil(max_length * k / num_buckets / multiple) * multiple)
        for k in range(1, num_buckets + 1)
    }
    return tuple(sorted(lengths))


def media_layout_of(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """AnyRes samples' `image_sizes` ((n, 2) each) and `media_kinds` ((n,) each) in the order
    given, as {"image_sizes": (N_media, 2), "media_kinds": (N_media,)}; nothing for samples
    without them."""
    sized = [s for s in samples if s.get("image_sizes") is not None]
    if not sized:
        return {}
    layout = {"image_sizes": torch.cat([s["image_sizes"] for s in sized])}
    if any(s.get("media_kinds") is not None for s in sized):
        layout["media_kinds"] = torch.cat([s["media_kinds"] for s in sized])
    return layout


@dataclass
class SupervisedCollator:
    """Samples {"input_ids" (T,), "labels" (T,), "pixel_values" (n, 3, H, W) | None} -> batch."""

    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None
    static_shapes: StaticShapes | None = None

    def __post_init__(self):
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be right or left, not {self.padding_side!r}")

    def padded_length(self, samples: list[dict[str, Any]]) -> int:
        longest = max(len(sample["input_ids"]) for sample in samples)
        if self.static_shapes is not None:
            return self.static_shapes.padded_length(longest)
        if self.pad_to_multiple_of:
            return math.ceil(longest / self.pad_to_multiple_of) * self.pad_to_multiple_of
        return longest

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch_size, length = len(samples), self.padded_length(samples)
        input_ids = torch.full((batch_size, length), self.pad_token_id, dtype=torch.long)  # (B, T)
        labels = torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((batch_size, length), dtype=torch.long)  # (B, T)
        for row, sample in enumerate(samples):
            n = len(sample["input_ids"])
            span = slice(0, n) if self.padding_side == "right" else slice(length - n, length)
            input_ids[row, span] = torch.as_tensor(sample["input_ids"])
            labels[row, span] = torch.as_tensor(sample["labels"])
            attention_mask[row, span] = 1
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        pixels = [s["pixel_values"] for s in samples if s.get("pixel_values") is not None]
        pixels = [p for p in pixels if p.shape[0] > 0]
        if self.static_shapes is not None:
            batch.update(self.fixed_image_slots(pixels))
        elif pixels:
            batch["pixel_values"] = torch.cat(pixels)  # (N_images, 3, H, W), sample order
            batch.update(media_layout_of(samples))
        return batch

    def fixed_image_slots(self, pixels: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The real images, then blank ones up to the slot count; `num_images` counts the real."""
        shapes = self.static_shapes
        num_images = sum(p.shape[0] for p in pixels)
        if num_images > shapes.image_slots:
            raise ValueError(
                f"a batch holds {num_images} images but there are {shapes.image_slots} image slots"
            )
        blank = torch.zeros((shapes.image_slots - num_images, *shapes.image_shape))
        return {
            "pixel_values": torch.cat([*pixels, blank]),  # (image_slots, 3, H, W)
            "num_images": torch.tensor(num_images),
        }
