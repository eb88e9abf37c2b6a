"""python -m llava.bench.startup: seconds and resident memory per rank to build stage-2 data.

    python -m llava.bench.startup --records 665000 --ranks 1
    python -m llava.bench.startup --records 665000 --ranks 2
    python -m llava.bench.startup --records 665000 --ranks 1 --format shards   # or jsonl

Writes once (into --workdir) a synthetic JSON shaped like LLaVA-1.5's 665K mixture: 94% image
records of 1-4 turns, 6% text-only ones (ShareGPT-like, longer answers); questions of 10-40
words, answers of 5-150 (text-only: 20-300), words Zipf-distributed over a 32K vocabulary and
tokenized by a 32K word-level fast tokenizer (one token a word; Llama's sentencepiece gives about
1.3 a word and is slower per token). Records point at a few hundred small JPEGs, which exist
because the reader checks every image path; at start-up nothing else of an image is read in
this mode (`pad`, LLaVA-1.5's): AnyRes and processor models read each image's header there.
`--format jsonl` writes the same rows one a line; `--format shards` as webdataset tar shards
of SHARD_RECORDS samples (`KEY.json`, `KEY.jpg`), built from
`--data_path 'mix665000-shards/{00000..00132}.tar'`.

Then it starts `--ranks` fresh processes (a gloo process group when more than one), each of
which builds the data as `llava.train.train.build_data` does (v1 template, 576 image tokens,
model_max_length 2048, per-device batch 16), then the modality-grouped sampler and a DataLoader,
and reports seconds to the dataset being ready and to the first batch (from the process's
start, imports included) and its peak resident memory. It runs twice: without a length cache
(`cold`, the cache files next to the data are removed first) and again (`warm`).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import resource
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

RESULT_PREFIX = "STARTUP-RESULT "
NUM_IMAGES = 256  # distinct JPEG files the records point at
VOCAB_SIZE = 32000
TEXT_ONLY_FRACTION = 0.06  # ShareGPT's 40K of 665K
BATCH_SIZE = 16  # LLaVA-1.5's per-device batch
SHARD_RECORDS = 5000  # records per tar shard with --format shards
FORMATS = ("json", "jsonl", "shards")


# -- data -----------------------------------------------------------------------------------------
class Words:
    """Random runs of Zipf-distributed words, cut from one long pre-drawn text (fast)."""

    def __init__(self, seed: int, num_words: int = 2_000_000):
        import numpy as np

        from llava.bench.synthetic import TextSampler

        first = TextSampler(VOCAB_SIZE, seed).first_word
        ranks = np.random.default_rng(seed).zipf(1.2, size=num_words) % (VOCAB_SIZE - first)
        words = [f"w{rank}" for rank in ranks.tolist()]
        self.text = " ".join(words)
        ends = np.cumsum([len(word) + 1 for word in words])
        self.starts = np.concatenate([[0], ends[:-1]]).tolist()
        self.num_words = num_words
        self.rng = random.Random(seed)

    def __call__(self, low: int, high: int) -> str:
        count = self.rng.randint(low, high)
        first = self.rng.randrange(self.num_words - count)
        end = self.starts[first + count] - 1
        return self.text[self.starts[first] : end] + self.rng.choice(".?.!")


def mixture_record(index: int, words: Words) -> dict:
    rng = words.rng
    has_image = rng.random() >= TEXT_ONLY_FRACTION
    num_turns = rng.choice((1, 1, 1, 2, 2, 3, 4)) if has_image else rng.randint(1, 4)
    answer = (5, 150) if has_image else (20, 300)
    turns = []
    for _ in range(num_turns):
        turns.append({"from": "human", "value": words(10, 40)})
        turns.append({"from": "gpt", "value": words(*answer)})
    record = {"id": f"{index:09d}", "conversations": turns}
    if has_image:
        record["image"] = f"{index % NUM_IMAGES:04d}.jpg"
        turns[0]["value"] = "<image>\n" + turns[0]["value"]
    return record


def write_mixture(folder: str, count: int, seed: int = 0) -> str:
    """The mixture's JSON (written once per count) and its images; returns the JSON's path."""
    import numpy as np
    from PIL import Image

    path = os.path.join(folder, f"mix{count}.json")
    images = os.path.join(folder, "images")
    os.makedirs(images, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k in range(NUM_IMAGES):
        name = os.path.join(images, f"{k:04d}.jpg")
        if not os.path.exists(name):
            size = (int(rng.integers(320, 640)), int(rng.integers(240, 480)))
            pixels = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).resize(size).save(name, quality=85)
    if os.path.exists(path):
        return path
    words = Words(seed, num_words=min(2_000_000, 100_000 + 300 * count))
    with open(path + ".part", "w") as f:
        f.write("[\n")
        for index in range(count):
            f.write(("" if index == 0 else ",\n") + json.dumps(mixture_record(index, words)))
        f.write("\n]\n")
    os.replace(path + ".part", path)
    return path


def write_jsonl(json_path: str) -> str:
    """The mixture's rows as a .jsonl file beside its .json (written once); returns its path."""
    path = json_path[: -len(".json")] + ".jsonl"
    if os.path.exists(path):
        return path
    with open(json_path) as rows, open(path + ".part", "w") as f:
        for line in rows:  # write_mixture puts one row on each line between "[" and "]"
            row = line.strip().rstrip(",")
            if row not in ("[", "]", ""):
                f.write(row + "\n")
    os.replace(path + ".part", path)
    return path


