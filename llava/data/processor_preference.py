"""Preference pairs for DPO on transformers image-text-to-text models, through the model's own
processor and chat template.

The pairs are read as for the composed model (llava/data/preference.py: the same layouts, the
same bad-pair errors and counts) and encoded as stage 2 encodes these models' records
(llava/data/processor_media.py): each image expanded as the processor expands it, from its
header size, so a pair's length is exact before any image is decoded; only the last answer and
its end token are supervised; both sequences share the prompt's ids (checked); a pair too long
is dropped and counted. When a pair is loaded the processor runs on both rendered texts, and
its input_ids must equal the ids built turn by turn.

A batch holds 2B rows (the B chosen sequences, then the B rejected ones) with the processor's
per-token outputs (token_type_ids, mm_token_type_ids) for every row, and under `image_inputs`
the pairs' image inputs once (pixel_values, image_grid_thw, pixel_attention_mask, ...), in
pair order; llava/train/dpo_vlm.py gives them to both rows.

Not served: processors without a chat template that take a bare prompt and a suffix
(PaliGemma's, Fuyu's: `is_prompt_suffix`), refused by name; their pairs would need a processor
call per answer and a prompt check of their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from llava.conversation import get_template
from llava.data.collator import SupervisedCollator, pad_token_id_of
from llava.data.dataset import DataSummary
from llava.data.formats import BadRecordError
from llava.data.images import DEFAULT_MAX_IMAGE_PIXELS, read_size
from llava.data.preference import (
    CHOSEN,
    REJECTED,
    EncodedPair,
    PreferenceDataset,
    PreferenceRecord,
    encoded_pair,
    read_pairs,
)
from llava.data.processor_collator import (
    IMAGES,
    OWN_KEYS,
    SEQUENCE,
    batching_rules,
    concatenate,
    pad_and_stack,
)
from llava.data.processor_media import (
    ProcessorConversationTokenizer,
    ProcessorMedia,
    RenderedConversation,
    first_difference,
    is_prompt_suffix,
)
from llava.data.tokenize import starts_with_bos

IMAGE_INPUTS = "image_inputs"  # the batch's key for the pairs' image inputs (given once)


class ProcessorPreferenceDataset(PreferenceDataset):
    """Pairs -> {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"
    (T,) each, "chosen_inputs" and "rejected_inputs": the processor's other outputs for each
    sequence}; the images are decoded once per pair."""

    def __init__(
        self,
        records: Sequence[PreferenceRecord],
        processor: Any,
        template: Any,
        model_max_length: int,
        **dataset_options: Any,
    ):
        """`dataset_options`: PreferenceDataset's (skip_bad_records, summary, skipped, ...)."""
        if is_prompt_suffix(processor):
            raise ValueError(
                f"{type(processor).__name__} has no chat template (a prompt+suffix processor, "
                "as PaliGemma's and Fuyu's): DPO is not implemented for it"
            )
        self.processor = processor
        self.media = ProcessorMedia(processor)
        conversation_tokenizer = ProcessorConversationTokenizer(processor, template, self.media)
        super().__init__(
            records,
            processor.tokenizer,
            conversation_tokenizer.template,
            model_max_length,
            conversation_tokenizer=conversation_tokenizer,
            **dataset_options,
        )

    def sizes(self, record: PreferenceRecord, images: Sequence[Image.Image] = ()) -> list:
        """Each image's (width, height): the decoded ones', else from the file headers."""
        if images:
            return [image.size for image in images]
        try:
            return [read_size(source, self.max_image_pixels) for source in record.images]
        except ValueError as error:
            raise BadRecordError(record.source, record.index, str(error), record.id) from None

    def rendered_pair(
        self, record: PreferenceRecord, images: Sequence[Image.Image] = ()
    ) -> tuple[EncodedPair, list[RenderedConversation]]:
        """Both sequences (chosen, rejected) of a record, untruncated, or BadRecordError."""
        sizes = self.sizes(record, images)
        conversations = [record.turns(record.chosen), record.turns(record.rejected)]
        encode = self.conversation_tokenizer.encode_with_sizes
        rendered = encode(conversations, [sizes, sizes])
        try:
            for item in rendered:
                if isinstance(item, ValueError):
                    raise item
            return encoded_pair(rendered[0].encoded, rendered[1].encoded), rendered
        except ValueError as error:
            raise BadRecordError(record.source, record.index, str(error), record.id) from None

    def encode(self, record: PreferenceRecord) -> EncodedPair:
        return self.rendered_pair(record)[0]

    def load(self, i: int) -> dict[str, Any]:
        record = self.records[i]
        images = self.decode_images(record)
        pair, rendered = self.rendered_pair(record, images)
        if pair.length != self.lengths[i]:
            reason = "its images decode to other sizes than their headers say"
            raise BadRecordError(record.source, record.index, reason, record.id)
        item: dict[str, Any] = {}
        for side, conversation, ids, labels in (
            (CHOSEN, rendered[0], pair.chosen_input_ids, pair.chosen_labels),
            (REJECTED, rendered[1], pair.rejected_input_ids, pair.rejected_labels),
        ):
            text = self.media.text(conversation.segments)
            inputs = self.media(text, images, not starts_with_bos(self.media.tokenizer, text))
            self.check_ids(record, ids, inputs["input_ids"][0].tolist())
            item[f"{side}_input_ids"] = torch.tensor(ids, dtype=torch.long)  # (T,)
            item[f"{side}_labels"] = torch.tensor(labels, dtype=torch.long)  # (T,)
            item[f"{side}_inputs"] = {k: v for k, v in inputs.items() if k not in OWN_KEYS}
        return item

    def check_ids(self, record: PreferenceRecord, ours: list[int], theirs: list[int]) -> None:
        """The processor's input_ids must be the ids built turn by turn (labels rest on them)."""
        if ours == theirs:
            return
        at = first_difference(ours, theirs)
        reason = (
            f"the processor's input_ids differ from the ones built turn by turn at position {at} "
            f"(lengths {len(theirs)} and {len(ours)})"
        )
        raise BadRecordError(record.source, record.index, reason, record.id)


