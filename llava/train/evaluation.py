"""Exact validation loss and perplexity: summed over supervised tokens, on disjoint shards.

The trainer's stock evaluation averages per-batch means and pads the last batches with
repeated samples, so its loss is not the mean over supervised tokens. Here each rank reads
every world_size-th sample; the shorter shards are padded with a sample whose labels are all
ignored (it keeps the ranks in step under ZeRO-3 and adds nothing), and the sums of losses and
of supervised tokens are added up across ranks before dividing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from llava.constants import IGNORE_INDEX


class PaddedShard(Dataset):
    """Rank `rank`'s samples (every `world_size`-th), padded to ceil(n / world_size)."""

    def __init__(self, dataset: Dataset, rank: int, world_size: int):
        if len(dataset) == 0:
            raise ValueError("the validation set is empty")
        self.dataset, self.rank, self.world_size = dataset, rank, world_size

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / self.world_size)

    def __getitem__(self, i: int) -> dict[str, Any]:
        index = i * self.world_size + self.rank
        if index < len(self.dataset):
            return self.dataset[index]
        blank = dict(self.dataset[0])
        blank["labels"] = torch.full_like(blank["labels"], IGNORE_INDEX)
        return blank


@torch.no_grad()
def summed_loss(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    prepare: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] = lambda batch: batch,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token losses, number of supervised tokens) over batches, in float32."""
    total = torch.zeros((), dtype=torch.float32)
    count = torch.zeros((), dtype=torch.long)
    for batch in batches:
        batch = prepare(batch)
        # num_items_in_batch=1 makes the model return the sum instead of the mean.
        total += model(**batch, num_items_in_batch=1).loss.float().cpu()
        count += (batch["labels"][:, 1:] != IGNORE_INDEX).sum().cpu()
    return total, count


def loss_metrics(total: float, count: int, prefix: str = "eval") -> dict[str, float]:
    """Mean supervised-token loss and its exp (perplexity)."""
    if count == 0:
        raise ValueError("the validation set has no supervised token")
    loss = total / count
    return {
        f"{prefix}_loss": loss,
        f"{prefix}_perplexity": math.exp(loss),
        f"{prefix}_tokens": count,
    }
