"""Padding-free batches: a batch's samples packed into rows of bounded length, told apart by
position ids that restart at each sample.

transformers (4.55) reads packed rows from `position_ids` when no `attention_mask` is given:
a new sample starts wherever the position does not follow the previous one, and attention
stays within a sample (flash-attention runs the samples as variable-length sequences; sdpa
and eager get a block-diagonal causal mask). The loss is the same as for the padded batch:
the label of each sample's first token is ignored, so no sample predicts the next one's start.

Rows are filled first-fit by decreasing length, bounded by the batch's longest sample (or
`max_row_length` when that is longer): with sdpa or eager attention a row of length L costs
L x L whatever it holds, so short bounded rows keep that cost near the padded batch's.

With `flatten=True` the whole batch is one row without padding, and `cu_seq_lens_q/k` and
`max_length_q/k` (transformers' names) give the sample boundaries: flash_attention_2 and this
project's `sdpa_packed` (llava.model.llava) attend within each sample at the cost of the
samples alone. Plain sdpa would mask one T x T product over the row: use rows there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from llava.constants import IGNORE_INDEX
from llava.data.collator import media_layout_of

# The key of the packed batch holding each sample's length, in packed order. It is metadata
# for throughput statistics: the trainer removes it before calling the model.
SAMPLE_LENGTHS = "sample_lengths"


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Sample indices per row: first fit by decreasing length, rows of at most `capacity`."""
    if max(lengths) > capacity:
        raise ValueError(f"a sample of {max(lengths)} tokens does not fit rows of {capacity}")
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if free >= lengths[index]), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(index)
        room[row] -= lengths[index]
    return rows


@dataclass
class PackingCollator:
    """Samples {"input_ids" (T,), "labels" (T,), "pixel_values" (n, 3, H, W) | None} -> a batch
    of packed rows: input_ids, labels and position_ids (R, L), pixel_values in packed order,
    and SAMPLE_LENGTHS (S,). There is no attention_mask: the position ids carry the layout.

    The padding at the end of a row continues the last sample's positions, so it adds no
    sample of its own; it is causal-masked away from every real token and never supervised.
    """

    pad_token_id: int
    max_row_length: int | None = None
    pad_to_multiple_of: int | None = None
    flatten: bool = False

    def row_capacity(self, lengths: list[int]) -> int:
        capacity = max(max(lengths), self.max_row_length or 0)
        if self.pad_to_multiple_of:
            capacity = -(-capacity // self.pad_to_multiple_of) * self.pad_to_multiple_of
        return capacity

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [len(sample["input_ids"]) for sample in samples]
        if self.flatten:
            rows = [list(range(len(samples)))]
        else:
            rows = pack_rows(lengths, self.row_capacity(lengths))
        width = max(sum(lengths[i] for i in row) for row in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)  # (R, L)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)  # (R, L)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)  # (R, L)
        order = [index for row in rows for index in row]
        for r, row in enumerate(rows):
            start = 0
            for index in row:
                n = lengths[index]
                input_ids[r, start : start + n] = torch.as_tensor(samples[index]["input_ids"])
                labels[r, start : start + n] = torch.as_tensor(samples[index]["labels"])
                labels[r, start] = IGNORE_INDEX  # predicted by nothing within its own sample
                position_ids[r, start : start + n] = torch.arange(n)
                start += n
            tail = width - start  # padding: continues the last sample's positions
            position_ids[r, start:] = torch.arange(n, n + tail)
        batch = {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": position_ids,
            SAMPLE_LENGTHS: torch.tensor([lengths[i] for i in order]),  # (S,)
        }
        if self.flatten:  # the padding (if any) is a segment of its own
            tail = [width - sum(lengths)] if width > sum(lengths) else []
            batch.update(sequence_boundaries([lengths[i] for i in order] + tail))
        pixels = [samples[i].get("pixel_values") for i in order]
        pixels = [p for p in pixels if p is not None and p.shape[0] > 0]
        if pixels:
            batch["pixel_values"] = torch.cat(pixels)  # (N_images, 3, H, W), packed order
            batch.update(media_layout_of([samples[i] for i in order]))
        return batch


def sequence_boundaries(lengths: list[int]) -> dict[str, Any]:
    """transformers' varlen keyword arguments for samples laid end to end in one row."""
    cumulative = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cumulative[1:] = torch.tensor(lengths).cumsum(0)
    longest = max(lengths)
    return {
        "cu_seq_lens_q": cumulative,
        "cu_seq_lens_k": cumulative.clone(),
        "max_length_q": longest,
        "max_length_k": longest,
    }


def without_sample_lengths(batch: dict[str, Any]) -> dict[str, Any]:
    """The model's inputs of a (packed or padded) batch."""
    return {key: value for key, value in batch.items() if key != SAMPLE_LENGTHS}
