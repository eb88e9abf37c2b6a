"""The frozen-tower feature cache: the writer's files, the same stage-1 training with and
without it, and the errors of a cache that cannot serve a run."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from llava.data.cache_features import main as cache_features
from llava.data.feature_cache import MANIFEST, FeatureCache, FeatureCacheError, refuse_unservable
from llava.data.formats import BadRecordError
from llava.model.llava import LlavaForCausalLM
from llava.model.vision_tower import load_vision_tower
from llava.train.arguments import parse_arguments
from llava.train.train import build_data, build_model, train
from tests.fixtures.datasets import write_image
from tests.fixtures.models import save_tiny_clip
from tests.fixtures.training import training_flags

DISTINCT_IMAGES = 12  # the shapes dataset's 24 images repeat each (colour, size) pair twice


def write_cache(assets: dict[str, str], output_dir, *extra: str) -> str:
    """The cache of the stage-1 data; batches of 5 (training's are 4), shards of 5 images."""
    cache_features(
        [
            "--vision_tower", assets["clip"],
            "--data_path", assets["pretrain"],
            "--image_folder", assets["image_folder"],
            "--output_dir", str(output_dir),
            "--batch_size", "5",
            "--shard_size", "5",
            "--num_workers", "0",
            *extra,
        ]
    )  # fmt: skip
    return str(output_dir)


@pytest.fixture(scope="module")
def cache_dir(training_assets, tmp_path_factory) -> str:
    return write_cache(training_assets, tmp_path_factory.mktemp("feature_cache"))


def stage_one_flags(assets, output_dir, *extra: str) -> list[str]:
    return training_flags(
        assets,
        output_dir,
        "--version", "plain",
        "--data_path", assets["pretrain"],
        "--tune_mm_mlp_adapter", "True",
        *extra,
    )  # fmt: skip


def test_the_writer_stores_each_distinct_image_once_and_keeps_finished_shards(
    training_assets, cache_dir
):
    with open(os.path.join(cache_dir, MANIFEST)) as f:
        manifest = json.load(f)
    assert len(manifest["images"]) == DISTINCT_IMAGES
    assert len(manifest["paths"]) == 24 and manifest["unreadable"] == {}
    assert [shard["rows"] for shard in manifest["shards"]] == [5, 5, 2]
    assert manifest["key"]["mm_vision_select_layer"] == -2
    assert manifest["key"]["feature_shape"] == [16, 32]  # 32 px / patch 8, width 32
    shards = [os.path.join(cache_dir, shard["file"]) for shard in manifest["shards"]]
    written = [os.stat(path).st_mtime_ns for path in shards]
    os.remove(shards[1])  # as if killed while writing the second shard: no manifest yet
    os.remove(os.path.join(cache_dir, MANIFEST))
    write_cache(training_assets, cache_dir)
    assert os.stat(shards[0]).st_mtime_ns == written[0]  # kept
    assert os.stat(shards[2]).st_mtime_ns == written[2]
    with open(os.path.join(cache_dir, MANIFEST)) as f:
        assert json.load(f)["images"] == manifest["images"]
    assert not [name for name in os.listdir(cache_dir) if ".tmp-" in name]


def test_cached_features_are_the_towers_own(training_assets, cache_dir, tmp_path):
    model_args, data_args, args = parse_arguments(stage_one_flags(training_assets, tmp_path))
    model, _ = build_model(model_args, args)
    pixels, _, _ = build_data(model, tokenizer_of(model_args, args), model_args, data_args, args)
    data_args.vision_feature_cache = cache_dir
    cached, _, _ = build_data(model, tokenizer_of(model_args, args), model_args, data_args, args)
    for i in range(len(pixels)):
        expected = model.tower_features(pixels[i]["pixel_values"])  # (1, P, C)
        sample = cached[i]
        assert "pixel_values" not in sample
        assert sample["image_features"].shape == expected.shape
        torch.testing.assert_close(sample["image_features"], expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(sample["input_ids"], pixels[i]["input_ids"])


def tokenizer_of(model_args, args):
    from llava.model.builder import load_tokenizer

    return load_tokenizer(model_args.model_name_or_path, args.model_max_length)


@pytest.mark.parametrize(
    "layout",
    [
        [],
        ["--packing", "flat", "--attn_implementation", "sdpa_packed"],
        ["--num_length_buckets", "2"],
    ],
    ids=["padded", "packed", "static"],
)
def test_a_batch_has_the_same_loss_with_and_without_the_cache(
    training_assets, cache_dir, tmp_path, layout
):
    model_args, data_args, args = parse_arguments(
        stage_one_flags(training_assets, tmp_path, *layout)
    )
    model, _ = build_model(model_args, args)
    tokenizer = tokenizer_of(model_args, args)
    losses, grads = {}, {}
    for name, cache in (("pixels", None), ("cached", cache_dir)):
        data_args.vision_feature_cache = cache
        dataset, _, collator = build_data(model, tokenizer, model_args, data_args, args)
        batch = collator([dataset[i] for i in range(4)])
        batch.pop("sample_lengths", None)
        assert ("image_features" in batch) == (cache is not None)
        model.zero_grad()
        losses[name] = model(**batch).loss
        losses[name].backward()
        grads[name] = [p.grad.clone() for p in model.projector.parameters()]
    torch.testing.assert_close(losses["cached"], losses["pixels"], rtol=1e-6, atol=0)
    for cached, pixels in zip(grads["cached"], grads["pixels"]):
        torch.testing.assert_close(cached, pixels, rtol=1e-4, atol=1e-7)


def test_stage_one_trains_the_same_with_the_cache(
    training_assets, cache_dir, tmp_path, monkeypatch
):
    """Every step's loss, in float32 (the log keeps 4 digits). The writer's batches differ from
    training's, so the features agree to float32 rounding, not bit for bit."""
    forward = LlavaForCausalLM.forward
    losses: list[float] = []
    cached: list[bool] = []

    def recording(self, *args, **kwargs):
        output = forward(self, *args, **kwargs)
        losses.append(output.loss.item())
        cached.append(kwargs.get("image_features") is not None)
        return output

    monkeypatch.setattr(LlavaForCausalLM, "forward", recording)
    runs = {}
    for name, extra in (("pixels", []), ("cached", ["--vision_feature_cache", cache_dir])):
        losses.clear()
        cached.clear()
        train(*parse_arguments(stage_one_flags(training_assets, tmp_path / name, *extra)))
        runs[name] = list(losses)
        assert cached == [name == "cached"] * 3  # the model was given features, not pixels
    pixel_losses, cached_losses = runs["pixels"], runs["cached"]
    assert len(pixel_losses) == 3 and pixel_losses[2] < pixel_losses[0]
    assert cached_losses == pytest.approx(pixel_losses, rel=1e-6)


def test_a_cache_of_other_settings_is_refused_naming_the_field(
    training_assets, cache_dir, tmp_path
):
    cache = FeatureCache(cache_dir)
    tower = load_vision_tower(training_assets["clip"], select_layer=-2)
    cache.check(tower, "square")
    with pytest.raises(FeatureCacheError, match="image_aspect_ratio='square'; this run uses 'pad'"):
        cache.check(tower, "pad")
    other_layer = load_vision_tower(training_assets["clip"], select_layer=-1)
    with pytest.raises(
        FeatureCacheError,
        match=f"the cache at {cache_dir} was written with mm_vision_select_layer=-2; this run uses -1",
    ):
        cache.check(other_layer, "square")
    with pytest.raises(FeatureCacheError, match="dtype='float32'; this run uses 'bfloat16'"):
        cache.check(tower.to(torch.bfloat16), "square")
    other = load_vision_tower(save_tiny_clip(str(tmp_path / "clip"), seed=7), select_layer=-2)
    with pytest.raises(FeatureCacheError, match="another vision tower's weights"):
        cache.check(other, "square")
    # the training entry checks at start
    flags = stage_one_flags(
        training_assets, tmp_path / "run", "--vision_feature_cache", cache_dir,
        "--mm_vision_select_layer", "-1",
    )  # fmt: skip
    with pytest.raises(FeatureCacheError, match="mm_vision_select_layer=-2; this run uses -1"):
        train(*parse_arguments(flags))


def test_modes_the_cache_cannot_serve_are_refused_by_name():
    with pytest.raises(ValueError, match="--tune_vision_tower"):
        refuse_unservable(True, "square", False)
    with pytest.raises(ValueError, match="--image_aspect_ratio anyres_max_4"):
        refuse_unservable(False, "anyres_max_4", False)
    with pytest.raises(ValueError, match="its own processor"):
        refuse_unservable(False, "pad", True)
    refuse_unservable(False, "pad", False)


def test_an_unfinished_or_damaged_cache_is_refused(cache_dir, tmp_path):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(cache_dir, unfinished)
    os.remove(unfinished / MANIFEST)
    with pytest.raises(FeatureCacheError, match="no manifest.json .* did not finish"):
        FeatureCache(str(unfinished))
    damaged = tmp_path / "damaged"
    shutil.copytree(cache_dir, damaged)
    with open(damaged / "features-00001.safetensors", "r+b") as f:
        f.truncate(100)
    with pytest.raises(FeatureCacheError, match="damaged: shard features-00001.safetensors is 100"):
        FeatureCache(str(damaged))


def copy_of_the_data(assets: dict[str, str], folder) -> dict[str, str]:
    """The stage-1 records and images in `folder` (mtimes kept, as a copy or a move keeps them)."""
    images = folder / "images"
    shutil.copytree(assets["image_folder"], images)
    return {**assets, "image_folder": str(images)}


def records_of(path: str) -> list[dict]:
    with open(path) as f:
        return json.load(f)


def test_an_image_missing_from_the_cache_names_the_record_and_the_path(
    training_assets, cache_dir, tmp_path
):
    assets = copy_of_the_data(training_assets, tmp_path)
    records = records_of(assets["pretrain"])
    records[5]["image"] = "new.png"  # never cached
    write_image(os.path.join(assets["image_folder"], "new.png"), (1, 2, 3), (40, 40))
    assets["pretrain"] = str(tmp_path / "new.json")
    with open(assets["pretrain"], "w") as f:
        json.dump(records, f)
    flags = stage_one_flags(assets, tmp_path / "run", "--vision_feature_cache", cache_dir)
    pattern = "record 5 \\(id 'cap5'\\): image .*new.png is not in the feature cache at"
    with pytest.raises(FeatureCacheError, match=pattern):
        train(*parse_arguments(flags))

    # a cached path whose file changed since (size and mtime differ: it is hashed again)
    assets = copy_of_the_data(training_assets, tmp_path / "changed")
    write_image(os.path.join(assets["image_folder"], "007.png"), (1, 2, 3), (48, 32))
    flags = stage_one_flags(assets, tmp_path / "run2", "--vision_feature_cache", cache_dir)
    with pytest.raises(FeatureCacheError, match="record 7 .*007.png is not in the feature cache"):
        train(*parse_arguments(flags))


def test_an_image_the_writer_could_not_decode_is_a_bad_record(training_assets, tmp_path):
    assets = copy_of_the_data(training_assets, tmp_path)
    with open(os.path.join(assets["image_folder"], "002.png"), "wb") as f:
        f.write(b"not an image")
    cache = write_cache(assets, tmp_path / "cache")
    assert len(FeatureCache(cache).unreadable) == 1
    flags = stage_one_flags(assets, tmp_path / "run", "--vision_feature_cache", cache)
    model_args, data_args, args = parse_arguments(flags)
    model, _ = build_model(model_args, args)
    tokenizer = tokenizer_of(model_args, args)
    dataset, _, _ = build_data(model, tokenizer, model_args, data_args, args)
    with pytest.raises(BadRecordError, match="record 2.*unreadable image"):
        dataset[2]
    data_args.skip_bad_records = True  # replaced by the next image sample, as without a cache
    dataset, _, _ = build_data(model, tokenizer, model_args, data_args, args)
    assert torch.equal(dataset[2]["input_ids"], dataset[3]["input_ids"])


def test_text_only_batches_of_a_cached_run_leave_the_tower_alone(
    training_assets, cache_dir, tmp_path, monkeypatch
):
    """Under ZeRO-3 every rank must run the same modules: with cached features an image batch
    skips the tower, so a text-only batch's stand-in image must skip it too."""
    flags = training_flags(
        training_assets, tmp_path, "--version", "v1", "--data_path", training_assets["finetune"],
        "--vision_feature_cache", cache_dir,
    )  # fmt: skip
    model_args, data_args, args = parse_arguments(flags)
    model, _ = build_model(model_args, args)
    dataset, _, collator = build_data(
        model, tokenizer_of(model_args, args), model_args, data_args, args
    )
    text_only = [i for i, modality in enumerate(dataset.modalities) if modality == "text"]
    batch = collator([dataset[i] for i in text_only[:2]])
    assert batch["image_features"].shape == (0, 16, 32)

    def no_tower(*args, **kwargs):
        raise AssertionError("the tower ran")

    monkeypatch.setattr(model.vision_tower, "forward", no_tower)
    model.train()
    model(**batch).loss.backward()
    assert all(p.grad is not None for p in model.projector.parameters())
