"""python -m llava.data.cache_features: run the frozen vision tower once over a dataset's images
and write its selected features to a feature cache (read by --vision_feature_cache).

    python -m llava.data.cache_features --vision_tower openai/clip-vit-large-patch14-336 \\
        --data_path pretraining_data/blip_laion_cc_sbu_558k.json \\
        --image_folder pretraining_data/images --output_dir pretraining_data/features \\
        --mm_vision_select_layer -2 --image_aspect_ratio square --dtype bfloat16

One process (before a DeepSpeed run, not inside it), on the GPU when there is one. Distinct
images (by the sha256 of their bytes) are taken in the order the records first name them and
every --shard_size of them make one safetensors shard, written under a temporary name and
renamed; manifest.json is written last, so a killed run leaves nothing that reads as a finished
cache, and a rerun keeps the shards already written for the same images and settings. The
layout is described in llava/data/feature_cache.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llava.data.feature_cache import (
    FEATURES,
    FORMAT_VERSION,
    MANIFEST,
    cache_key,
    path_key,
    sha256_of_file,
    source_bytes,
)
from llava.data.formats import load_records
from llava.data.images import (
    ASPECT_RATIOS,
    DEFAULT_MAX_IMAGE_PIXELS,
    load_image,
    process_images,
)
from llava.model.vision_tower import load_vision_tower

logger = logging.getLogger("llava.cache_features")
DTYPES = ("float32", "bfloat16", "float16")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--vision_tower", help="HF CLIP/SigLIP checkpoint or open_clip:<name or local-dir:PATH>"
    )
    parser.add_argument(
        "--model_name_or_path",
        help="a saved composed LLaVA model: its mm_vision_tower (when --vision_tower is not given)",
    )
    parser.add_argument("--vision_tower_pretrained", help="weights of an open_clip tower")
    parser.add_argument("--data_path", required=True)
    parser.add_argument("--image_folder")
    parser.add_argument("--dataset_text_field")
    parser.add_argument("--dataset_image_field")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument(
        "--mm_vision_select_layer", type=int, default=-2, help="as training's (scripts: -2)"
    )
    parser.add_argument("--mm_vision_select_feature", default="patch", help="patch or cls_patch")
    parser.add_argument("--image_aspect_ratio", choices=ASPECT_RATIOS, default="square")
    parser.add_argument(
        "--dtype", choices=DTYPES, default="float32", help="the training's: bfloat16 with --bf16"
    )
    parser.add_argument("--max_image_pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS)
    parser.add_argument("--batch_size", type=int, default=64, help="images per tower call")
    parser.add_argument("--shard_size", type=int, default=4096, help="images per shard file")
    parser.add_argument("--num_workers", type=int, default=4, help="image decoding processes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.vision_tower is None:
        args.vision_tower = saved_tower(args.model_name_or_path)
    return args


def saved_tower(model_name_or_path: str | None) -> str:
    config = os.path.join(model_name_or_path or "", "config.json")
    if model_name_or_path and os.path.isfile(config):
        with open(config) as f:
            tower = json.load(f).get("mm_vision_tower")
        if tower:
            return tower
    raise SystemExit(
        "--vision_tower is required (or --model_name_or_path of a saved composed LLaVA model)"
    )


# -- which images, in which order -----------------------------------------------------------------
@dataclass
class ImageEntry:
    """One distinct image: its content hash and a source to decode it from."""

    digest: str
    source: Any


@dataclass
class Plan:
    images: list[ImageEntry] = field(default_factory=list)
    paths: dict[str, list] = field(default_factory=dict)  # path key -> [size, mtime_ns, digest]


def hash_source(source: Any, image_folder: str | None) -> tuple[str, str | None, list | None]:
    """(digest, path key or None, [size, mtime_ns, digest] or None)."""
    if not isinstance(source, str):
        return hashlib.sha256(source_bytes(source)).hexdigest(), None, None
    stat = os.stat(source)
    digest = sha256_of_file(source)
    return digest, path_key(source, image_folder), [stat.st_size, stat.st_mtime_ns, digest]


def plan_images(records: list, image_folder: str | None, threads: int = 8) -> Plan:
    """Every distinct image of the records, in the order they are first named."""
    sources = [source for record in records for source in record.images]
    with ThreadPoolExecutor(threads) as pool:  # reading and hashing release the GIL
        hashed = list(pool.map(lambda s: hash_source(s, image_folder), sources))
    plan, seen = Plan(), set()
    for source, (digest, key, seen_as) in zip(sources, hashed):
        if key is not None:
            plan.paths[key] = seen_as
        if digest not in seen:
            seen.add(digest)
            plan.images.append(ImageEntry(digest, source))
    return plan


# -- decoding and the tower -----------------------------------------------------------------------
class Decoded(torch.utils.data.Dataset):
    """Image i -> (i, pixels (3, H, W) or None, why it could not be decoded or None)."""

    def __init__(self, images: list[ImageEntry], image_processor: Any, args: argparse.Namespace):
        self.images, self.image_processor, self.args = images, image_processor, args

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        try:
            image = load_image(self.images[i].source, self.args.max_image_pixels)
            pixels = process_images([image], self.image_processor, self.args.image_aspect_ratio)
            return i, pixels[0], None
        except ValueError as error:
            return i, None, str(error)


def encode(
    tower: Any, images: list[ImageEntry], args: argparse.Namespace
) -> Iterator[tuple[int, torch.Tensor | None, str | None]]:
    """(index, features (P, C) or None, reason or None) for each image, in order."""
    loader = torch.utils.data.DataLoader(
        Decoded(images, tower.image_processor, args),
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        collate_fn=lambda items: items,
    )
    for items in loader:
        good = [(i, pixels) for i, pixels, _ in items if pixels is not None]
        features = {}
        if good:
            pixels = torch.stack([p for _, p in good]).to(args.device)  # (B, 3, H, W)
            with torch.inference_mode():
                out = tower(pixels).to("cpu")  # (B, P, C)
            features = {i: row for (i, _), row in zip(good, out)}
        for i, _, reason in items:
            yield i, features.get(i), reason


# -- shards and the manifest ----------------------------------------------------------------------
def shard_name(index: int) -> str:
    return f"features-{index:05d}.safetensors"


def finished_shard(path: str, key: dict, digests: list[str]) -> dict[str, str] | None:
    """The unreadable images of a shard an earlier run wrote for these images and settings."""
    if not os.path.isfile(path):
        return None
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception:  # a foreign or damaged file: written again
        return None
    if json.loads(metadata.get("key", "null")) != key:
        return None
    if json.loads(metadata.get("digests", "null")) != digests:
        return None
    return json.loads(metadata["unreadable"])


def write_atomically(path: str, write) -> None:
    temporary = f"{path}.tmp-{os.getpid()}"
    write(temporary)
    os.replace(temporary, path)


def write_shard(
    tower: Any, images: list[ImageEntry], key: dict, path: str, args: argparse.Namespace
) -> dict[str, str]:
    """Encode the shard's images and write them; returns {digest: reason} of the unreadable."""
    num_tokens, width = key["feature_shape"]
    dtype = getattr(torch, key["dtype"])
    rows = torch.zeros(len(images), num_tokens, width, dtype=dtype)  # (n, P, C)
    unreadable = {}
    for i, features, reason in encode(tower, images, args):
        if features is None:
            unreadable[images[i].digest] = reason
        else:
            rows[i] = features
    metadata = {
        "key": json.dumps(key),
        "digests": json.dumps([image.digest for image in images]),
        "unreadable": json.dumps(unreadable),
    }
    write_atomically(path, lambda temporary: save_file({FEATURES: rows}, temporary, metadata))
    return unreadable


