"""`python -m llava.data.preview`: marked text and --json records."""

import json
import os
import subprocess
import sys

import pytest

from llava.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID
from llava.data.preview import main
from tests.test_data_formats import llava_row, write_image, write_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def data_args(tmp_path, tokenizer_paths) -> list[str]:
    write_image(str(tmp_path / "a.png"))
    rows = [llava_row(0, "a.png"), llava_row(1, None, [("human", "Hi?"), ("gpt", "Hello there.")])]
    return [
        "--data_path",
        write_rows(str(tmp_path), rows),
        "--model_name_or_path",
        tokenizer_paths["sp"],
        "--image_folder",
        str(tmp_path),
        "--num_image_tokens",
        "4",
        "--image_size",
        "32",
    ]


def test_json_records_hold_ids_and_labels(data_args, capsys, caplog):
    assert main([*data_args, "--version", "v1", "--json", "--image_aspect_ratio", "pad"]) == 0
    captured = capsys.readouterr()
    first, second = [json.loads(line) for line in captured.out.splitlines()]
    assert first["record_index"] == 0 and first["id"] == "r0" and first["modality"] == "image"
    assert first["input_ids"].count(IMAGE_PLACEHOLDER_ID) == 4
    assert first["pixel_values_shape"] == [1, 3, 32, 32]
    assert len(first["labels"]) == len(first["input_ids"]) == first["length"]
    supervised = [
        t for t, label in zip(first["input_ids"], first["labels"]) if label != IGNORE_INDEX
    ]
    assert first["num_supervised"] == len(supervised) > 0
    assert "⟦ A cat.</s>⟧" in first["text"] and "<image x4>" in first["text"]
    assert second["modality"] == "text" and second["pixel_values_shape"] is None
    assert "2 records -> 2 samples" in caplog.text  # the summary line (stderr outside pytest)


def test_text_view_marks_supervised_spans(data_args, capsys):
    assert main([*data_args, "--version", "plain", "--num", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("=== sample") == 1
    assert "<image x4>⟦A cat.\n⟧" in out


def test_runs_as_a_module(data_args):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "llava.data.preview",
            *data_args,
            "--version",
            "v1",
            "--json",
            "--num",
            "1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(result.stdout)["record_index"] == 0
    assert "2 records -> 2 samples" in result.stderr


@pytest.mark.parametrize("family", ["qwen2_vl", "idefics3"])
def test_a_transformers_vlm_is_previewed_through_its_own_processor(
    family, tiny_vlm_paths, training_assets, capsys
):
    """Its chat template (auto by default) and its processor's image ids, no weights loaded:
    the ids are the training dataset's, each answer and its end token marked supervised."""
    from transformers import AutoProcessor

    from llava.data.processor_media import load_processor_dataset

    folder = tiny_vlm_paths[family]
    argv = ["--data_path", training_assets["finetune"], "--model_name_or_path", folder]
    assert (
        main([*argv, "--image_folder", training_assets["image_folder"], "--json", "--num", "1"])
        == 0
    )
    sample = json.loads(capsys.readouterr().out.splitlines()[0])
    processor = AutoProcessor.from_pretrained(folder)
    dataset = load_processor_dataset(
        training_assets["finetune"], processor, image_folder=training_assets["image_folder"]
    )
    assert sample["input_ids"] == dataset[0]["input_ids"].tolist()
    assert sample["num_images"] == 1
    end = {"qwen2_vl": "<|im_end|>", "idefics3": "<end_of_utterance>"}[family]
    assert f"⟦red{end}⟧" in sample["text"].replace(" ", "")
    assert "<image x" in sample["text"]


def test_anyres_previews_each_images_tokens_by_its_size(data_args, tiny_clip_path, capsys):
    """--image_aspect_ratio anyres with a tower and pinpoints: the image's placeholders are
    AnyRes's count for its size, its pixels the base image and its tiles."""
    from PIL import Image

    from llava.data.media import AnyRes, parse_pinpoints
    from llava.model.vision_tower import describe_tower

    flags = [f for f in data_args if f not in ("--num_image_tokens", "4", "--image_size", "32")]
    flags += ["--vision_tower", tiny_clip_path, "--image_aspect_ratio", "anyres"]
    flags += ["--image_grid_pinpoints", "(1x1),...,(2x2)", "--json", "--version", "v1"]
    assert main(flags) == 0
    first = json.loads(capsys.readouterr().out.splitlines()[0])
    image = Image.open(os.path.join(flags[flags.index("--image_folder") + 1], "a.png"))
    _, geometry = describe_tower(tiny_clip_path)
    anyres = AnyRes(parse_pinpoints("(1x1),...,(2x2)", 32), geometry)
    layout = anyres.layout(image.size)
    assert first["input_ids"].count(IMAGE_PLACEHOLDER_ID) == layout.num_image_tokens
    assert first["pixel_values_shape"] == [1 + layout.tiles[0] * layout.tiles[1], 3, 32, 32]
    with pytest.raises(ValueError, match="needs --vision_tower .* and --image_grid_pinpoints"):
        main([*data_args, "--image_aspect_ratio", "anyres"])
