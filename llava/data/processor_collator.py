"""Batching a transformers processor's samples: each output padded or concatenated by its shape.

A processor's outputs batch in one of three ways, read from its outputs on probe samples
(text-only, where the processor takes one, one image, two images) rather than from the
family's name:

- SEQUENCE: (1, T, ...) per sample, aligned with input_ids (token_type_ids, mm_token_type_ids,
  mllama's cross_attention_mask): padded with zeros along T as the input_ids are, and stacked;
- IMAGES: rows per image (pixel_values of llava / Gemma 3 / Qwen-VL patches, image_grid_thw,
  image_sizes): concatenated along dim 0 in sample order;
- PER_SAMPLE: (1, ...) per sample holding its images (Idefics3's (1, n_tiles, 3, H, W) and
  pixel_attention_mask, mllama's pixel_values): zero-padded to the largest and stacked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from llava.data.collator import SupervisedCollator

PROBE_TEXT = "probe"  # text of the probe samples (and of the placeholder probe)
PROBE_SIZE = (64, 48)  # blank images the batching rules are read from
SEQUENCE, IMAGES, PER_SAMPLE = "sequence", "images", "per_sample"
# built by the collator (labels from the samples' own), not batched from the processor's outputs
OWN_KEYS = ("input_ids", "attention_mask", "labels")


def batching_rule(key: str, probes: list[dict[str, torch.Tensor] | None]) -> str:
    """How output `key` batches, from the processor's outputs on a text-only, a one-image and a
    two-image probe (in that order, same-size images; None where the processor takes no such
    sample). A processor that takes one image a sample batches its image outputs by
    concatenation, which is stacking for one image."""
    present = [(p[key], p["input_ids"].shape[1]) for p in probes if p is not None and key in p]
    if all(v.ndim >= 2 and v.shape[0] == 1 and v.shape[1] == length for v, length in present):
        return SEQUENCE
    if probes[2] is None:
        return IMAGES
    one, two = probes[1].get(key), probes[2].get(key)
    if one is not None and two is not None and two.shape[0] == 2 * one.shape[0]:
        return IMAGES
    if all(v.ndim >= 1 and v.shape[0] == 1 for v, _ in present):
        return PER_SAMPLE
    shapes = [tuple(v.shape) for v, _ in present]
    raise ValueError(f"cannot tell how to batch the processor's {key!r} (shapes {shapes})")


def batching_rules(media: Any) -> dict[str, str]:
    """Each processor output's batching rule, read from its shapes on three probe samples;
    `media` (llava.data.processor_media's ProcessorMedia or PromptSuffixMedia) makes them from
    blank images of PROBE_SIZE: `media.probes()`."""
    probes = media.probes()
    keys = dict.fromkeys(
        key for probe in probes if probe is not None for key in probe if key not in OWN_KEYS
    )
    return {key: batching_rule(key, probes) for key in keys}


def pad_and_stack(
    values: list[torch.Tensor | None], sequence_length: int | None, padding_side: str
) -> torch.Tensor:
    """(1, ...) tensors -> (B, ...) zero-padded to the largest of each dim; with
    `sequence_length`, dim 1 is the sequence, padded to it on `padding_side`. None: all zeros."""
    present = [value for value in values if value is not None]
    shape = [max(value.shape[d] for value in present) for d in range(1, present[0].ndim)]
    if sequence_length is not None:
        shape[0] = sequence_length
    batch = torch.zeros((len(values), *shape), dtype=present[0].dtype)
    for row, value in enumerate(values):
        if value is None:
            continue
        where = [slice(0, n) for n in value.shape[1:]]
        if sequence_length is not None and padding_side == "left":
            where[0] = slice(sequence_length - value.shape[1], sequence_length)
        batch[(row, *where)] = value[0]
    return batch


def concatenate(values: list[torch.Tensor]) -> torch.Tensor:
    """Per-image tensors of several samples along dim 0, the other dims zero-padded to the
    largest (llava-next's patches per image differ with the image's size; its processor pads
    them with zeros too)."""
    shape = [max(value.shape[d] for value in values) for d in range(1, values[0].ndim)]
    padded = []
    for value in values:
        pad = [(0, n - m) for n, m in zip(shape, value.shape[1:])]
        padded.append(torch.nn.functional.pad(value, [x for p in reversed(pad) for x in p]))
    return torch.cat(padded)


@dataclass
class ProcessorCollator:
    """Processor samples -> a batch the model's forward takes.

    input_ids, labels and attention_mask are padded as SupervisedCollator pads them; every other
    output by its rule (`batching_rules`). A batch without images has no image inputs.
    """

    pad_token_id: int
    batching: dict[str, str] = field(default_factory=dict)
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None

    def __post_init__(self):
        self.text_collator = SupervisedCollator(
            self.pad_token_id, self.padding_side, self.pad_to_multiple_of
        )

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        text = [{"input_ids": s["input_ids"], "labels": s["labels"]} for s in samples]
        batch = self.text_collator(text)  # input_ids, labels, attention_mask (B, T)
        length = batch["input_ids"].shape[1]
        unknown = {key for s in samples for key in s} - {"input_ids", "labels", *self.batching}
        if unknown:
            raise ValueError(f"samples hold {sorted(unknown)}, which the processor probe did not")
        for key, rule in self.batching.items():
            values = [sample.get(key) for sample in samples]
            if all(value is None for value in values):
                continue
            if rule == IMAGES:
                batch[key] = concatenate([value for value in values if value is not None])
            else:
                sequence_length = length if rule == SEQUENCE else None
                batch[key] = pad_and_stack(values, sequence_length, self.padding_side)
        return batch
