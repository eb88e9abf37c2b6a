"""Preference pairs for DPO: a prompt (with its images) and a chosen and a rejected answer.

Two record layouts are read from JSON / JSONL files:

- LLaVA style (RLHF-V, LLaVA-NeXT's DPO sets): {"id", "image" or "images", "conversations":
  [prompt turns, ending with the user's], "chosen": str, "rejected": str}; "prompt": str may
  stand for a one-turn "conversations".
- OpenAI messages pairs (TRL's conversational layout): {"images": [...], "prompt": [messages],
  "chosen": [assistant message(s)] or str, "rejected": likewise}.

Each answer becomes the last assistant turn of the prompt's conversation and is tokenized turn
by turn exactly as stage 2 tokenizes it (llava/data/tokenize.py); only that last answer (with
the template's end token) is supervised, earlier assistant turns of the prompt are not. Both
sequences share the prompt's ids (checked) and the pair's images, which are loaded once
(tiled by AnyRes for a model trained with it: llava/data/anyres_preference.py). A pair longer
than model_max_length is dropped and counted (cutting would change an answer). Bad pairs
(identical or empty answers, missing images, a video, a prompt that ends with the assistant)
raise `BadRecordError` naming the file, index and id, or with skip_bad_records are counted,
listed through `llava.data.skipped`, and skipped.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN
from llava.conversation import ASSISTANT, USER, ChatTemplate, Turn, get_template
from llava.data.collator import SupervisedCollator, pad_token_id_of
from llava.data.dataset import IMAGE, TEXT, DataSummary
from llava.data.formats import (
    BadRecordError,
    DataFileError,
    check_roles,
    llava_turns,
    message_turns,
    place_image_tags,
    read_json_rows,
    resolve_image,
    row_images,
)
from llava.data.images import DEFAULT_MAX_IMAGE_PIXELS, check_aspect_ratio, load_image
from llava.data.images import process_images as process_image_list
from llava.data.media import is_anyres
from llava.data.skipped import DECODE, LOAD, SkipLog
from llava.data.tokenize import ConversationTokenizer, EncodedConversation

logger = logging.getLogger(__name__)

CHOSEN, REJECTED = "chosen", "rejected"
IMAGE_KEYS = ("pixel_values", "image_sizes", "media_kinds")  # a pair's, given once per batch


@dataclass(frozen=True)
class PreferenceRecord:
    """A prompt (turns ending with the user's), two answers, and the prompt's images in order."""

    prompt: tuple[Turn, ...]
    chosen: str
    rejected: str
    images: tuple[Any, ...]
    source: str
    index: int
    id: Any = None

    def turns(self, answer: str) -> list[Turn]:
        return [*self.prompt, Turn(ASSISTANT, answer)]


# -- rows -> records ---------------------------------------------------------------------------
def answer_of(value: Any, name: str) -> str:
    """An answer given as a string, one message, or a list of assistant messages (joined)."""
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        turns, inline = message_turns(value)
        if inline or any(turn.role != ASSISTANT for turn in turns):
            raise ValueError(f"the {name} answer must be assistant text, without images")
        value = "\n".join(turn.text for turn in turns)
    if not isinstance(value, str):
        raise ValueError(f"no {name} answer (a string or assistant messages)")
    if not value.strip():
        raise ValueError(f"the {name} answer is empty")
    if IMAGE_TOKEN in value:
        raise ValueError(f"the {name} answer holds an {IMAGE_TOKEN} tag")
    return value


def prompt_of(row: dict[str, Any], images: list[Any]) -> tuple[list[Turn], bool]:
    """(the prompt's turns, whether it is LLaVA-style); inline message images join `images`."""
    if "conversations" in row:
        return llava_turns(row["conversations"]), True
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        return [Turn(USER, prompt)], True
    if isinstance(prompt, list):
        turns, inline = message_turns(prompt)
        if inline and images:
            raise ValueError("images both inside the prompt messages and in the images field")
        images.extend(inline)
        return turns, False
    raise ValueError("no prompt: expected 'conversations' (LLaVA) or 'prompt' (messages)")


def parse_preference_row(
    row: Any, source: str, index: int, base_folder: str | None, check_files: bool = True
) -> PreferenceRecord:
    """One row as a PreferenceRecord, or BadRecordError naming `source`, `index` and its id."""
    record_id = row.get("id") if isinstance(row, dict) else None
    try:
        if not isinstance(row, dict):
            raise ValueError(f"a record must be a JSON object, found {type(row).__name__}")
        if "video" in row or "videos" in row:
            raise ValueError("a video: videos in preference pairs are not implemented for DPO")
        images = row_images(row, "images" if "images" in row else "image")
        prompt, llava_style = prompt_of(row, images)
        chosen, rejected = (
            answer_of(row.get(CHOSEN), CHOSEN),
            answer_of(row.get(REJECTED), REJECTED),
        )
        if chosen.strip() == rejected.strip():
            raise ValueError("the chosen and rejected answers are identical")
        if prompt and prompt[-1].role == ASSISTANT:
            raise ValueError("the prompt ends with an assistant turn; it must end with the user's")
        turns = check_roles([*prompt, Turn(ASSISTANT, chosen)])
        turns = place_image_tags(
            turns, len(images), move_single_tag=llava_style, tags_required=True
        )
        images = [resolve_image(image, base_folder) for image in images]
        for image in images:
            if check_files and isinstance(image, str) and not os.path.isfile(image):
                raise ValueError(f"image file {image!r} not found")
    except (ValueError, AttributeError, TypeError) as error:
        raise BadRecordError(source, index, str(error), record_id) from None
    return PreferenceRecord(
        tuple(turns[:-1]), chosen, rejected, tuple(images), source, index, record_id
    )


def read_preference_records(
    data_path: str, image_folder: str | None = None
) -> Iterator[PreferenceRecord | BadRecordError]:
    """Records of a .json / .jsonl file, bad ones as BadRecordError items (not raised)."""
    if not os.path.isfile(data_path):
        raise FileNotFoundError(f"--data_path {data_path!r} does not exist")
    if not data_path.endswith((".json", ".jsonl")):
        raise DataFileError(data_path, "preference data must be a .json or .jsonl file")
    base_folder = image_folder or os.path.dirname(os.path.abspath(data_path))
    for index, row in read_json_rows(data_path):
        if isinstance(row, BadRecordError):
            yield row
            continue
        try:
            yield parse_preference_row(row, data_path, index, base_folder)
        except BadRecordError as error:
            yield error


# -- records -> token ids --------------------------------------------------------------------------
def last_answer_only(encoded: EncodedConversation) -> list[int]:
    """The labels with only the last supervised run kept: the final answer and its end token
    (earlier assistant turns of the prompt are separated from it by an unsupervised turn)."""
    labels = list(encoded.labels)
    end = max((i + 1 for i, label in enumerate(labels) if label != IGNORE_INDEX), default=0)
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return [IGNORE_INDEX] * start + labels[start:end] + [IGNORE_INDEX] * (len(labels) - end)


@dataclass(frozen=True)
class EncodedPair:
    """Both sequences of a pair: ids and labels (the answer's tokens only) and its image count."""

    chosen_input_ids: list[int]
    chosen_labels: list[int]
    rejected_input_ids: list[int]
    rejected_labels: list[int]
    num_images: int

    @property
    def length(self) -> int:
        return max(len(self.chosen_input_ids), len(self.rejected_input_ids))


def answer_start(labels: list[int]) -> int:
    return next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))


