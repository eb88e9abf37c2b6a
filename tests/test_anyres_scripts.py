"""`bash scripts/finetune_lora.sh` with AnyRes (--image_aspect_ratio anyres, LLaVA-NeXT's
pinpoints and spatial_unpad) under DeepSpeed ZeRO-3 with 2 CPU processes, on the shapes data (three
image sizes, so samples differ in image tokens, and text-only rows): the loss falls, the result
reloads as an anyres model, and a run resumed from its mid-run checkpoint logs the same losses."""

from __future__ import annotations

import os
import shutil

import pytest

from llava.model.builder import load_pretrained_model
from tests.fixtures.script_runs import common_flags
from tests.fixtures.training import logged_losses, run_script

pytestmark = pytest.mark.slow

ANYRES_FLAGS = [
    "--image_aspect_ratio", "anyres",
    "--image_grid_pinpoints", "(1x1),...,(2x2)",
    "--mm_patch_merge_type", "spatial_unpad",
]  # fmt: skip


def run_anyres_script(assets, output: str) -> None:
    env = {
        "MODEL_NAME_OR_PATH": assets["llm"],
        "VISION_TOWER": assets["clip"],
        "PRETRAIN_MM_MLP_ADAPTER": "",  # a fresh projector (and newline)
        "DATA_PATH": assets["finetune"],
        "IMAGE_FOLDER": assets["image_folder"],
        "OUTPUT_DIR": output,
        "NUM_GPUS": "2",
        "PER_DEVICE_BATCH": "2",
        "GRAD_ACCUM": "1",
        "LAUNCHER": "torchrun",
        "DEEPSPEED_CONFIG": "scripts/zero3.json",
    }
    flags = [*common_flags("lora"), *ANYRES_FLAGS, "--model_max_length", "512"]
    run_script("finetune_lora.sh", env, *flags, log=output + ".log")


def test_finetune_lora_script_with_anyres_under_zero3(training_assets, tmp_path):
    output = str(tmp_path / "run")
    run_anyres_script(training_assets, output)
    losses = logged_losses(output)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert losses[6] < losses[1]
    assert {"checkpoint-3", "checkpoint-6", "non_lora_trainables.bin"} <= set(os.listdir(output))

    loaded = load_pretrained_model(output, model_base=training_assets["llm"])
    assert loaded.model.anyres is not None and loaded.model.anyres.merge == "spatial_unpad"
    assert loaded.model.config.image_grid_pinpoints == [[32, 32], [32, 64], [64, 32], [64, 64]]

    resumed = str(tmp_path / "resumed")  # a fresh folder holding only checkpoint-3
    os.makedirs(resumed)
    shutil.copytree(os.path.join(output, "checkpoint-3"), os.path.join(resumed, "checkpoint-3"))
    run_anyres_script(training_assets, resumed)
    again = logged_losses(resumed)
    for step in (4, 5, 6):
        assert again[step] == pytest.approx(losses[step], rel=1e-5)
