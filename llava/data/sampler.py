"""Modality- and length-grouped sampling (`--group_by_modality_length`, `--group_by_length`).

The sampler orders indices so that each global batch (world size x per-device batch x
gradient accumulation consecutive indices: one optimizer step over all ranks) holds one
modality, and the per-device batches inside it hold similar lengths. It is a pure function of
(seed, epoch): every rank computes the same order, and a resumed run gets it back.

Every index appears exactly once per epoch. When a modality's count is not a multiple of the
global batch, its remainder goes to the end of the epoch, so only the final global batches,
where the remainders meet, can mix modalities: at most one with two modalities (LLaVA's
sampler mixes its last batch the same way). Data of a single modality always works.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Sampler

# Lengths are sorted within pools of this many global batches (HF uses 50 per-device batches).
POOL_GLOBAL_BATCHES = 50


def chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


class ModalityLengthGroupedSampler(Sampler[int]):
    """Seeded, resumable sampler whose global batches are one modality and similar lengths.

    lengths: per-sample token counts; signed LLaVA-style (negative = text-only) when
    `modalities` is None. With `group_by_modality=False` every sample is one group
    (`--group_by_length`).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        per_device_batch_size: int,
        world_size: int = 1,
        gradient_accumulation_steps: int = 1,
        modalities: Sequence[str] | None = None,
        seed: int = 0,
        group_by_modality: bool = True,
        pool_global_batches: int = POOL_GLOBAL_BATCHES,
    ):
        if modalities is None:
            modalities = ["image" if n > 0 else "text" for n in lengths]
        if len(modalities) != len(lengths):
            raise ValueError("lengths and modalities differ in size")
        self.lengths = np.abs(np.asarray(lengths, dtype=np.int64))
        self.modalities = list(modalities) if group_by_modality else ["all"] * len(lengths)
        self.global_batch_size = per_device_batch_size * world_size * gradient_accumulation_steps
        self.per_device_batch_size = per_device_batch_size
        self.pool_size = self.global_batch_size * pool_global_batches
        self.seed = seed
        self.epoch = 0
        self.start_index = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the trainer each epoch; a new epoch starts from its first index."""
        if epoch != self.epoch:
            self.start_index = 0
        self.epoch = epoch

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "start_index": self.start_index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume: the next iteration yields the epoch's order from `start_index` on."""
        self.seed, self.epoch = state["seed"], state["epoch"]
        self.start_index = state["start_index"]

    def groups(self) -> list[list[int]]:
        """Indices of each modality, modalities in a fixed (sorted) order."""
        by_modality: dict[str, list[int]] = {}
        for index, modality in enumerate(self.modalities):
            by_modality.setdefault(modality, []).append(index)
        return [by_modality[name] for name in sorted(by_modality)]

    def global_batches(self, epoch: int) -> tuple[list[list[int]], list[list[int]]]:
        """(full global batches in random order, each modality's remainder) for an epoch."""
        rng = np.random.default_rng([self.seed, epoch])
        full, remainders = [], []
        for group in self.groups():
            shuffled = [group[k] for k in rng.permutation(len(group))]
            batches = []
            for pool in chunks(shuffled, self.pool_size):
                pool.sort(key=lambda index: -self.lengths[index])  # stable: ties keep the shuffle
                batches += chunks(pool, self.global_batch_size)
            if batches and len(batches[-1]) < self.global_batch_size:
                remainders.append(batches.pop())
            full += batches
        full = [full[k] for k in rng.permutation(len(full))]
        if full:  # the batch with the longest sample first: out-of-memory shows at step one
            longest = max(range(len(full)), key=lambda k: self.lengths[full[k][0]])
            full.insert(0, full.pop(longest))
        return full, remainders

    def order(self, epoch: int | None = None) -> list[int]:
        """Every index once, for `epoch` (default: the current one)."""
        full, remainders = self.global_batches(self.epoch if epoch is None else epoch)
        return [index for batch in full + remainders for index in batch]

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.start_index :])

    def __len__(self) -> int:
        return len(self.lengths) - self.start_index


def build_train_sampler(
    dataset: Any,
    per_device_batch_size: int,
    world_size: int = 1,
    gradient_accumulation_steps: int = 1,
    group_by_modality_length: bool = False,
    group_by_length: bool = False,
    seed: int = 0,
) -> ModalityLengthGroupedSampler | None:
    """The sampler the flags ask for, or None to keep the trainer's default random sampler.

    `dataset` exposes `lengths` and `modalities` (SupervisedDataset does).
    """
    if not (group_by_modality_length or group_by_length):
        return None
    return ModalityLengthGroupedSampler(
        dataset.lengths,
        per_device_batch_size=per_device_batch_size,
        world_size=world_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        modalities=dataset.modalities,
        seed=seed,
        group_by_modality=group_by_modality_length,
    )
