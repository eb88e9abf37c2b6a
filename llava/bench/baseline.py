"""The baseline a user would pick instead: transformers' Llava with the stock Trainer and its
usual data path (records collated in the main process, the image token repeated
`image_seq_length` times, right padding, labels with the prompt masked as LLaVA does)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from llava.conversation import VICUNA_SYSTEM

IGNORE = -100
IMAGE = "<image>"
logger = logging.getLogger(__name__)


class JsonRecords(Dataset):
    """The records of a LLaVA JSON file, undecoded (the collator does the work)."""

    def __init__(self, path: str):
        with open(path) as f:
            self.records = json.load(f)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.records[index]


def vicuna_rounds(conversations: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """(text, supervised) pieces of LLaVA's vicuna_v1 rendering; answers end with </s>."""
    pieces, prompt = [], VICUNA_SYSTEM + " "
    for turn in conversations:
        if turn["from"] == "human":
            prompt += "USER: " + turn["value"] + " ASSISTANT:"
        else:
            pieces += [(prompt, False), (" " + turn["value"] + "</s>", True)]
            prompt = ""
    return pieces


def plain_rounds(conversations: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """LLaVA's `plain` stage-1 rendering: the image, then the caption and a newline."""
    return [(IMAGE, False), (conversations[1]["value"] + "\n", True)]


@dataclass
class HFLlavaCollator:
    """Records -> {input_ids, attention_mask, labels, pixel_values} for LlavaForConditionalGeneration."""

    tokenizer: Any
    image_processor: Any
    image_seq_length: int
    image_folder: str
    version: str  # plain | v1
    model_max_length: int

    def rounds(self, record: dict[str, Any]) -> list[tuple[str, bool]]:
        render = plain_rounds if self.version == "plain" else vicuna_rounds
        expanded = IMAGE * self.image_seq_length
        return [
            (text.replace(IMAGE, expanded), sup) for text, sup in render(record["conversations"])
        ]

    def encode(self, record: dict[str, Any]) -> tuple[list[int], list[int]]:
        """Tokenize the whole text, then mask the prompt parts by their token counts (LLaVA's
        round-by-round counting); a count that disagrees masks the sample, as LLaVA does."""
        rounds = self.rounds(record)
        input_ids = self.tokenizer("".join(text for text, _ in rounds)).input_ids
        labels = list(input_ids)
        cursor = 1  # BOS
        for text, supervised in rounds:
            count = len(self.tokenizer(text, add_special_tokens=False).input_ids)
            if not supervised:
                labels[cursor : cursor + count] = [IGNORE] * count
            cursor += count
        labels[0] = IGNORE
        if cursor != len(input_ids):
            logger.warning("tokenization mismatch: %d vs. %d (ignored)", cursor, len(input_ids))
            labels = [IGNORE] * len(input_ids)
        return input_ids[: self.model_max_length], labels[: self.model_max_length]

    def __call__(self, records: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        encoded = [self.encode(record) for record in records]
        length = max(len(ids) for ids, _ in encoded)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(records), length), pad, dtype=torch.long)  # (B, T)
        labels = torch.full((len(records), length), IGNORE, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(records), length), dtype=torch.long)  # (B, T)
        for row, (ids, row_labels) in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(ids)] = torch.tensor(row_labels)
            attention_mask[row, : len(ids)] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        paths = [f"{self.image_folder}/{r['image']}" for r in records if r.get("image")]
        if paths:
            images = [Image.open(path).convert("RGB") for path in paths]
            batch["pixel_values"] = self.image_processor(images, return_tensors="pt")[
                "pixel_values"
            ]  # (N, 3, H, W)
        return batch
