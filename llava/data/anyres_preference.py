"""Preference pairs for DPO on a composed model trained with AnyRes (LLaVA-NeXT's tiles,
OneVision's anyres_max_N): stage 2's AnyRes media (llava/data/anyres_data.py) in
llava/data/preference.py's pairs.

Each image's placeholders follow its kind and size as in stage 2: a tiled image's from the size
its file's header gives (nothing is decoded at start-up), so a pair's length is exact before
loading; under anyres_max_N the images of a several-image prompt are each seen whole. When a
pair is loaded its images are decoded once for both answers; its views (base image and tiles,
or the whole image), `image_sizes` and `media_kinds` are the AnyResDataset's for the same
images, and go into the batch once per pair. An image whose decoded size tiles otherwise than
its header said makes the pair bad. Preference records carry no videos.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llava.data.anyres_data import anyres_tokenizing
from llava.data.formats import BadRecordError
from llava.data.media import AnyRes
from llava.data.preference import EncodedPair, PreferenceDataset, PreferenceRecord, pair_tensors


class AnyResPreferenceDataset(PreferenceDataset):
    """Pairs -> {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"
    (T,) each, and for a pair with images "pixel_values" (views, 3, H, W), "image_sizes"
    (images, 2), "media_kinds" (images,)}."""

    def __init__(
        self,
        records: Sequence[PreferenceRecord],
        tokenizer: Any,
        template: Any,
        model_max_length: int,
        image_processor: Any,
        anyres: AnyRes,
        image_aspect_ratio: str = "anyres",
        mm_use_im_start_end: bool = False,
        **dataset_options: Any,
    ):
        """`image_processor`: the tower's (its tile size and normalisation); `anyres`: the
        model's; `dataset_options`: PreferenceDataset's (skip_bad_records, summary, ...)."""
        conversation, self.media = anyres_tokenizing(
            tokenizer, template, anyres, image_processor, mm_use_im_start_end
        )
        super().__init__(
            records,
            tokenizer,
            conversation.template,
            model_max_length,
            image_processor=image_processor,
            image_aspect_ratio=image_aspect_ratio,
            conversation_tokenizer=conversation,
            **dataset_options,
        )

    def encode(self, record: PreferenceRecord, decoded: Sequence[Any] = ()) -> EncodedPair:
        """Both sequences, each image's placeholders by its kind and size (the `decoded`
        images', else from the headers), or BadRecordError naming the record."""
        try:
            media_ids = self.media.placeholder_ids(record.images, decoded, self.max_image_pixels)
        except ValueError as error:
            raise BadRecordError(record.source, record.index, str(error), record.id) from None
        return self.encode_pair(record, media_ids)

    def load(self, i: int) -> dict[str, Any]:
        record = self.records[i]
        images = self.decode_images(record)
        pair = self.encode(record, images)
        if pair.length != self.lengths[i]:
            reason = "its images decode to other sizes than their headers say"
            raise BadRecordError(record.source, record.index, reason, record.id)
        item: dict[str, Any] = {**pair_tensors(pair), "pixel_values": None}
        if images:
            try:
                item.update(self.media.pixels(images, self.media.kinds(images)))
            except ValueError as error:
                raise BadRecordError(record.source, record.index, str(error), record.id) from None
        return item
