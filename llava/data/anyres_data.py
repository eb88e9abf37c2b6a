"""AnyRes samples of the composed model (LLaVA-NeXT / OneVision tiling, several images, video).

Each medium's token count depends on how it is seen (llava.data.media.AnyRes.media_kinds: an
image tiled, an image whole, a video) and, when tiled, on its size: read from the file's header
before any decoding, so lengths, the sampler and cuts are exact (and kept in the length
cache: a start from it reads no header). A sample's media are then decoded and processed by
transformers' image processor of the mode (LlavaNextImageProcessor for anyres;
LlavaOnevisionImageProcessor for anyres_max_N, which also sees a several-image sample's images
whole) and, for videos, LlavaOnevisionVideoProcessor, all set up with the tower's tile size and
normalisation. A sample holds `pixel_values` (every medium's views in
order: base and tiles, one whole image, or a video's frames: (views, 3, H, W)), `image_sizes`
((media, 2), height and width; a video's frames') and `media_kinds` ((media,), TILED, WHOLE or
VIDEO), from which the model finds each medium's layout again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

from llava.data.dataset import RowRecords, SupervisedDataset
from llava.data.formats import BadRecordError, Record
from llava.data.images import load_image, read_size
from llava.data.media import TILED, VIDEO, AnyRes
from llava.data.tokenize import ConversationTokenizer, fit
from llava.data.video import Video, read_frames

Size = tuple[int, int]  # (width, height), as PIL gives it


def anyres_image_processor(tower_processor: Any, anyres: AnyRes) -> Any:
    """The mode's image processor over the tower's tile size and normalisation: the tiles cut
    from the image fitted (aspect kept, centred, padded) into its best pinpoint; the base image
    squashed to a tile (OneVision's, anyres_max_N) or its short side resized and centre-cropped
    (LLaVA-NeXT's)."""
    from transformers import LlavaNextImageProcessor, LlavaOnevisionImageProcessor

    height, width = anyres.tile.image_size
    common = {
        "image_grid_pinpoints": [list(pinpoint) for pinpoint in anyres.pinpoints],
        "image_mean": tower_processor.image_mean,
        "image_std": tower_processor.image_std,
        "resample": tower_processor.resample,
        "rescale_factor": tower_processor.rescale_factor,
    }
    if anyres.several_images_whole:
        return LlavaOnevisionImageProcessor(size={"height": height, "width": width}, **common)
    return LlavaNextImageProcessor(
        size={"shortest_edge": min(height, width)},
        crop_size={"height": height, "width": width},
        **common,
    )


def video_processor(tower_processor: Any, anyres: AnyRes) -> Any:
    """OneVision's video processor over the tower's tile size and normalisation: each frame
    squashed to a tile."""
    from transformers import LlavaOnevisionVideoProcessor

    height, width = anyres.tile.image_size
    return LlavaOnevisionVideoProcessor(
        size={"height": height, "width": width},
        image_mean=tower_processor.image_mean,
        image_std=tower_processor.image_std,
        resample=tower_processor.resample,
        rescale_factor=tower_processor.rescale_factor,
    )


class AnyResMedia:
    """A sample's media as placeholder ids (by kind and size, before decoding) and as the
    pictures the tower sees (after)."""

    def __init__(
        self, anyres: AnyRes, tower_processor: Any, image_ids_for: Callable[[int], list[int]]
    ):
        self.anyres = anyres
        self.image_processor = anyres_image_processor(tower_processor, anyres)
        self.video_processor = video_processor(tower_processor, anyres) if anyres.video else None
        self.image_ids_for = image_ids_for

    def kinds(self, media: Sequence[Any]) -> list[int]:
        return self.anyres.media_kinds([isinstance(medium, Video) for medium in media])

    def media_ids(self, kinds: Sequence[int], sizes: Sequence[Size | None]) -> list[list[int]]:
        return [
            self.image_ids_for(self.anyres.medium_tokens(kind, size))
            for kind, size in zip(kinds, sizes)
        ]

    def placeholder_ids(
        self, media: Sequence[Any], decoded: Sequence[Any], max_image_pixels: int
    ) -> list[list[int]]:
        """Each medium's placeholder ids: tiled images by size (the decoded ones', the others'
        from their headers, never decoding), whole images and videos by kind alone; a
        ValueError for a medium the model cannot take or an unreadable header."""
        kinds = self.kinds(media)
        sizes = []
        for k, (medium, kind) in enumerate(zip(media, kinds)):
            if kind != TILED:
                sizes.append(None)
            elif k < len(decoded):
                sizes.append(decoded[k].size)
            else:
                sizes.append(read_size(medium, max_image_pixels))
        return self.media_ids(kinds, sizes)

    def pixels(self, media: Sequence[Any], kinds: Sequence[int]) -> dict[str, torch.Tensor]:
        """{"pixel_values": (views, 3, H, W), "image_sizes": (media, 2), "media_kinds":
        (media,)} of decoded media (an image, or a video's frames), in order."""
        images = [medium for medium, kind in zip(media, kinds) if kind != VIDEO]
        image_views = iter(self.image_views(images, [kind for kind in kinds if kind != VIDEO]))
        views, sizes = [], []
        for medium, kind in zip(media, kinds):
            if kind == VIDEO:
                frames = self.video_processor(videos=[medium], return_tensors="pt")
                views.append(frames["pixel_values_videos"][0])  # (frames, 3, H, W)
                sizes.append([medium[0].height, medium[0].width])
            else:
                views.append(next(image_views))
                sizes.append([medium.height, medium.width])
        return {
            "pixel_values": torch.cat(views),
            "image_sizes": torch.tensor(sizes),
            "media_kinds": torch.tensor(list(kinds)),
        }

    def image_views(self, images: list[Image.Image], kinds: list[int]) -> list[torch.Tensor]:
        """Each image's views (base and tiles, or the one whole image), processed as one
        sample (the processor pads them to one count: the real ones are taken)."""
        if not images:
            return []
        values = self.image_processor([images], return_tensors="pt")["pixel_values"]
        views = []
        for image, kind, processed in zip(images, kinds, values):
            count = self.anyres.medium_views(kind, image.size)
            if processed.shape[0] < count:
                raise ValueError(
                    f"the image processor cut a {image.size} image into {processed.shape[0]} "
                    f"pieces, not {count}"
                )
            views.append(processed[:count])
        return views


def anyres_tokenizing(
    tokenizer: Any, template: Any, anyres: AnyRes, image_processor: Any, mm_use_im_start_end: bool
) -> tuple[ConversationTokenizer, AnyResMedia]:
    """The conversation tokenizer of an AnyRes dataset (its images' ids come per medium) and
    the media that give those ids and the pixels."""
    conversation = ConversationTokenizer(tokenizer, template, 0, mm_use_im_start_end)
    return conversation, AnyResMedia(anyres, image_processor, conversation.image_ids_for)


class AnyResDataset(SupervisedDataset):
    """Records -> {"input_ids", "labels", "pixel_values" (views, 3, H, W), "image_sizes",
    "media_kinds"}, each medium's placeholders as many as AnyRes gives its kind and size.

    Built as SupervisedDataset builds (a list, or RowRecords read by row, shared by forked
    children, replayed from the length cache); only `add_block`, which reads the image headers,
    differs, so a start from the cache reads none."""

    def __init__(
        self,
        records: Sequence[Record] | RowRecords,
        tokenizer: Any,
        template: Any,
        model_max_length: int,
        image_processor: Any,
        anyres: AnyRes,
        image_aspect_ratio: str = "anyres",
        mm_use_im_start_end: bool = False,
        **kwargs: Any,
    ):
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
            **kwargs,
        )

    def media_ids(self, record: Record, decoded: Sequence[Any] = ()) -> list[list[int]]:
        """Each medium's placeholder ids (AnyResMedia.placeholder_ids), or BadRecordError."""
        try:
            return self.media.placeholder_ids(record.images, decoded, self.max_image_pixels)
        except ValueError as error:
            raise BadRecordError(record.source, record.index, str(error), record.id) from None

    def add_block(self, records: list[Record]) -> None:
        """Read image sizes, tokenize (one batched call) and keep what has something to learn."""
        sized = []
        for record in records:
            try:
                sized.append((record, self.media_ids(record)))
            except BadRecordError as error:
                self.bad(error)
        encoded = self.conversation_tokenizer.encode_many(
            [list(record.turns) for record, _ in sized], [ids for _, ids in sized]
        )
        for (record, _), item in zip(sized, encoded):
            if isinstance(item, ValueError):
                self.bad(BadRecordError(record.source, record.index, str(item), record.id))
            else:
                self.add(record, *fit(item, self.model_max_length))

    def decode(self, medium: Any) -> Any:
        """An image, or a video's sampled frames."""
        if isinstance(medium, Video):
            return read_frames(medium, self.media.anyres.video.frames)
        return load_image(medium, self.max_image_pixels)

    def load(self, i: int) -> dict[str, torch.Tensor | None]:
        record, num_images = self.samples[i]
        try:
            media = [self.decode(medium) for medium in record.images[:num_images]]
        except ValueError as error:
            raise BadRecordError(record.source, record.index, str(error), record.id) from None
        media_ids = self.media_ids(record, media)
        encoded = self.conversation_tokenizer.encode_many([list(record.turns)], [media_ids])[0]
        sample, _ = fit(encoded, self.model_max_length)
        if sample is None or len(sample.input_ids) != self.lengths[i]:
            reason = "its images decode to other sizes than their headers say"
            raise BadRecordError(record.source, record.index, reason, record.id)
        item = {
            "input_ids": torch.tensor(sample.input_ids, dtype=torch.long),  # (T,)
            "labels": torch.tensor(sample.labels, dtype=torch.long),  # (T,)
            "pixel_values": None,
        }
        if num_images:
            kinds = self.media.kinds(record.images)
            item.update(self.media.pixels(media, kinds[:num_images]))
        return item
