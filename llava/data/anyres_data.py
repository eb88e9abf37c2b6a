"""AnyRes samples of the composed model (LLaVA-NeXT / OneVision tiling).

Each image's token count depends on its size (llava.data.media.AnyRes): it is read from the
file's header before any decoding, so lengths, the sampler and cuts are exact; a sample's
images are then decoded and cut into the base image and its tiles by transformers'
LlavaNextImageProcessor, set up with the tower's tile size and normalisation. A sample holds
`pixel_values` (base and tiles of every image, in order: (tiles, 3, H, W)) and `image_sizes`
((images, 2), height and width), from which the model finds each image's layout again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

from llava.data.dataset import SupervisedDataset
from llava.data.formats import BadRecordError, Record
from llava.data.images import load_image
from llava.data.media import AnyRes
from llava.data.tokenize import ConversationTokenizer, fit

Size = tuple[int, int]  # (width, height), as PIL gives it


def anyres_image_processor(tower_processor: Any, anyres: AnyRes) -> Any:
    """LLaVA-NeXT's image processor over the tower's tile size and normalisation: the base image
    squashed to a tile, the tiles cut from the image fitted (aspect kept, centred, padded) into
    its best pinpoint."""
    from transformers import LlavaNextImageProcessor

    height, width = anyres.tile.image_size
    return LlavaNextImageProcessor(
        size={"shortest_edge": min(height, width)},
        crop_size={"height": height, "width": width},
        image_grid_pinpoints=[list(pinpoint) for pinpoint in anyres.pinpoints],
        image_mean=tower_processor.image_mean,
        image_std=tower_processor.image_std,
        resample=tower_processor.resample,
        rescale_factor=tower_processor.rescale_factor,
    )


class AnyResMedia:
    """Images as placeholder ids (by size, before decoding) and as tiles (after)."""

    def __init__(
        self, anyres: AnyRes, tower_processor: Any, image_ids_for: Callable[[int], list[int]]
    ):
        self.anyres = anyres
        self.image_processor = anyres_image_processor(tower_processor, anyres)
        self.image_ids_for = image_ids_for

    def image_ids(self, size: Size) -> list[int]:
        return self.image_ids_for(self.anyres.num_image_tokens(size))

    def pixels(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """{"pixel_values": (tiles, 3, H, W), "image_sizes": (images, 2)}: each image's base
        image then its tiles, in order; sizes as (height, width)."""
        tiles = []
        for image in images:
            rows, columns = self.anyres.layout(image.size).tiles
            values = self.image_processor([image], return_tensors="pt")["pixel_values"][0]
            if values.shape[0] < 1 + rows * columns:
                raise ValueError(
                    f"the image processor cut a {image.size} image into {values.shape[0]} "
                    f"pieces, not 1 + {rows} x {columns}"
                )
            tiles.append(values[: 1 + rows * columns])
        sizes = [[image.height, image.width] for image in images]
        return {"pixel_values": torch.cat(tiles), "image_sizes": torch.tensor(sizes)}


class AnyResDataset(SupervisedDataset):
    """Records -> {"input_ids", "labels", "pixel_values" (tiles, 3, H, W), "image_sizes"}, each
    image's placeholders as many as AnyRes gives its size."""

    def __init__(
        self,
        records: list[Record],
        tokenizer: Any,
        template: Any,
        model_max_length: int,
        image_processor: Any,
        anyres: AnyRes,
        image_aspect_ratio: str = "anyres",
        mm_use_im_start_end: bool = False,
        **kwargs: Any,
    ):
        conversation = ConversationTokenizer(tokenizer, template, 0, mm_use_im_start_end)
        self.media = AnyResMedia(anyres, image_processor, conversation.image_ids_for)
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

    def add_block(self, records: list[Record]) -> None:
        """Read image sizes, tokenize (one batched call) and keep what has something to learn."""
        sized = []
        for record in records:
            try:
                sized.append((record, [self.media.image_ids(s) for s in self.sizes(record)]))
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

    def load(self, i: int) -> dict[str, torch.Tensor | None]:
        record, num_images = self.samples[i]
        try:
            images = [load_image(s, self.max_image_pixels) for s in record.images[:num_images]]
        except ValueError as error:
            raise BadRecordError(record.source, record.index, str(error), record.id) from None
        image_ids = [self.media.image_ids(size) for size in self.sizes(record, images)]
        encoded = self.conversation_tokenizer.encode_many([list(record.turns)], [image_ids])[0]
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
            item.update(self.media.pixels(images))
        return item
