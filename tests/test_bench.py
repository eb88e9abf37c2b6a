"""The benchmark compares like with like (weights, tokens, loss) and its command runs."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from transformers import AutoTokenizer, CLIPImageProcessor, LlavaForConditionalGeneration

from llava.bench.assets import SELECT_LAYER, Assets, write_anyres_models, write_models
from llava.bench.baseline import HFLlavaCollator
from llava.bench.configs import CONFIGS
from llava.bench.synthetic import make_records, write_data, write_images
from llava.bench.trl_baseline import trl_installed
from llava.constants import IMAGE_PLACEHOLDER_ID
from llava.data.dataset import load_supervised_dataset
from llava.model.builder import build_llava_model, load_tokenizer
from llava.train.checkpoint import load_projector
from tests.fixtures.training import REPO

TINY = CONFIGS["tiny"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Assets:
    assets = Assets(str(tmp_path_factory.mktemp("bench")))
    write_models(assets, TINY, seed=0)
    write_images(assets.images, TINY)
    return assets


def both_batches(assets: Assets, stage: str, count: int = 4):
    """The same records through this project's data path and through the baseline's."""
    path = write_data(assets.folder, stage, count, TINY, seed=3)
    version = "plain" if stage == "pretrain" else "v1"
    tokenizer = load_tokenizer(assets.llm)
    dataset = load_supervised_dataset(
        path, tokenizer, version, TINY.model_max_length,
        image_processor=CLIPImageProcessor.from_pretrained(assets.clip),
        num_image_tokens=TINY.num_image_tokens, image_folder=assets.images,
    )  # fmt: skip
    collator = HFLlavaCollator(
        AutoTokenizer.from_pretrained(assets.hf_llava),
        CLIPImageProcessor.from_pretrained(assets.hf_llava),
        TINY.num_image_tokens, assets.images, version, TINY.model_max_length,
    )  # fmt: skip
    records = [dataset.samples[i][0] for i in range(len(dataset))]
    assert len(records) == count  # nothing dropped
    return [dataset[i] for i in range(count)], collator(make_records(stage, count, TINY, 3))


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_both_data_paths_give_the_same_tokens_and_labels(assets, stage):
    ours, theirs = both_batches(assets, stage, count=16)
    image_token_id = AutoTokenizer.from_pretrained(assets.hf_llava).convert_tokens_to_ids("<image>")
    for row, sample in enumerate(ours):
        n = len(sample["input_ids"])
        ids = sample["input_ids"].masked_fill(
            sample["input_ids"] == IMAGE_PLACEHOLDER_ID, image_token_id
        )
        assert torch.equal(theirs["input_ids"][row, :n], ids)
        assert torch.equal(theirs["labels"][row, :n], sample["labels"])
        assert theirs["attention_mask"][row].sum() == n


def test_both_systems_start_from_the_same_weights(assets):
    """Same records, same weights: the same loss from our model and from transformers' Llava."""
    from llava.data.collator import SupervisedCollator

    ours_samples, theirs = both_batches(assets, "finetune")
    torch.manual_seed(0)
    ours = build_llava_model(
        assets.llm, assets.clip, mm_projector_type="mlp2x_gelu", mm_vision_select_layer=SELECT_LAYER
    ).eval()
    load_projector(ours, assets.projector)
    hf = LlavaForConditionalGeneration.from_pretrained(assets.hf_llava).eval()
    with torch.no_grad():
        our_loss = ours(**SupervisedCollator(pad_token_id=0)(ours_samples)).loss
        their_loss = hf(**theirs).loss
    assert our_loss.item() == pytest.approx(their_loss.item(), rel=1e-5)


@pytest.fixture(scope="module")
def anyres_batches(assets):
    """The same anyres records through our AnyResDataset and the baseline's LlavaNextProcessor."""
    from transformers import LlavaNextProcessor

    from llava.bench.anyres_bench import LlavaNextCollator

    write_anyres_models(assets, TINY, seed=0)
    config = replace(TINY, model_max_length=TINY.anyres_max_length)
    count, image_tokens = 16, TINY.anyres_max_image_tokens
    path = write_data(assets.folder, "anyres", count, config, seed=3, image_tokens=image_tokens)
    dataset = load_supervised_dataset(
        path, load_tokenizer(assets.llm), "v1", config.model_max_length,
        image_processor=CLIPImageProcessor.from_pretrained(assets.clip),
        image_folder=assets.images, image_aspect_ratio="anyres", anyres=TINY.anyres,
    )  # fmt: skip
    assert len(dataset) == count  # nothing dropped
    processor = LlavaNextProcessor.from_pretrained(assets.hf_llava_next)
    collator = LlavaNextCollator(processor, assets.images, config.model_max_length)
    records = make_records("anyres", count, config, 3, image_tokens)
    return [dataset[i] for i in range(count)], collator(records), processor


