"""Image loading (always RGB) and LLaVA's aspect-ratio handling: `pad` and `square`.

`pad` pastes the image centred on a square canvas of the processor's mean colour (for CLIP
(122, 116, 104)) and then runs the processor, so nothing is cropped away; `square` runs the
processor alone (for CLIP: resize the short side, centre crop).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from PIL import Image

from llava.data.media import is_anyres
from llava.data.video import Video

ASPECT_RATIOS = ("pad", "square")
# Pillow's own default limit (its DecompressionBombWarning threshold), the --max_image_pixels default.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485


def check_aspect_ratio(image_aspect_ratio: str) -> None:
    """pad, square, or anyres / anyres_max_N (LLaVA-NeXT's tiles, llava.data.media.AnyRes)."""
    if image_aspect_ratio not in ASPECT_RATIOS and not is_anyres(image_aspect_ratio):
        raise ValueError(
            f"--image_aspect_ratio must be one of {', '.join(ASPECT_RATIOS)}, anyres or "
            f"anyres_max_N, not {image_aspect_ratio!r}"
        )


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
    if isinstance(source, Video):
        raise ValueError(
            f"{source.path!r} is a video: videos train on a composed model with "
            "--image_aspect_ratio anyres or anyres_max_N"
        )
    raise ValueError(f"cannot read an image from {type(source).__name__}")


@contextlib.contextmanager
def pillow_limit_for(max_pixels: int) -> Iterator[None]:
    """Pillow's own pixel limit out of the way of ours (`max_pixels`, 0: none).

    Pillow has no per-call limit: Image.open and several plugins read the module global
    Image.MAX_IMAGE_PIXELS (warning above it, raising above twice it). Our limit stays an
    explicit argument checked against the header size in `load_image`; Pillow's warning is
    silenced here because ours decides, and its global is lifted only for the duration of the
    call and only when ours is higher. Images are decoded by one thread per process (loader
    workers are processes), so nothing else sees the change.
    """
    pillow = Image.MAX_IMAGE_PIXELS
    lift = pillow is not None and (max_pixels == 0 or max_pixels > pillow)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        if lift:
            Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            if lift:
                Image.MAX_IMAGE_PIXELS = pillow


def load_image(source: Any, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode an image fully and convert it to RGB.

    Unreadable images, and images of more than `max_pixels` pixels (0: no limit; checked from
    the header, before decoding), raise ValueError naming the image.
    """
    try:
        with pillow_limit_for(max_pixels):
            image = open_source(source)
            width, height = image.size
            if max_pixels and width * height > max_pixels:
                if image is not source:  # opened here: let go of its file
                    image.close()
                raise ValueError(
                    f"image {describe(source)} has {width}x{height} = {width * height} pixels, "
                    f"over the limit of {max_pixels} (raise it with --max_image_pixels)"
                )
            image.load()
        return image.convert("RGB")
    except Image.DecompressionBombError as error:  # over twice Pillow's limit, and ours is lower
        raise ValueError(
            f"image {describe(source)} has more than {max_pixels} pixels (raise it with "
            f"--max_image_pixels): {error}"
        ) from None
    except (OSError, SyntaxError) as error:  # PIL's UnidentifiedImageError is an OSError
        raise ValueError(f"unreadable image {describe(source)}: {error}") from None


def read_size(source: Any, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(width, height) from the image's header, without decoding its pixels.

    Where an image's token count depends on its size (a processor's tiles or grid) the dataset
    learns lengths from this. Unreadable images and those over `max_pixels` raise ValueError
    naming the image, as `load_image` would.
    """
    try:
        with pillow_limit_for(max_pixels):
            image = open_source(source)
            size = image.size
            if image is not source:  # opened here: let go of its file
                image.close()
    except (OSError, SyntaxError, Image.DecompressionBombError) as error:
        raise ValueError(f"unreadable image {describe(source)}: {error}") from None
    width, height = size
    if max_pixels and width * height > max_pixels:
        raise ValueError(
            f"image {describe(source)} has {width}x{height} = {width * height} pixels, "
            f"over the limit of {max_pixels} (raise it with --max_image_pixels)"
        )
    return size


def describe(source: Any) -> str:
    if isinstance(source, str):
        return repr(source)
    if hasattr(source, "column"):
        return f"in column {source.column!r}"
    if hasattr(source, "name") and hasattr(source, "path"):  # a tar shard's member
        return f"{source.name!r} in {source.path}"
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
    check_aspect_ratio(image_aspect_ratio)
    if is_anyres(image_aspect_ratio):
        raise ValueError(
            f"--image_aspect_ratio {image_aspect_ratio}: anyres images are cut into tiles by "
            "llava.data.anyres_data.AnyResMedia, not made one square each"
        )
    if image_aspect_ratio == "pad":
        background = mean_colour(image_processor)
        images = [expand_to_square(image, background) for image in images]
    return image_processor(list(images), return_tensors="pt")["pixel_values"]