@dataclass
class ProcessorPreferenceCollator:
    """Pairs -> one batch of 2B rows, the B chosen sequences then the B rejected ones
    (input_ids, labels, attention_mask and the processor's per-token outputs, (2B, T)), and
    `image_inputs`: the pairs' image inputs once, batched by their rule (`batching_rules`):
    per-image ones concatenated in pair order, per-sample ones stacked (B, ...)."""

    pad_token_id: int
    batching: dict[str, str]
    padding_side: str = "right"

    def __call__(self, pairs: list[dict[str, Any]]) -> dict[str, Any]:
        rows = [
            {"input_ids": pair[f"{side}_input_ids"], "labels": pair[f"{side}_labels"]}
            for side in (CHOSEN, REJECTED)
            for pair in pairs
        ]
        batch: dict[str, Any] = SupervisedCollator(self.pad_token_id, self.padding_side)(rows)
        length = batch["input_ids"].shape[1]
        row_inputs = [pair[f"{side}_inputs"] for side in (CHOSEN, REJECTED) for pair in pairs]
        pair_inputs = [pair[f"{CHOSEN}_inputs"] for pair in pairs]
        unknown = {key for inputs in row_inputs for key in inputs} - set(self.batching)
        if unknown:
            raise ValueError(f"pairs hold {sorted(unknown)}, which the processor probe did not")
        image_inputs = {}
        for key, rule in self.batching.items():
            if rule == SEQUENCE:
                values = [inputs.get(key) for inputs in row_inputs]
                if any(value is not None for value in values):
                    batch[key] = pad_and_stack(values, length, self.padding_side)  # (2B, T, ...)
                continue
            values = [inputs.get(key) for inputs in pair_inputs]
            present = [value for value in values if value is not None]
            if not present:
                continue
            if rule == IMAGES:
                image_inputs[key] = concatenate(present)  # (N, ...) the pairs' images
            else:
                image_inputs[key] = pad_and_stack(values, None, self.padding_side)  # (B, ...)
        if image_inputs:
            batch[IMAGE_INPUTS] = image_inputs
        return batch


def build_processor_preference_data(
    processor: Any,
    data_args: Any,
    version: str,
    model_max_length: int,
    skip_log_dir: str | None = None,
) -> tuple[ProcessorPreferenceDataset, ProcessorPreferenceCollator]:
    """The DPO entry's one call for a model with its own processor: (dataset, collator)."""
    records, skipped = read_pairs(data_args)
    dataset = ProcessorPreferenceDataset(
        records,
        processor,
        get_template(version),
        model_max_length,
        skip_bad_records=getattr(data_args, "skip_bad_records", False),
        summary=DataSummary(source=data_args.data_path),
        skipped=skipped,
        skip_log_dir=skip_log_dir,
        max_image_pixels=getattr(data_args, "max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS),
    )
    if len(dataset) == 0:
        raise ValueError(f"no pair to train on in {data_args.data_path}: {dataset.summary.line()}")
    collator = ProcessorPreferenceCollator(
        pad_token_id_of(processor.tokenizer), batching_rules(dataset.media)
    )
    return dataset, collator