def test_anyres_data_paths_give_the_same_tokens_labels_and_tiles(anyres_batches):
    ours, theirs, processor = anyres_batches
    image_token_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    lengths, image = set(), 0
    for row, sample in enumerate(ours):
        n = len(sample["input_ids"])
        ids = sample["input_ids"].masked_fill(
            sample["input_ids"] == IMAGE_PLACEHOLDER_ID, image_token_id
        )
        assert torch.equal(theirs["input_ids"][row, :n], ids)
        assert torch.equal(theirs["labels"][row, :n], sample["labels"])
        assert theirs["attention_mask"][row].sum() == n
        if sample["pixel_values"] is not None:
            views = sample["pixel_values"].shape[0]
            assert torch.equal(theirs["pixel_values"][image, :views], sample["pixel_values"])
            assert torch.equal(theirs["image_sizes"][image], sample["image_sizes"][0])
            image += 1
            lengths.add(n)
    assert image == theirs["pixel_values"].shape[0] and len(lengths) > 1


def test_both_anyres_systems_start_from_the_same_weights(assets, anyres_batches):
    from transformers import LlavaNextForConditionalGeneration

    from llava.data.collator import SupervisedCollator

    ours_samples, theirs, _ = anyres_batches
    ours = build_llava_model(
        assets.llm, assets.clip, mm_projector_type="mlp2x_gelu", mm_vision_select_layer=SELECT_LAYER,
        image_aspect_ratio="anyres", image_grid_pinpoints=TINY.anyres_pinpoints,
        mm_patch_merge_type="spatial_unpad",
    ).eval()  # fmt: skip
    load_projector(ours, assets.anyres_projector)
    hf = LlavaNextForConditionalGeneration.from_pretrained(assets.hf_llava_next).eval()
    with torch.no_grad():
        our_loss = ours(**SupervisedCollator(pad_token_id=0)(ours_samples)).loss
        their_loss = hf(**theirs).loss
    assert our_loss.item() == pytest.approx(their_loss.item(), rel=1e-5)


def bench(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "llava.bench", *args],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_bench_command_prints_both_systems():
    out = bench("--config", "tiny", "--stage", "pretrain", "--steps", "2", "--warmup", "0")
    assert "| pretrain | ours |" in out and "| pretrain | baseline |" in out
    assert "| pretrain | " in out.split("speedup")[1]


def test_bench_anyres_stage_runs_both_systems():
    out = bench("--config", "tiny", "--stage", "anyres", "--steps", "2", "--warmup", "0")
    assert "| anyres | ours |" in out and "| anyres | baseline |" in out


@pytest.mark.skipif(not trl_installed(), reason='TRL is not installed (".[bench]")')
@pytest.mark.parametrize("model", ["lm", "vlm"])
def test_dpo_bench_runs_both_systems_on_the_same_tokens_and_loss(model):
    """Ours and TRL's DPOTrainer score the same tokens and start from the same loss."""
    result = subprocess.run(
        [sys.executable, "-m", "llava.bench.dpo_bench", "--config", "tiny", "--model", model,
         "--steps", "1", "--warmup", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [row["system"] for row in rows] == ["ours", "trl"]
    ours, trl = rows
    assert ours["tokens"] == trl["tokens"] > 0
    assert ours["mean_loss"] == pytest.approx(trl["mean_loss"], abs=2e-4)


@pytest.mark.slow
def test_bench_command_all_stages():
    out = bench("--config", "tiny", "--steps", "2")
    for stage in ("pretrain", "finetune", "lora"):
        assert f"| {stage} | ours |" in out and f"| {stage} | baseline |" in out


def test_7b_dry_run_prints_shapes_and_flops():
    out = bench("--config", "7b", "--dry-run")
    assert "6738.4M parameters" in out  # Llama-2-7B
    assert "576 image tokens" in out
    for stage in ("pretrain", "finetune", "lora"):
        assert f"| {stage} |" in out


def test_feature_cache_bench_matches_losses_and_bounds_the_speedup_by_the_towers_flops(tmp_path):
    """Both runs give the same losses; the tower's FLOPs it reports are the tiny CLIP's forward
    per image (2 layers of width 32 over 16 patches and CLS), so the bound is 1 / (1 - share)."""
    from llava.train.throughput import TowerShape

    saved = tmp_path / "result.json"
    result = subprocess.run(
        [sys.executable, "-m", "llava.bench.feature_cache_bench", "--config", "tiny",
         "--steps", "1", "--warmup", "1", "--rounds", "1", "--workdir", str(tmp_path / "work"),
         "--save-json", str(saved)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads(saved.read_text())
    summary, runs = results["summary"], results["runs"]
    assert summary["losses_agree"] and [run["system"] for run in runs] == ["pixels", "cached"]
    pixels = runs[0]
    per_image = TowerShape(2, 32, 64, 8, 16, 17, 16).forward_flops()
    assert pixels["tower_flops"] == pytest.approx(pixels["samples"] * per_image)  # stage 1: 1 each
    assert 0 < summary["tower_flop_share"] < 1
    assert summary["tower_flop_share"] == pytest.approx(
        pixels["tower_flops"] / pixels["model_flops"]
    )
    assert summary["flop_bound"] == pytest.approx(1 / (1 - summary["tower_flop_share"]))
    assert runs[1]["tower_flops"] == 0  # the cached run's images are features
    assert "bounds the speed-up at" in result.stdout
