"""Image loading (always RGB) and LLaVA's aspect-ratio handling: `pad` and `square`.

`pad` pastes the image centred on a square canvas of the processor's mean colour (for CLIP
(122, 116, 104)) and then runs the processor, so nothing is cropped away; `square` runs the
processor alone (for CLIP: resize the short side, centre crop).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

ASPECT_RATIOS = ("pad", "square")


def open_source(source: Any) -> Image.Image:
    """A PIL image from a path, encoded bytes, a {"bytes", "path"} dict or a PIL image."""
    if hasattr(source, "fetch"):  # a reference into a dataset column
        source = source.fetch()
    if isinstance(source, dict):
        source = source.get("bytes") or source.get("path")
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (bytes, bytearray)):
        return Image.open(io.BytesIO(source))
    if isinstance(source, str):
        return Image.open(source)
    raise ValueError(f"cannot read an image from {type(source).__name__}")


def load_image(source: Any) -> Image.Image:
    """Decode an image fully and convert it to RGB; unreadable files raise ValueError."""
    try:
        image = open_source(source)
        image.load()
        return image.convert("RGB")
    except (OSError, SyntaxError) as error:  # PIL's UnidentifiedImageError is an OSError
        raise ValueError(f"unreadable image {describe(source)}: {error}") from None


def describe(source: Any) -> str:
    if isinstance(source, str):
        return repr(source)
    if hasattr(source, "column"):
        return f"in column {source.column!r}"
    return f"({type(source).__name__})"


def mean_colour(image_processor: Any) -> tuple[int, int, int]:
    """The processor's mean as 0-255 RGB, truncated as LLaVA does: CLIP gives (122, 116, 104)."""
    mean = getattr(image_processor, "image_mean", None)
    if mean is None:
        raise ValueError("image_aspect_ratio 'pad' needs an image processor with image_mean")
    return tuple(int(value * 255) for value in mean)


def expand_to_square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Paste `image` centred on a square canvas of colour `background` (LLaVA's expand2square)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def process_images(
    images: Sequence[Image.Image], image_processor: Any, image_aspect_ratio: str = "square"
) -> torch.Tensor:
    """RGB images -> pixel_values (N, 3, H, W) in the processor's size and normalisation."""
    if image_aspect_ratio not in ASPECT_RATIOS:
        raise ValueError(
            f"image_aspect_ratio {image_aspect_ratio!r} is not supported; use one of {ASPECT_RATIOS}"
        )
    if image_aspect_ratio == "pad":
        background = mean_colour(image_processor)
        images = [expand_to_square(image, background) for image in images]
    return image_processor(list(images), return_tensors="pt")["pixel_values"]