def encoded_pair(chosen: EncodedConversation, rejected: EncodedConversation) -> EncodedPair:
    """The pair's sequences; a ValueError where the two prompts' ids differ (they are encoded
    segment by segment, so they cannot, unless a template renders the prompt after the answer)."""
    chosen_labels, rejected_labels = last_answer_only(chosen), last_answer_only(rejected)
    start = answer_start(chosen_labels)
    if (
        start != answer_start(rejected_labels)
        or chosen.input_ids[:start] != rejected.input_ids[:start]
    ):
        raise ValueError("the prompt's tokens differ before the chosen and the rejected answer")
    if start == len(chosen_labels) or answer_start(rejected_labels) == len(rejected_labels):
        raise ValueError("an answer has no token to score")
    return EncodedPair(
        chosen.input_ids,
        chosen_labels,
        rejected.input_ids,
        rejected_labels,
        len(chosen.image_spans),
    )


def pair_tensors(pair: EncodedPair) -> dict[str, torch.Tensor]:
    return {
        "chosen_input_ids": torch.tensor(pair.chosen_input_ids),  # (T_c,)
        "chosen_labels": torch.tensor(pair.chosen_labels),  # (T_c,)
        "rejected_input_ids": torch.tensor(pair.rejected_input_ids),  # (T_r,)
        "rejected_labels": torch.tensor(pair.rejected_labels),  # (T_r,)
    }


