"""scripts/pretrain.sh with --vision_feature_cache under DeepSpeed ZeRO-3 (2 CPU processes, the
frozen tower's weights partitioned and never gathered: no rank runs it):
the loss falls, and a resume from checkpoint-3 logs the same losses. (That the cache gives the
uncached run's losses is checked in-process, in float32, by test_feature_cache.py.)"""

from __future__ import annotations

import os
import shutil

import pytest

from llava.data.cache_features import main as cache_features
from tests.fixtures.script_runs import common_flags, script_env
from tests.fixtures.training import logged_losses, run_script

pytestmark = pytest.mark.slow


def run_pretrain(assets: dict[str, str], output_dir: str, *extra: str) -> dict[int, float]:
    env = {**script_env(assets, "pretrain", output_dir), "DEEPSPEED_CONFIG": "scripts/zero3.json"}
    run_script("pretrain.sh", env, *common_flags("pretrain"), *extra, log=output_dir + ".log")
    return logged_losses(output_dir)


def test_pretrain_script_with_the_cache_trains_and_resumes(training_assets, tmp_path):
    cache = str(tmp_path / "cache")
    cache_features(
        [
            "--vision_tower", training_assets["clip"],
            "--data_path", training_assets["pretrain"],
            "--image_folder", training_assets["image_folder"],
            "--output_dir", cache,
            "--num_workers", "0",
        ]
    )  # fmt: skip
    first = str(tmp_path / "cached")
    cached = run_pretrain(training_assets, first, "--vision_feature_cache", cache)
    assert sorted(cached) == [1, 2, 3, 4, 5, 6]
    assert cached[6] < cached[1] - 0.05, cached

    resumed_dir = str(tmp_path / "resumed")
    os.makedirs(resumed_dir)
    shutil.copytree(os.path.join(first, "checkpoint-3"), os.path.join(resumed_dir, "checkpoint-3"))
    resumed = run_pretrain(training_assets, resumed_dir, "--vision_feature_cache", cache)
    with open(resumed_dir + ".log") as f:
        log = f.read()
    assert "Run: resuming from " + os.path.join(resumed_dir, "checkpoint-3") + " at step 3" in log
    assert log.count("'loss':") == 3  # steps 1-3 were not redone
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(cached[step], rel=1e-5, abs=1e-6), (step, resumed)
