"""The peer for transformers' image-text-to-text models: TRL's SFTTrainer on the same weights,
as its documentation sets up vision fine-tuning: a dataset of `messages` and `images` columns
(images decoded from their files when a record is read), the model's processor as
`processing_class`, and TRL's default collator for vision datasets
(`DataCollatorForVisionLanguageModeling`: the processor applies the chat template to each
batch, tokenizes and makes the pixel inputs, right padding) with `assistant_only_loss=True`, so
the same answer tokens are supervised as in this project's run.

What TRL computes for the loss (trl 1.16, read from its code): SFTTrainer gives the model a
"fused LM head" (`add_fused_lm_head`): the forward runs the backbone, then projects hidden
states through the head in tiles of 4096 positions x 32768 vocabulary entries, keeping per-token
log-probabilities, entropy and top-1 flags, never the whole (B, T, V) logits; the backward
projects each tile again. On CUDA with Triton only positions with a label are projected; on
other devices (this CPU) every position of the padded batch is.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from typing import Any

import torch

from llava.bench.assets import Assets
from llava.bench.configs import BenchConfig
from llava.bench.runs import (
    CountingCollator,
    RunResult,
    timed_train,
    trainable_parameters,
    trainer_settings,
)
from llava.constants import IMAGE_TOKEN
from llava.train.throughput import ThroughputMeter

ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
NOT_INSTALLED = (
    "TRL is not installed: the image-text-to-text stages compare against TRL's SFTTrainer "
    '(pip install -e ".[bench]")'
)


def trl_installed() -> bool:
    return importlib.util.find_spec("trl") is not None


def conversation_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    """A LLaVA record's turns as chat messages, its <image> tag removed: TRL places a record's
    images before the first user message's text, where the benchmark's records have it."""
    messages = []
    for index, turn in enumerate(record["conversations"]):
        text = turn["value"]
        if IMAGE_TOKEN in text:
            if index != 0 or not text.startswith(IMAGE_TOKEN) or text.count(IMAGE_TOKEN) != 1:
                raise ValueError(f"record {record.get('id')}: TRL places one image first only")
            text = text[len(IMAGE_TOKEN) :].lstrip("\n")
        messages.append({"role": ROLES[turn["from"]], "content": text})
    return messages


def trl_dataset(path: str, image_folder: str):
    """The records of a LLaVA JSON file as a `datasets.Dataset` with `messages` and `images`
    (file paths cast to `Image`, decoded when a row is read, as hub VLM datasets are)."""
    from datasets import Dataset, Image, List

    with open(path) as f:
        records = json.load(f)
    rows = {
        "messages": [conversation_messages(record) for record in records],
        "images": [
            [os.path.join(image_folder, record["image"])] if record.get("image") else []
            for record in records
        ],
    }
    return Dataset.from_dict(rows).cast_column("images", List(Image()))


def build_trl(assets: Assets, config: BenchConfig, family: str):
    """make_trainer(part, steps, callbacks) over one model: an SFTTrainer per call (warm-up,
    measured run), every parameter training, as SFTTrainer trains a model it is given."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import SFTConfig, SFTTrainer

    model = AutoModelForImageTextToText.from_pretrained(
        assets.vlm(family), dtype=getattr(torch, config.dtype), attn_implementation="sdpa"
    )
    processor = AutoProcessor.from_pretrained(assets.vlm(family))
    settings = trainer_settings(config, family, tempfile.mkdtemp(prefix="bench-trl-"))
    meter = ThroughputMeter(None, None)

    def make_trainer(part: str, steps: int, callbacks: list):
        meter.start()
        args = SFTConfig(
            max_steps=steps,
            max_length=None,  # the records fit; never truncate (it would cut image tokens)
            assistant_only_loss=True,
            **settings,
        )
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=trl_dataset(assets.data(family, part), assets.images),
            processing_class=processor,
            callbacks=callbacks,
        )
        trainer.data_collator = CountingCollator(trainer.data_collator, meter)
        return trainer

    return make_trainer, meter


def run_trl(assets: Assets, config: BenchConfig, family: str, warmup: int, steps: int) -> RunResult:
    make_trainer, meter = build_trl(assets, config, family)
    trainer, seconds, peak, loss = timed_train(make_trainer, warmup, steps, config.device)
    return RunResult(
        "baseline", family, seconds, steps, meter.totals(), peak / 2**20, loss, config.device,
        options={"trainer": "trl.SFTTrainer", "trl": trl_version()},
        trainable_parameters=trainable_parameters(trainer.model),
    )  # fmt: skip


def trl_version() -> str:
    import trl

    return trl.__version__
