"""python -m llava.bench.feature_cache_bench: stage 1 with and without --vision_feature_cache.

    python -m llava.bench.feature_cache_bench --config small --steps 8 --warmup 2 --rounds 3

Both runs train the same random weights (llava.bench.assets) on the same records, as
`python -m llava.bench --stage pretrain` runs this project (llava.bench.runs); the cache of every
image of the warm-up and measured records is written once before measuring (its time is
reported, not counted). Each measured run is a fresh process and the order alternates (pixels,
cached, cached, pixels, ...), so load that drifts on a shared machine falls on both. Reported:
each run's samples/s, the median over rounds, the ratio cached / pixels taken within each round
then its median, and whether every measured step's float32 loss agrees.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from llava.bench.configs import CONFIGS
from llava.bench.runs import PACKINGS, OursOptions

STAGE = "pretrain"
SYSTEMS = ("pixels", "cached")
RESULT_PREFIX = "CACHE-BENCH-RESULT "
LOSS_TOLERANCE = 1e-5  # relative: the writer's batches differ from training's (float32 rounding)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small")
    parser.add_argument("--steps", type=int, default=8, help="measured optimizer steps")
    parser.add_argument("--warmup", type=int, default=2, help="steps before measuring")
    parser.add_argument("--rounds", type=int, default=3, help="pixels/cached pairs")
    parser.add_argument("--packing", choices=PACKINGS, default="flat", help="see runs.py")
    parser.add_argument("--workers", type=int, default=None, help="data loader workers")
    parser.add_argument("--workdir", help="where weights, data and the cache go (default: temp)")
    parser.add_argument("--save-json", help="also write the results as JSON to this file")
    parser.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def options_of(args: argparse.Namespace) -> OursOptions:
    config = CONFIGS[args.config]
    workers = args.workers if args.workers is not None else (0 if config.device == "cpu" else 4)
    return OursOptions(packing=args.packing, dataloader_workers=workers)


def cache_folder(workdir: str) -> str:
    return os.path.join(workdir, "feature_cache")


# -- one measured run (in the child process) ------------------------------------------------------
def build(workdir: str, config, cached: bool, options: OursOptions, losses: list):
    """make_trainer(part, steps, callbacks), as llava.bench.runs.build_ours builds this
    project's stage 1, with --vision_feature_cache when `cached`; the measured trainer records
    each step's loss tensor in `losses`."""
    from llava.bench.assets import Assets
    from llava.bench.runs import check_untruncated, ours_flags, settings_flags, trainer_settings
    from llava.model.builder import load_tokenizer
    from llava.model.llava import register_packed_attention
    from llava.train import train as entry
    from llava.train.arguments import parse_arguments

    assets = Assets(workdir)
    shared = settings_flags(trainer_settings(config, STAGE, tempfile.mkdtemp(prefix="bench-")))
    if cached:
        shared += ["--vision_feature_cache", cache_folder(workdir)]

    def arguments(part: str, steps: int):
        return parse_arguments(ours_flags(assets, config, STAGE, part, steps, options) + shared)

    register_packed_attention()
    model_args, _, args = arguments("warmup", 1)
    model, _ = entry.build_model(model_args, args)
    tokenizer = load_tokenizer(model_args.model_name_or_path, args.model_max_length)
    model, plan = entry.prepare_model(model, model_args, args)

    def make_trainer(part: str, steps: int, callbacks: list):
        model_args, data_args, args = arguments(part, steps)
        dataset, _, collator = entry.build_data(model, tokenizer, model_args, data_args, args)
        check_untruncated(dataset)
        trainer = entry.build_trainer(
            model, args, plan, train_dataset=dataset, data_collator=collator,
            processing_class=tokenizer, callbacks=callbacks,
        )  # fmt: skip
        if part == "measure":
            record_losses(trainer, losses)
        return trainer

    return make_trainer


def record_losses(trainer, losses: list) -> None:
    """Keep each step's loss tensor (read after the run: no extra device waits)."""
    compute_loss = trainer.compute_loss

    def recording(*args, **kwargs):
        output = compute_loss(*args, **kwargs)
        losses.append((output[0] if isinstance(output, tuple) else output).detach())
        return output

    trainer.compute_loss = recording


def worker_main(args: argparse.Namespace) -> None:
    import torch

    from llava.bench.runs import timed_train

    config = CONFIGS[args.config]
    torch.manual_seed(0)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    losses: list = []
    cached = args.worker == "cached"
    make_trainer = build(args.workdir, config, cached, options_of(args), losses)
    trainer, seconds, peak, _ = timed_train(make_trainer, args.warmup, args.steps, config.device)
    meter = trainer.throughput_callback().meter
    stats = meter.totals()
    result = {
        "system": args.worker,
        "seconds": seconds,
        "samples": stats["samples"],
        "samples_per_second": stats["samples"] / seconds,
        "peak_memory_mib": peak / 2**20,
        "losses": [float(loss) for loss in losses],
        **tower_flops(meter.flop_model, stats),
    }
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def tower_flops(flop_model, stats: dict) -> dict:
    """The run's model FLOPs (llava.train.throughput's FlopModel) and the frozen tower's part
    of them: what a feature cache can take away from the step's compute."""
    if flop_model is None:
        return {}
    tower = flop_model.image_flops - flop_model.cached_image_flops
    return {"model_flops": flop_model.step_flops(stats), "tower_flops": stats["images"] * tower}


