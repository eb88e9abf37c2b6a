"""The anyres stage's baseline: transformers' LlavaNextForConditionalGeneration and the stock
Trainer on the same weights, its data through the LlavaNextProcessor export_hf writes (images
tiled, the image token repeated as many times as each image's size gives), labels masked as the
llava stages' baseline masks them, right padding."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from llava.bench.assets import Assets
from llava.bench.baseline import IGNORE, IMAGE, HFLlavaCollator, JsonRecords, vicuna_rounds
from llava.bench.configs import ANYRES_STAGE, BenchConfig
from llava.bench.runs import CountingCollator, freeze_baseline, trainer_settings
from llava.data.media import TILED, AnyRes
from llava.train.throughput import ThroughputMeter


@dataclass
class LlavaNextCollator:
    """Records -> {input_ids, attention_mask, labels, pixel_values (images, max tiles, 3, H, W),
    image_sizes} for LlavaNextForConditionalGeneration, through its processor."""

    processor: Any
    image_folder: str
    model_max_length: int

    def labels(self, record: dict[str, Any], ids: list[int], image_tokens: int) -> list[int]:
        """LLaVA's round-by-round masking (the llava stages' baseline) with the image's token
        count the processor gave it; its ids must be the processor's."""
        masking = HFLlavaCollator(
            self.processor.tokenizer, None, image_tokens, self.image_folder, "v1",
            self.model_max_length,
        )  # fmt: skip
        expected, labels = masking.encode(record)
        if expected != ids:
            raise RuntimeError(f"the processor's tokens of record {record['id']} are not LLaVA's")
        return labels

    def __call__(self, records: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        texts = [
            "".join(text for text, _ in vicuna_rounds(record["conversations"]))
            for record in records
        ]
        paths = [f"{self.image_folder}/{r['image']}" for r in records if r.get("image")]
        images = [Image.open(path).convert("RGB") for path in paths] or None
        # input_ids, attention_mask (B, T); pixel_values (images, max tiles, 3, H, W);
        # image_sizes (images, 2), height and width
        batch = self.processor(text=texts, images=images, padding=True, return_tensors="pt")
        image_token_id = self.processor.tokenizer.convert_tokens_to_ids(IMAGE)
        labels = torch.full_like(batch["input_ids"], IGNORE)  # (B, T)
        for row, record in enumerate(records):
            length = int(batch["attention_mask"][row].sum())
            ids = batch["input_ids"][row, :length]
            image_tokens = int((ids == image_token_id).sum())
            labels[row, :length] = torch.tensor(self.labels(record, ids.tolist(), image_tokens))
        batch["labels"] = labels
        return dict(batch)


class ViewCountingCollator(CountingCollator):
    """Counts each image's views the tower sees (base and tiles), as this project's batches
    hold them, not the processor's images padded to the batch's most tiles."""

    def __init__(self, collator, meter: ThroughputMeter, anyres: AnyRes):
        super().__init__(collator, meter)
        self.anyres = anyres

    def __call__(self, records):
        batch = self.collator(records)
        counted = dict(batch)
        if "pixel_values" in batch:
            sizes = batch["image_sizes"].tolist()  # (height, width) each
            views = sum(self.anyres.medium_views(TILED, (w, h)) for h, w in sizes)
            counted["pixel_values"] = torch.empty(views, 0)
        self.meter.record(counted)
        return batch


def build_anyres_baseline(assets: Assets, config: BenchConfig):
    """make_trainer(part, steps, callbacks) over LlavaNext, and the meter of its batches."""
    from transformers import (
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
        Trainer,
        TrainingArguments,
    )

    model = LlavaNextForConditionalGeneration.from_pretrained(
        assets.hf_llava_next, torch_dtype=getattr(torch, config.dtype), attn_implementation="sdpa"
    )
    model = freeze_baseline(model, "finetune", config)
    model.model.image_newline.requires_grad_(True)  # trained beside the projector, as ours
    collator = LlavaNextCollator(
        LlavaNextProcessor.from_pretrained(assets.hf_llava_next),
        assets.images,
        config.anyres_max_length,
    )
    settings = trainer_settings(config, ANYRES_STAGE, tempfile.mkdtemp(prefix="bench-baseline-"))
    if config.gradient_checkpointing:
        settings["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    meter = ThroughputMeter(None, None)

    def make_trainer(part: str, steps: int, callbacks: list):
        meter.start()
        args = TrainingArguments(max_steps=steps, remove_unused_columns=False, **settings)
        return Trainer(
            model=model,
            args=args,
            train_dataset=JsonRecords(assets.data(ANYRES_STAGE, part)),
            data_collator=ViewCountingCollator(collator, meter, config.anyres),
            callbacks=callbacks,
        )

    return make_trainer, meter