# -- the dataset ----------------------------------------------------------------------------------
class PreferenceDataset(Dataset):
    """Pairs -> {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"
    (T,) each, "pixel_values" (N, 3, H, W) or None}; `lengths` (the longer sequence) and
    `modalities` for the grouped samplers, as SupervisedDataset has them."""

    def __init__(
        self,
        records: Sequence[PreferenceRecord],
        tokenizer: Any,
        template: ChatTemplate | str,
        model_max_length: int,
        image_processor: Any = None,
        num_image_tokens: int = 0,
        image_aspect_ratio: str = "square",
        mm_use_im_start_end: bool = False,
        skip_bad_records: bool = False,
        summary: DataSummary | None = None,
        skipped: Sequence[BadRecordError] = (),
        skip_log_dir: str | None = None,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        conversation_tokenizer: ConversationTokenizer | None = None,
    ):
        """`conversation_tokenizer`: one built elsewhere (a processor's, see
        llava/data/processor_preference.py); by default the composed model's, from `tokenizer`,
        `template`, `num_image_tokens` and `mm_use_im_start_end`."""
        check_aspect_ratio(image_aspect_ratio)
        self.conversation_tokenizer = conversation_tokenizer or ConversationTokenizer(
            tokenizer, template, num_image_tokens, mm_use_im_start_end
        )
        self.model_max_length = model_max_length
        self.image_processor = image_processor
        self.image_aspect_ratio = image_aspect_ratio
        self.max_image_pixels = max_image_pixels
        self.skip_bad_records = skip_bad_records
        self.skip_log = SkipLog(skip_log_dir)
        self.summary = summary or DataSummary(source="records")
        self.summary.records = self.summary.records or len(records) + len(skipped)
        self.records: list[PreferenceRecord] = []
        self.lengths: list[int] = []
        self.modalities: list[str] = []
        for error in skipped:
            self.bad(error)
        for record in records:
            self.add(record)
        logger.warning("%s (pairs)", self.summary.line())

    def encode(self, record: PreferenceRecord) -> EncodedPair:
        """Both sequences of a record, untruncated, or BadRecordError naming it."""
        return self.encode_pair(record)

    def encode_pair(
        self, record: PreferenceRecord, image_ids: Sequence[Sequence[int]] | None = None
    ) -> EncodedPair:
        """Both sequences with `image_ids`, each image's ids where they depend on its size
        (see ConversationTokenizer.encode_many; None: the tokenizer's fixed ones)."""
        if record.images and self.image_processor is None:
            raise ValueError(f"{record.source} record {record.index} has images but no processor")
        conversations = [record.turns(record.chosen), record.turns(record.rejected)]
        both = None if image_ids is None else [image_ids, image_ids]
        chosen, rejected = self.conversation_tokenizer.encode_many(conversations, both)
        try:
            for item in (chosen, rejected):
                if isinstance(item, ValueError):
                    raise item
            return encoded_pair(chosen, rejected)
        except ValueError as error:
            raise BadRecordError(record.source, record.index, str(error), record.id) from None

    def add(self, record: PreferenceRecord) -> None:
        try:
            pair = self.encode(record)
        except BadRecordError as error:
            self.bad(error)
            return
        if pair.length > self.model_max_length:
            self.summary.dropped_too_long += 1
            return
        modality = IMAGE if pair.num_images else TEXT
        self.summary.image_samples += int(modality == IMAGE)
        self.summary.text_samples += int(modality == TEXT)
        self.records.append(record)
        self.lengths.append(pair.length)
        self.modalities.append(modality)

    def bad(self, error: BadRecordError) -> None:
        if not self.skip_bad_records:
            raise error
        self.summary.skipped_bad += 1
        self.skip_log.add(error, LOAD)
        if len(self.summary.reasons) < 10:
            self.summary.reasons.append(str(error))

    @property
    def modality_lengths(self) -> list[int]:
        return [n if m == IMAGE else -n for n, m in zip(self.lengths, self.modalities)]

    @property
    def max_images_per_sample(self) -> int:
        return max((len(record.images) for record in self.records), default=0)

    def __len__(self) -> int:
        return len(self.records)

    def decode_images(self, record: PreferenceRecord) -> list[Any]:
        """The pair's images, decoded once for both answers, or BadRecordError naming it."""
        try:
            return [load_image(source, self.max_image_pixels) for source in record.images]
        except ValueError as error:
            raise BadRecordError(record.source, record.index, str(error), record.id) from None

    def pixel_values(self, record: PreferenceRecord) -> torch.Tensor | None:
        """(N, 3, H, W): the pair's images, loaded once for both answers."""
        if not record.images:
            return None
        images = self.decode_images(record)
        try:
            return process_image_list(images, self.image_processor, self.image_aspect_ratio)
        except ValueError as error:
            raise BadRecordError(record.source, record.index, str(error), record.id) from None

    def load(self, i: int) -> dict[str, Any]:
        record = self.records[i]
        return {**pair_tensors(self.encode(record)), "pixel_values": self.pixel_values(record)}

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Pair i; with skip_bad_records an image that fails to decode makes it the next pair
        of its modality (the same on every rank and on resume), as SupervisedDataset does."""
        for step in range(len(self)):
            j = (i + step) % len(self)
            if self.modalities[j] != self.modalities[i]:
                continue
            try:
                return self.load(j)
            except BadRecordError as error:
                if not self.skip_bad_records:
                    raise
                if self.skip_log.add(error, DECODE):
                    self.summary.replaced_when_decoding += 1
                    logger.warning("bad pair replaced by the next of its modality: %s", error)
        raise RuntimeError(f"every {self.modalities[i]} pair of {self.summary.source} is bad")


@dataclass
class PreferenceCollator:
    """Pairs -> one padded batch of 2B rows, the B chosen sequences then the B rejected ones
    (input_ids, labels, attention_mask (2B, T)), and `pixel_values` (N, 3, H, W): the pairs'
    images once, in pair order (with AnyRes, their views, and `image_sizes` and `media_kinds`
    once per pair's media); the model gives each image's features to both of its rows."""

    pad_token_id: int
    padding_side: str = "right"

    def __call__(self, pairs: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [
            {"input_ids": pair[f"{side}_input_ids"], "labels": pair[f"{side}_labels"]}
            for side in (CHOSEN, REJECTED)
            for pair in pairs
        ]
        for row, pair in zip(rows, pairs):  # the chosen rows carry the images
            for key in IMAGE_KEYS:
                row[key] = pair.get(key)
        return SupervisedCollator(self.pad_token_id, self.padding_side)(rows)


def read_pairs(data_args: Any) -> tuple[list[PreferenceRecord], list[BadRecordError]]:
    """(the pairs, the bad ones skipped) of --data_path; without --skip_bad_records the first
    bad pair is raised."""
    records, skipped = [], []
    for item in read_preference_records(data_args.data_path, data_args.image_folder):
        if isinstance(item, BadRecordError):
            if not getattr(data_args, "skip_bad_records", False):
                raise item
            skipped.append(item)
        else:
            records.append(item)
    return records, skipped


def build_preference_data(
    tokenizer: Any,
    image_processor: Any,
    num_image_tokens: int,
    data_args: Any,
    version: str,
    model_max_length: int,
    mm_use_im_start_end: bool = False,
    skip_log_dir: str | None = None,
    anyres: Any = None,
) -> tuple[PreferenceDataset, PreferenceCollator]:
    """The DPO entry's one call: (dataset, collator) from the data flags; `anyres` (the
    model's llava.data.media.AnyRes, with --image_aspect_ratio anyres or anyres_max_N): each
    image's tokens and tiles by its size (llava.data.anyres_preference)."""
    image_aspect_ratio = getattr(data_args, "image_aspect_ratio", "square")
    check_aspect_ratio(image_aspect_ratio)  # before any file is read
    if (anyres is not None) != is_anyres(image_aspect_ratio):
        raise ValueError(
            f"--image_aspect_ratio {image_aspect_ratio} and the model's "
            f"{'anyres' if anyres is not None else 'fixed-size'} images disagree"
        )
    records, skipped = read_pairs(data_args)
    options = dict(
        image_processor=image_processor,
        image_aspect_ratio=image_aspect_ratio,
        mm_use_im_start_end=mm_use_im_start_end,
        skip_bad_records=getattr(data_args, "skip_bad_records", False),
        summary=DataSummary(source=data_args.data_path),
        skipped=skipped,
        skip_log_dir=skip_log_dir,
        max_image_pixels=getattr(data_args, "max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS),
    )
    template = get_template(version)
    if anyres is not None:
        # imported here: it builds on this module's dataset
        from llava.data.anyres_preference import AnyResPreferenceDataset

        dataset = AnyResPreferenceDataset(
            records, tokenizer, template, model_max_length, anyres=anyres, **options
        )
    else:
        dataset = PreferenceDataset(
            records, tokenizer, template, model_max_length,
            num_image_tokens=num_image_tokens, **options,
        )  # fmt: skip
    if len(dataset) == 0:
        raise ValueError(f"no pair to train on in {data_args.data_path}: {dataset.summary.line()}")
    return dataset, PreferenceCollator(pad_token_id_of(tokenizer))