def flop_bound(runs: list[dict]) -> dict:
    """The tower's share of the pixel runs' model FLOPs and the speed-up skipping it alone can
    give where step time follows FLOPs (Amdahl): 1 / (1 - share). What the cache gains beyond
    that is image decoding and preprocessing."""
    pixels = [run for run in runs if run["system"] == "pixels" and run.get("model_flops")]
    if not pixels:
        return {}
    share = statistics.median(run["tower_flops"] / run["model_flops"] for run in pixels)
    return {"tower_flop_share": share, "flop_bound": 1 / (1 - share)}


# -- the side-by-side measurement ----------------------------------------------------------------
def write_inputs(workdir: str, config, args: argparse.Namespace) -> float:
    """The benchmark's weights and data, then the cache of their images; returns the seconds
    the cache took to write."""
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed prints on import
        from llava.bench.assets import SELECT_LAYER, write_assets
        from llava.data.cache_features import main as cache_features

        assets = write_assets(workdir, config, [STAGE], args.warmup, args.steps)
        records = []
        for part in ("warmup", "measure"):
            with open(assets.data(STAGE, part)) as f:
                records += json.load(f)
        every = os.path.join(workdir, "feature-cache-records.json")
        with open(every, "w") as f:
            json.dump(records, f)
        start = time.perf_counter()
        cache_features(
            [
                "--vision_tower", assets.clip,
                "--data_path", every,
                "--image_folder", assets.images,
                "--output_dir", cache_folder(workdir),
                "--mm_vision_select_layer", str(SELECT_LAYER),
                "--image_aspect_ratio", "square",  # as llava.bench.runs.ours_flags
                "--dtype", config.dtype,
                "--num_workers", "0" if config.device == "cpu" else "4",
            ]
        )  # fmt: skip
        return time.perf_counter() - start


def spawn(system: str, args: argparse.Namespace, workdir: str) -> dict:
    """One measured run in a fresh interpreter."""
    command = [sys.executable, "-m", "llava.bench.feature_cache_bench", "--worker", system]
    command += ["--config", args.config, "--workdir", workdir, "--packing", args.packing]
    command += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    if args.workers is not None:
        command += ["--workers", str(args.workers)]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode or not lines:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-6000:])
        raise RuntimeError(f"the {system} run failed ({done.returncode})")
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


def losses_agree(runs: list[dict]) -> bool:
    """Every run's measured losses equal the first's, step by step, to LOSS_TOLERANCE."""
    reference = runs[0]["losses"]
    return all(
        len(run["losses"]) == len(reference)
        and all(abs(a - b) <= LOSS_TOLERANCE * abs(b) for a, b in zip(run["losses"], reference))
        for run in runs
    )


def summarise(runs: list[dict], cache_seconds: float, args: argparse.Namespace) -> dict:
    rate = {
        system: statistics.median(r["samples_per_second"] for r in runs if r["system"] == system)
        for system in SYSTEMS
    }
    ratios = []
    for round_index in range(args.rounds):
        pair = {r["system"]: r for r in runs if r["round"] == round_index}
        ratios.append(pair["cached"]["samples_per_second"] / pair["pixels"]["samples_per_second"])
    return {
        "samples_per_second": rate,
        "ratio": statistics.median(ratios),
        "ratios": ratios,
        "losses_agree": losses_agree(runs),
        "max_relative_loss_difference": max(
            abs(a - b) / abs(b) for run in runs for a, b in zip(run["losses"], runs[0]["losses"])
        ),
        "cache_seconds": cache_seconds,
        **flop_bound(runs),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.worker:
        worker_main(args)
        return
    config = CONFIGS[args.config]
    workdir = args.workdir or tempfile.mkdtemp(prefix=f"llava-cache-bench-{config.name}-")
    print(f"building weights, data and the feature cache in {workdir}", file=sys.stderr)
    cache_seconds = write_inputs(workdir, config, args)
    runs = []
    for round_index in range(args.rounds):
        order = SYSTEMS if round_index % 2 == 0 else SYSTEMS[::-1]
        for system in order:
            run = {**spawn(system, args, workdir), "round": round_index}
            runs.append(run)
            print(
                f"  round {round_index} {system:<6} {run['samples_per_second']:7.3f} samples/s "
                f"(first losses {[round(x, 5) for x in run['losses'][:3]]})",
                file=sys.stderr,
                flush=True,
            )
    summary = summarise(runs, cache_seconds, args)
    results = {"config": config.name, "runs": runs, "summary": summary}
    if args.save_json:
        with open(args.save_json, "w") as f:
            json.dump(results, f, indent=1)
    rate = summary["samples_per_second"]
    print(
        f"stage 1, config {config.name}, {args.steps} steps x {config.batch_size} samples, "
        f"{args.rounds} rounds, packing {args.packing}:\n"
        f"  pixels {rate['pixels']:.3f} samples/s, cached {rate['cached']:.3f} samples/s, "
        f"ratio {summary['ratio']:.2f}x (per round: "
        f"{', '.join(f'{r:.2f}' for r in summary['ratios'])})\n"
        f"  losses agree: {summary['losses_agree']} (largest relative difference "
        f"{summary['max_relative_loss_difference']:.1e}); the cache took "
        f"{cache_seconds:.1f} s to write"
    )
    if "flop_bound" in summary:
        print(
            f"  the tower is {100 * summary['tower_flop_share']:.1f}% of the pixel runs' model "
            f"FLOPs: skipping it alone bounds the speed-up at {summary['flop_bound']:.2f}x where "
            "time follows FLOPs (more comes from not decoding images)"
        )
    if not summary["losses_agree"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
