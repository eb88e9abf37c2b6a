"""Frozen-tower feature cache: reading what `python -m llava.data.cache_features` wrote.

A cache folder holds safetensors shards of the tower's selected features (N, P, C), after layer
and feature selection and before the projector, and `manifest.json`, written last, with:
`key` (what the features depend on: the tower's weights, select layer and feature, aspect
mode, the image processor's settings, dtype and feature shape), `shards` (file, rows, bytes),
`images` (sha256 of an image file's bytes -> [shard, row]), `paths` (an image path relative to
the image folder -> [size, mtime_ns, sha256]) and `unreadable` (sha256 -> why the writer could
not decode it).

Training with `--vision_feature_cache DIR` checks the key against the model's tower first; a
difference is an error naming the field. Each image is found by its content hash; to avoid
reading every file at start, an image whose path, size and modification time are those the
writer saw takes the hash the writer stored, and any other image file is hashed again. An
image not in the cache is an error naming the record and the path.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llava.data.collator import SupervisedCollator, pad_token_id_of
from llava.data.dataset import DataSummary, SupervisedDataset
from llava.data.formats import BadRecordError, Record, load_records
from llava.data.images import DEFAULT_MAX_IMAGE_PIXELS
from llava.data.media import is_anyres

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
FEATURES = "features"  # the tensor name in each shard
# Key fields in the order a difference is reported (the most telling first).
KEY_FIELDS = (
    "mm_vision_select_layer",
    "mm_vision_select_feature",
    "image_aspect_ratio",
    "dtype",
    "feature_shape",
    "image_processor",
    "tower_weights",
)


class FeatureCacheError(ValueError):
    """A feature cache that cannot serve this run: missing, unfinished, stale or mismatched."""


# -- what the features depend on ------------------------------------------------------------------
def sha256_of_file(path: str, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def source_bytes(source: Any) -> bytes:
    """The encoded bytes of an image source that is not a path (dataset column, bytes, dict)."""
    if hasattr(source, "fetch"):  # a reference into a dataset column
        source = source.fetch()
    if isinstance(source, dict):
        source = source.get("bytes") or source.get("path")
    if isinstance(source, str):
        with open(source, "rb") as f:
            return f.read()
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    raise FeatureCacheError(f"a {type(source).__name__} image has no bytes to hash for the cache")


def tower_weights_hash(tower: torch.nn.Module) -> str:
    """sha256 over the tower's tensors (names, dtypes, shapes, bytes), in name order. ZeRO-3
    partitioned weights are gathered first (every rank must call this)."""
    parameters = list(tower.parameters())
    if any(hasattr(p, "ds_id") for p in parameters):
        import deepspeed

        with deepspeed.zero.GatheredParameters(parameters, modifier_rank=None):
            return tower_weights_hash_here(tower)
    return tower_weights_hash_here(tower)


def tower_weights_hash_here(tower: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(tower.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy())
    return digest.hexdigest()


def processor_settings(image_processor: Any) -> dict[str, Any]:
    """The image processor's settings as JSON (private keys left out)."""
    settings = json.loads(json.dumps(image_processor.to_dict(), sort_keys=True, default=str))
    return {key: value for key, value in settings.items() if not key.startswith("_")}


def cache_key(vision_tower: Any, image_aspect_ratio: str) -> dict[str, Any]:
    """What a tower's cached features depend on (llava.model.vision_tower.VisionTower)."""
    return {
        "mm_vision_select_layer": vision_tower.select_layer,
        "mm_vision_select_feature": vision_tower.select_feature,
        "image_aspect_ratio": image_aspect_ratio,
        "dtype": str(vision_tower.dtype).removeprefix("torch."),
        "feature_shape": [vision_tower.geometry.num_image_tokens, vision_tower.hidden_size],
        "image_processor": processor_settings(vision_tower.image_processor),
        "tower_weights": tower_weights_hash(vision_tower),
    }


