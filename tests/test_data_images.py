"""Images: RGB loading, `pad` to a square of the processor's mean colour, `square`."""

import io

import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor

from llava.data.images import expand_to_square, load_image, mean_colour, process_images

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture
def processor() -> CLIPImageProcessor:
    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def normalised(rgb) -> torch.Tensor:
    return torch.tensor([(c / 255 - m) / s for c, m, s in zip(rgb, CLIP_MEAN, CLIP_STD)])


def test_mean_colour_of_clip_is_llavas(processor):
    assert mean_colour(processor) == (122, 116, 104)


def test_expand_to_square_pastes_centred_on_the_mean_colour():
    image = Image.new("RGB", (30, 10), (255, 0, 0))
    square = expand_to_square(image, (122, 116, 104))
    assert square.size == (30, 30)
    assert square.getpixel((0, 0)) == square.getpixel((29, 29)) == (122, 116, 104)
    assert square.getpixel((15, 15)) == (255, 0, 0)  # rows 10..19 hold the image
    assert square.getpixel((15, 9)) == (122, 116, 104) and square.getpixel((15, 20)) == (
        122,
        116,
        104,
    )


def test_pad_fills_the_border_with_the_mean_colour_after_processing(processor):
    wide = Image.new("RGB", (64, 16), (255, 0, 0))  # 4:1, so a quarter is image after padding
    pixels = process_images([wide], processor, "pad")  # (1, 3, 32, 32)
    assert pixels.shape == (1, 3, 32, 32)
    border, centre = pixels[0, :, 1, 16], pixels[0, :, 16, 16]
    assert torch.allclose(border, normalised((122, 116, 104)), atol=0.02)
    assert torch.allclose(centre, normalised((255, 0, 0)), atol=0.02)
    assert torch.allclose(pixels[0, :, 30, 5], normalised((122, 116, 104)), atol=0.02)


def test_square_crops_instead_of_padding(processor):
    wide = Image.new("RGB", (64, 16), (255, 0, 0))
    pixels = process_images([wide], processor, "square")
    assert pixels.shape == (1, 3, 32, 32)
    assert torch.allclose(pixels[0, :, 1, 16], normalised((255, 0, 0)), atol=0.02)


def test_several_images_stack_in_order(processor):
    images = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 20), (0, 0, 255))]
    pixels = process_images(images, processor, "pad")
    assert pixels.shape == (2, 3, 32, 32)
    assert torch.allclose(pixels[1, :, 16, 16], normalised((0, 0, 255)), atol=0.02)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_load_image_converts_to_rgb(tmp_path, mode):
    path = tmp_path / ("x.png" if mode != "CMYK" else "x.jpg")
    Image.new(mode, (5, 4)).save(path)
    assert load_image(str(path)).mode == "RGB"


def test_load_image_from_bytes_and_dataset_cells():
    buffer = io.BytesIO()
    Image.new("RGB", (3, 2), (1, 2, 3)).save(buffer, format="PNG")
    assert load_image(buffer.getvalue()).getpixel((0, 0)) == (1, 2, 3)
    assert load_image({"bytes": buffer.getvalue(), "path": None}).size == (3, 2)


def test_unreadable_image_and_unknown_aspect_ratio(tmp_path, processor):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="unreadable image .*broken.jpg"):
        load_image(str(broken))
    with pytest.raises(
        ValueError,
        match="--image_aspect_ratio must be one of pad, square, anyres or anyres_max_N, not 'fill'",
    ):
        process_images([Image.new("RGB", (4, 4))], processor, "fill")
    with pytest.raises(ValueError, match="anyres images are cut into tiles"):
        process_images([Image.new("RGB", (4, 4))], processor, "anyres_max_9")
