"""`bash scripts/finetune_lora.sh` with AnyRes (--image_aspect_ratio anyres, LLaVA-NeXT's
pinpoints and spatial_unpad) under DeepSpeed ZeRO-3 with 2 CPU processes, on the shapes data (three
image sizes, so samples differ in image tokens, and text-only rows), and with OneVision's media
(anyres_max_N, --video_frames) on one-image, two-image, video, image-beside-video and text-only
records: the loss falls, the result reloads with its settings, and a run resumed from its
mid-run checkpoint logs the same losses."""

from __future__ import annotations

import os
import shutil

import pytest

from llava.model.builder import load_pretrained_model
from tests.fixtures.datasets import write_onevision_dataset
from tests.fixtures.script_runs import common_flags
from tests.fixtures.training import logged_losses, run_script

pytestmark = pytest.mark.slow

ANYRES_FLAGS = [
    "--image_aspect_ratio", "anyres",
    "--image_grid_pinpoints", "(1x1),...,(2x2)",
    "--mm_patch_merge_type", "spatial_unpad",
]  # fmt: skip
ONEVISION_FLAGS = [
    "--image_aspect_ratio", "anyres_max_1",
    "--image_grid_pinpoints", "(1x1),...,(2x2)",
    "--mm_patch_merge_type", "spatial_unpad",
    "--video_frames", "3",
]  # fmt: skip


def run_anyres_script(
    assets, output: str, data_path: str | None = None, flags: list[str] = ANYRES_FLAGS
) -> None:
    env = {
        "MODEL_NAME_OR_PATH": assets["llm"],
        "VISION_TOWER": assets["clip"],
        "PRETRAIN_MM_MLP_ADAPTER": "",  # a fresh projector (and newline)
        "DATA_PATH": data_path or assets["finetune"],
        "IMAGE_FOLDER": assets["image_folder"],
        "OUTPUT_DIR": output,
        "NUM_GPUS": "2",
        "PER_DEVICE_BATCH": "2",
        "GRAD_ACCUM": "1",
        "LAUNCHER": "torchrun",
        "DEEPSPEED_CONFIG": "scripts/zero3.json",
    }
    flags = [*common_flags("lora"), *flags, "--model_max_length", "512"]
    run_script("finetune_lora.sh", env, *flags, log=output + ".log")


def check_losses_and_resume(assets, tmp_path, data_path: str | None, flags: list[str]):
    """A 6-step run whose loss falls, and a run from its checkpoint-3 alone that logs the same
    losses for steps 4-6; returns the first run's model, reloaded over its base."""
    output = str(tmp_path / "run")
    run_anyres_script(assets, output, data_path, flags)
    losses = logged_losses(output)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert losses[6] < losses[1]
    assert {"checkpoint-3", "checkpoint-6", "non_lora_trainables.bin"} <= set(os.listdir(output))
    resumed = str(tmp_path / "resumed")  # a fresh folder holding only checkpoint-3
    os.makedirs(resumed)
    shutil.copytree(os.path.join(output, "checkpoint-3"), os.path.join(resumed, "checkpoint-3"))
    run_anyres_script(assets, resumed, data_path, flags)
    again = logged_losses(resumed)
    for step in (4, 5, 6):
        assert again[step] == pytest.approx(losses[step], rel=1e-5)
    return load_pretrained_model(output, model_base=assets["llm"]).model


def test_finetune_lora_script_with_anyres_under_zero3(training_assets, tmp_path):
    model = check_losses_and_resume(training_assets, tmp_path, None, ANYRES_FLAGS)
    assert model.anyres is not None and model.anyres.merge == "spatial_unpad"
    assert model.config.image_grid_pinpoints == [[32, 32], [32, 64], [64, 32], [64, 64]]


def test_finetune_lora_script_with_onevision_media_under_zero3(training_assets, tmp_path):
    data_path = write_onevision_dataset(str(tmp_path / "data"), training_assets)
    model = check_losses_and_resume(training_assets, tmp_path, data_path, ONEVISION_FLAGS)
    anyres = model.anyres
    assert anyres.several_images_whole and anyres.video.frames == 3 and anyres.max_tiles == 1