def key_differences(folder: str, written: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """One sentence per key field the cache was written with and this run does not use."""
    lines = []
    for name in KEY_FIELDS:
        if written.get(name) == current[name]:
            continue
        if name == "tower_weights":
            lines.append(
                f"the cache at {folder} was written from another vision tower's weights "
                f"({written.get('vision_tower')!r}); this run's tower differs"
            )
        elif name == "image_processor":
            changed = sorted(
                k
                for k in set(written.get(name, {})) | set(current[name])
                if written.get(name, {}).get(k) != current[name].get(k)
            )
            lines.append(
                f"the cache at {folder} was written with other image processor settings "
                f"({', '.join(changed)}) than this run's tower uses"
            )
        else:
            lines.append(
                f"the cache at {folder} was written with {name}={written.get(name)!r}; this "
                f"run uses {current[name]!r}"
            )
    return lines


def refuse_unservable(
    tune_vision_tower: bool, image_aspect_ratio: str, has_processor: bool
) -> None:
    """Modes whose image features a cache of the frozen tower cannot give, refused by name."""
    flag = "--vision_feature_cache"
    if tune_vision_tower:
        raise ValueError(f"{flag}: --tune_vision_tower trains the tower, so its features change")
    if is_anyres(image_aspect_ratio):
        raise ValueError(
            f"{flag}: --image_aspect_ratio {image_aspect_ratio} tiles each image by its size; "
            "the cache holds one fixed-size view per image (use pad or square)"
        )
    if has_processor:
        raise ValueError(
            f"{flag}: a model with its own processor (a transformers image-text-to-text model) "
            "encodes its images itself; the cache serves the composed model's tower"
        )


# -- reading ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Unreadable:
    """An image the writer could not decode: the record is bad, as it would be uncached."""

    reason: str


class FeatureCache:
    """A finished cache folder: its manifest checked, its shards opened lazily per process."""

    def __init__(self, folder: str):
        self.folder = folder
        path = os.path.join(folder, MANIFEST)
        if not os.path.isfile(path):
            raise FeatureCacheError(
                f"no {MANIFEST} in {folder}: not a feature cache, or its writing did not finish "
                "(run python -m llava.data.cache_features again with this --output_dir)"
            )
        with open(path) as f:
            manifest = json.load(f)
        if manifest.get("format") != FORMAT_VERSION:
            raise FeatureCacheError(
                f"the cache at {folder} has format {manifest.get('format')!r}; this code reads "
                f"format {FORMAT_VERSION} (write the cache again)"
            )
        self.key: dict[str, Any] = manifest["key"]
        self.shards: list[dict[str, Any]] = manifest["shards"]
        self.images: dict[str, list[int]] = manifest["images"]
        self.paths: dict[str, list] = manifest["paths"]
        self.unreadable: dict[str, str] = manifest["unreadable"]
        for shard in self.shards:
            shard_path = os.path.join(folder, shard["file"])
            size = os.path.getsize(shard_path) if os.path.isfile(shard_path) else None
            if size != shard["bytes"]:
                state = "missing" if size is None else f"{size} bytes, not {shard['bytes']}"
                raise FeatureCacheError(
                    f"the cache at {folder} is damaged: shard {shard['file']} is {state} "
                    "(write the cache again)"
                )
        self.handles: dict[int, Any] = {}
        self.handles_pid = os.getpid()

    def check(self, vision_tower: Any, image_aspect_ratio: str) -> None:
        """Raise unless the cache was written with this tower and preprocessing."""
        differences = key_differences(
            self.folder, self.key, cache_key(vision_tower, image_aspect_ratio)
        )
        if differences:
            raise FeatureCacheError("; ".join(differences))

    def content_hash(self, source: Any, image_folder: str | None) -> str:
        """The image's sha256: the writer's, when the file's path, size and mtime are the ones
        it saw; else read from the bytes now."""
        if not isinstance(source, str):
            return hashlib.sha256(source_bytes(source)).hexdigest()
        stat = os.stat(source)
        seen = self.paths.get(path_key(source, image_folder))
        if seen is not None and seen[0] == stat.st_size and seen[1] == stat.st_mtime_ns:
            return seen[2]
        return sha256_of_file(source)

    def locate(self, record: Record, source: Any, image_folder: str | None) -> Any:
        """(shard, row) of an image of `record`, or Unreadable; an error when it is not here."""
        try:
            digest = self.content_hash(source, image_folder)
        except OSError as error:
            raise FeatureCacheError(
                f"{record.source} record {record.index} (id {record.id!r}): {error}"
            ) from None
        if digest in self.unreadable:
            return Unreadable(self.unreadable[digest])
        if digest not in self.images:
            shown = source if isinstance(source, str) else f"({type(source).__name__})"
            raise FeatureCacheError(
                f"{record.source} record {record.index} (id {record.id!r}): image {shown} is not "
                f"in the feature cache at {self.folder} (it was not among the images the cache "
                "was written from, or it changed since): run python -m llava.data.cache_features "
                "again"
            )
        return tuple(self.images[digest])

    def handle(self, shard: int) -> Any:
        """The shard's safetensors file, opened once per process (loader workers fork)."""
        from safetensors import safe_open

        if self.handles_pid != os.getpid():
            self.handles, self.handles_pid = {}, os.getpid()
        if shard not in self.handles:
            path = os.path.join(self.folder, self.shards[shard]["file"])
            self.handles[shard] = safe_open(path, framework="pt")
        return self.handles[shard]

    def features(self, locations: Sequence[tuple[int, int]]) -> torch.Tensor:
        """(N, P, C) features of the located images, in order."""
        rows = [self.handle(shard).get_slice(FEATURES)[row : row + 1] for shard, row in locations]
        # One image (the usual case) needs no cat, whose threads wait long on a busy CPU.
        return rows[0] if len(rows) == 1 else torch.cat(rows)

    def __getstate__(self) -> dict[str, Any]:  # open files stay with their process
        return {**self.__dict__, "handles": {}}


def path_key(path: str, image_folder: str | None) -> str:
    """How the manifest names an image path: relative to the image folder when under it."""
    path = os.path.abspath(path)
    if image_folder:
        relative = os.path.relpath(path, os.path.abspath(image_folder))
        if not relative.startswith(os.pardir):
            return relative
    return path


# -- the dataset and collator ---------------------------------------------------------------------
class FeatureCacheDataset(SupervisedDataset):
    """Records -> {"input_ids", "labels", "image_features" (N, P, C) or None}: the cached tower
    features in place of pixels. Every image is found in the cache when the dataset is built."""

    def __init__(
        self,
        records: list[Record],
        tokenizer: Any,
        template: Any,
        model_max_length: int,
        cache: FeatureCache,
        image_folder: str | None = None,
        **kwargs: Any,
    ):
        self.cache = cache
        self.image_folder = image_folder
        self.locations: dict[tuple[str, int], list[Any]] = {}
        super().__init__(records, tokenizer, template, model_max_length, **kwargs)

    def add_block(self, records: list[Record]) -> None:
        """Find each record's images in the cache, then tokenize as the parent does."""
        for record in records:
            self.locations[(record.source, record.index)] = [
                self.cache.locate(record, source, self.image_folder) for source in record.images
            ]
        super().add_block(records)

    def pixel_values(self, record: Record, num_images: int) -> torch.Tensor | None:
        """(num_images, P, C) cached features (the parent's slot for a sample's images)."""
        if num_images == 0:
            return None
        locations = self.locations[(record.source, record.index)][:num_images]
        for location in locations:
            if isinstance(location, Unreadable):
                raise BadRecordError(record.source, record.index, location.reason, record.id)
        return self.cache.features(locations)

    def load(self, i: int) -> dict[str, torch.Tensor | None]:
        item = super().load(i)
        item["image_features"] = item.pop("pixel_values")  # (N, P, C) or None
        return item


@dataclass
class FeatureCollator:
    """Any collator of pixel samples, made to batch `image_features` (N, P, C) instead: they
    take the place of pixel_values, in the order that collator gives the images. A batch
    without images gets empty ones (0, P, C), so the model knows not to run its tower for
    them either (see LlavaForCausalLM.image_path_dummy_output)."""

    collator: Any
    feature_shape: tuple[int, int]  # (P, C)

    @property
    def pad_token_id(self) -> int:
        return self.collator.pad_token_id

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        as_pixels = []
        for sample in samples:
            sample = dict(sample)
            sample["pixel_values"] = sample.pop("image_features", None)
            as_pixels.append(sample)
        batch = self.collator(as_pixels)
        if "pixel_values" in batch:
            batch["image_features"] = batch.pop("pixel_values")  # (N_images, P, C)
        else:
            batch["image_features"] = torch.zeros((0, *self.feature_shape))  # (0, P, C)
        return batch


def build_cached_data(
    tokenizer: Any,
    template: Any,
    model_max_length: int,
    data_args: Any,
    vision_tower: Any,
    num_image_tokens: int,
    mm_use_im_start_end: bool = False,
    padding_side: str = "right",
    skip_log_dir: str | None = None,
) -> tuple[FeatureCacheDataset, SupervisedCollator]:
    """(dataset, collator) reading `data_args.vision_feature_cache` after checking it against
    the model's tower; the collator batches pixels (wrap it in FeatureCollator last)."""
    cache = FeatureCache(data_args.vision_feature_cache)
    aspect = getattr(data_args, "image_aspect_ratio", "square")
    cache.check(vision_tower, aspect)
    skip_bad_records = getattr(data_args, "skip_bad_records", False)
    loaded = load_records(
        data_args.data_path,
        data_args.image_folder,
        getattr(data_args, "dataset_text_field", None),
        getattr(data_args, "dataset_image_field", None),
        skip_bad_records,
    )
    dataset = FeatureCacheDataset(
        loaded.records,
        tokenizer,
        template,
        model_max_length,
        cache=cache,
        image_folder=data_args.image_folder,
        image_processor=vision_tower.image_processor,
        num_image_tokens=num_image_tokens,
        image_aspect_ratio=aspect,
        mm_use_im_start_end=mm_use_im_start_end,
        skip_bad_records=skip_bad_records,
        summary=DataSummary(source=data_args.data_path),
        skipped=loaded.skipped,
        skip_log_dir=skip_log_dir,
        max_image_pixels=getattr(data_args, "max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS),
    )
    if len(dataset) == 0:
        raise ValueError(f"no trainable sample in {data_args.data_path}: {dataset.summary.line()}")
    return dataset, SupervisedCollator(pad_token_id_of(tokenizer), padding_side=padding_side)