def write_cache(args: argparse.Namespace) -> dict[str, Any]:
    """Write (or finish) the cache in args.output_dir; returns the manifest."""
    os.makedirs(args.output_dir, exist_ok=True)
    manifest_path = os.path.join(args.output_dir, MANIFEST)
    if os.path.exists(manifest_path):  # being rewritten: unfinished until the end
        os.remove(manifest_path)
    tower = load_vision_tower(
        args.vision_tower,
        select_layer=args.mm_vision_select_layer,
        select_feature=args.mm_vision_select_feature,
        pretrained=args.vision_tower_pretrained,
        torch_dtype=getattr(torch, args.dtype),
    )
    tower.requires_grad_(False)
    key = {"vision_tower": args.vision_tower, **cache_key(tower, args.image_aspect_ratio)}
    tower.eval().to(args.device)
    loaded = load_records(
        args.data_path,
        args.image_folder,
        args.dataset_text_field,
        args.dataset_image_field,
        skip_bad_records=True,  # training reports them; they have no images to cache
    )
    plan = plan_images(loaded.records, args.image_folder)
    shards, images, unreadable = [], {}, {}
    for index, start in enumerate(range(0, len(plan.images), args.shard_size)):
        chunk = plan.images[start : start + args.shard_size]
        name = shard_name(index)
        path = os.path.join(args.output_dir, name)
        digests = [image.digest for image in chunk]
        bad = finished_shard(path, key, digests)
        if bad is None:
            bad = write_shard(tower, chunk, key, path, args)
            logger.warning("wrote %s (%d images)", name, len(chunk))
        else:
            logger.warning("kept %s from an earlier run", name)
        unreadable.update(bad)
        images.update({digest: [index, row] for row, digest in enumerate(digests)})
        shards.append({"file": name, "rows": len(chunk), "bytes": os.path.getsize(path)})
    manifest = {
        "format": FORMAT_VERSION,
        "key": key,
        "data_path": args.data_path,
        "image_folder": args.image_folder,
        "shards": shards,
        "images": images,
        "paths": plan.paths,
        "unreadable": unreadable,
    }
    write_atomically(manifest_path, lambda temporary: write_json(manifest, temporary))
    logger.warning(
        "feature cache %s: %d images in %d shards (%d unreadable), from %d records",
        args.output_dir, len(images), len(shards), len(unreadable), len(loaded.records),
    )  # fmt: skip
    return manifest


def write_json(value: Any, path: str) -> None:
    with open(path, "w") as f:
        json.dump(value, f)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    write_cache(parse(argv))


if __name__ == "__main__":
    main()