def write_shards(folder: str, count: int, per_shard: int = SHARD_RECORDS) -> str:
    """The same mixture as webdataset tar shards (`KEY.json`, and `KEY.jpg` for an image
    record), written once per count; returns the shard pattern (`.../{00000..00132}.tar`).
    Each image member is one of NUM_IMAGES small JPEGs: start-up reads only tar headers, so
    their size changes nothing measured here but the disk the shards take."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    shards = os.path.join(folder, f"mix{count}-shards")
    last = (count - 1) // per_shard
    width = max(5, len(str(last)))
    pattern = os.path.join(shards, f"{{{0:0{width}d}..{last:0{width}d}}}.tar")
    done = os.path.join(shards, "complete")
    if os.path.exists(done):
        return pattern
    os.makedirs(shards, exist_ok=True)
    rng = np.random.default_rng(0)
    jpegs = []
    for _ in range(NUM_IMAGES):
        buffer = io.BytesIO()
        pixels = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((64, 48)).save(buffer, format="JPEG", quality=85)
        jpegs.append(buffer.getvalue())
    words = Words(0, num_words=min(2_000_000, 100_000 + 300 * count))

    def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    for shard in range(last + 1):
        path = os.path.join(shards, f"{shard:0{width}d}.tar")
        with tarfile.open(path + ".part", "w", format=tarfile.USTAR_FORMAT) as tar:
            for index in range(shard * per_shard, min(count, (shard + 1) * per_shard)):
                record = mixture_record(index, words)
                key = record["id"]
                add(tar, f"{key}.json", json.dumps(record).encode())
                if "image" in record:
                    add(tar, f"{key}.jpg", jpegs[index % NUM_IMAGES])
        os.replace(path + ".part", path)
    open(done, "w").close()
    return pattern


def remove_length_caches(data_path: str) -> None:
    """The length caches of a .json file or of a shard pattern (named after it in the first
    shard's folder)."""
    for path in glob.glob(glob.escape(data_path) + ".lengths-*"):
        os.remove(path)


# -- one rank -------------------------------------------------------------------------------------
def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """This process's CPU time, its threads' and its finished children's included (the forked
    build workers): steadier than wall time on a busy machine."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def children_peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def rank_main(args: argparse.Namespace) -> None:
    """In a child process: build the data as train.py does, then take one batch."""
    started = args.started  # the parent's clock when it started this process
    import torch
    from torch.utils.data import DataLoader
    from transformers import CLIPImageProcessor

    from llava.bench.synthetic import build_tokenizer
    from llava.data.sampler import build_train_sampler
    from llava.train.arguments import DataArguments
    from llava.train.train import build_data

    if args.world > 1:
        torch.distributed.init_process_group("gloo", rank=args.rank, world_size=args.world)
    tokenizer = build_tokenizer(VOCAB_SIZE)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}
    )
    model = SimpleNamespace(
        vision_tower=SimpleNamespace(image_processor=image_processor, image_size=(336, 336)),
        num_image_tokens=576,
        anyres=None,
    )
    model_args = SimpleNamespace(version="v1", mm_use_im_start_end=False)
    data_args = DataArguments(  # the flags' defaults, as a finetune.sh run has them
        data_path=args.data_path,
        image_folder=os.path.join(os.path.dirname(args.data_path), "images"),
        image_aspect_ratio="pad",
    )
    train_args = SimpleNamespace(
        model_max_length=2048,
        output_dir=os.path.join(args.workdir, "run"),
        packing="none",
        pad_max=False,
        num_length_buckets=0,
        per_device_train_batch_size=BATCH_SIZE,
        per_device_eval_batch_size=BATCH_SIZE,
        seed=42,
        data_seed=None,
    )
    imported, cpu_before = time.time() - started, cpu_seconds()
    dataset, _, collator = build_data(model, tokenizer, model_args, data_args, train_args)
    ready, build_cpu = time.time() - started, cpu_seconds() - cpu_before
    ready_rss, build_children_rss = peak_rss_mib(), children_peak_rss_mib()
    sampler = build_train_sampler(
        dataset, BATCH_SIZE, world_size=args.world, group_by_modality_length=True, seed=42
    )
    loader = DataLoader(
        dataset,
        batch_size=BATCH_SIZE,
        sampler=sampler,
        collate_fn=collator,
        num_workers=args.workers,
    )
    iterator = iter(loader)
    batch = next(iterator)
    first_batch = time.time() - started
    del iterator  # the workers exit; their peak shows in RUSAGE_CHILDREN
    result = {
        "rank": args.rank,
        "samples": len(dataset),
        "imported_s": round(imported, 2),
        "build_s": round(ready - imported, 2),  # in build_data: what this benchmark is about
        "build_cpu_s": round(build_cpu, 2),
        "ready_s": round(ready, 2),
        "first_batch_s": round(first_batch, 2),
        "peak_rss_ready_mib": round(ready_rss),
        "peak_rss_mib": round(peak_rss_mib()),
        "build_worker_peak_rss_mib": round(build_children_rss),
        "worker_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
        "batch_tokens": int(batch["input_ids"].numel()),
    }
    if args.world > 1:
        torch.distributed.destroy_process_group()
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# -- the parent -----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(args: argparse.Namespace, data_path: str) -> list[dict]:
    """`--ranks` fresh processes at once; their results, by rank."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    env.update(WORLD_SIZE=str(args.ranks))
    processes = []
    for rank in range(args.ranks):
        command = [
            sys.executable, "-m", "llava.bench.startup", "--rank", str(rank),
            "--world", str(args.ranks), "--data-path", data_path, "--workdir", args.workdir,
            "--workers", str(args.workers), "--started", repr(time.time()),
        ]  # fmt: skip
        rank_env = dict(env, RANK=str(rank), LOCAL_RANK=str(rank))
        processes.append(subprocess.Popen(command, env=rank_env, stdout=subprocess.PIPE, text=True))
    results = []
    for process in processes:
        out, _ = process.communicate()
        if process.returncode:
            raise RuntimeError(f"a rank failed (exit {process.returncode}):\n{out}")
        line = next(line for line in out.splitlines() if line.startswith(RESULT_PREFIX))
        results.append(json.loads(line[len(RESULT_PREFIX) :]))
    return sorted(results, key=lambda result: result["rank"])


def table(rows: list[tuple[str, dict]]) -> str:
    columns = [
        "build_s",
        "build_cpu_s",
        "ready_s",
        "first_batch_s",
        "peak_rss_ready_mib",
        "peak_rss_mib",
    ]
    columns += ["build_worker_peak_rss_mib", "worker_peak_rss_mib", "imported_s", "samples"]
    lines = ["| start | rank | " + " | ".join(columns) + " |"]
    lines.append("|" + "---|" * (len(columns) + 2))
    for name, result in rows:
        values = " | ".join(str(result.get(column, "")) for column in columns)
        lines.append(f"| {name} | {result['rank']} | {values} |")
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=665_000)
    parser.add_argument("--ranks", type=int, default=1, help="processes, as torchrun would start")
    parser.add_argument("--workers", type=int, default=2, help="data loader workers per rank")
    parser.add_argument("--workdir", default="/tmp/llava-startup-bench")
    parser.add_argument("--starts", default="cold,warm", help="cold: no length cache first")
    parser.add_argument(
        "--format", choices=FORMATS, default="json", help="a .json list, .jsonl or tar shards"
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--data-path", help=argparse.SUPPRESS)
    parser.add_argument("--started", type=float, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def data_size(data_path: str) -> int:
    """Bytes of a .json file or of every shard a pattern names."""
    from llava.data.shards import ShardSet, is_shard_path

    if is_shard_path(data_path):
        return sum(ShardSet.find(data_path).sizes)
    return os.path.getsize(data_path)


def main(argv: list[str] | None = None) -> list[tuple[str, dict]]:
    args = parse(argv)
    if args.rank is not None:
        rank_main(args)
        return []
    os.makedirs(args.workdir, exist_ok=True)
    began = time.time()
    data_path = write_mixture(args.workdir, args.records)  # the images the .json names
    if args.format == "jsonl":
        data_path = write_jsonl(data_path)
    if args.format == "shards":
        data_path = write_shards(args.workdir, args.records)
    size_mib = data_size(data_path) / 2**20
    print(f"data: {data_path} ({size_mib:.0f} MiB; written in {time.time() - began:.0f} s)")
    rows = []
    for start in args.starts.split(","):
        if start == "cold":
            remove_length_caches(data_path)
        rows += [(start, result) for result in start_ranks(args, data_path)]
    print(json.dumps(rows) if args.json else table(rows))
    return rows


if __name__ == "__main__":
    main()
