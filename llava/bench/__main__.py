"""python -m llava.bench: this project's trainer against transformers' Llava + Trainer, side by side.

    python -m llava.bench --config small --stage all --steps 8 --warmup 2 --rounds 3
    python -m llava.bench --config small --stage vlm --steps 8 --warmup 2 --rounds 3
    python -m llava.bench --config small --stage anyres --steps 8 --warmup 2 --rounds 3

`--stage all` runs the LLaVA stages (pretrain, finetune, lora); `--stage anyres` a full stage 2
on LLaVA-NeXT's tiles against transformers' LlavaNext + Trainer; `--stage vlm` (or one family:
idefics3, qwen2_vl) fully fine-tunes a transformers image-text-to-text model and compares
against TRL's SFTTrainer on it (llava/bench/trl_baseline.py; needs `pip install -e ".[bench]"`).

Both systems train the same random weights on the same records with the same batch; each
measured run is a fresh process, and the two systems alternate (ours, baseline, baseline,
ours, ...), so load that drifts on a shared machine falls on both. Figures are medians over
rounds; the ratio is ours / baseline, taken within each round, then the median.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict

from llava.bench.configs import (
    ANYRES_STAGE,
    CONFIGS,
    STAGES,
    VLM_GROUP,
    VLM_STAGES,
    BenchConfig,
    system_name,
)
from llava.bench.runs import PACKINGS, OursOptions, RunResult

RESULT_PREFIX = "BENCH-RESULT "


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small")
    parser.add_argument(
        "--stage",
        choices=[*STAGES, "all", ANYRES_STAGE, *VLM_STAGES, VLM_GROUP],
        default="all",
        help=f"all: {', '.join(STAGES)}; {ANYRES_STAGE}: against LlavaNext; "
        f"{VLM_GROUP}: {', '.join(VLM_STAGES)} (against TRL)",
    )
    parser.add_argument("--steps", type=int, default=8, help="measured optimizer steps")
    parser.add_argument("--warmup", type=int, default=2, help="steps before measuring")
    parser.add_argument("--rounds", type=int, default=1, help="ours/baseline pairs per stage")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--save-json", help="also write the results as JSON to this file")
    parser.add_argument("--dry-run", action="store_true", help="print shapes and FLOPs only")
    parser.add_argument("--workdir", help="where weights and data go (default: a temp dir)")
    parser.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: table)")
    parser.add_argument(
        "--packing", choices=PACKINGS, default="flat", help="ours: batch layout (see runs.py)"
    )
    parser.add_argument("--group-by-length", action="store_true", help="ours: grouped sampler")
    parser.add_argument("--workers", type=int, default=None, help="ours: data loader workers")
    parser.add_argument("--worker", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def ours_options(args: argparse.Namespace, config: BenchConfig) -> OursOptions:
    workers = args.workers if args.workers is not None else (0 if config.device == "cpu" else 4)
    return OursOptions(
        packing=args.packing,
        group_by_length=args.group_by_length,
        dataloader_workers=workers,
    )


def worker_main(args: argparse.Namespace) -> None:
    """In the child process: one measured run, printed as one JSON line."""
    from llava.bench.runs import run

    config = CONFIGS[args.config]
    result = run(
        args.worker, args.workdir, config, args.stage, args.warmup, args.steps,
        ours_options(args, config),
    )  # fmt: skip
    print(RESULT_PREFIX + json.dumps(asdict(result)), flush=True)


def spawn(system: str, stage: str, args: argparse.Namespace, workdir: str) -> RunResult:
    """Run one measurement in a fresh interpreter (clean allocator, clean peak memory)."""
    command = [sys.executable, "-m", "llava.bench", "--worker", system, "--stage", stage]
    command += ["--config", args.config, "--workdir", workdir]
    command += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    command += ["--packing", args.packing]
    if args.group_by_length:
        command.append("--group-by-length")
    if args.workers is not None:
        command += ["--workers", str(args.workers)]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode or not lines:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-6000:])
        raise RuntimeError(f"the {system} run of stage {stage} failed ({done.returncode})")
    return RunResult(**json.loads(lines[-1][len(RESULT_PREFIX) :]))


def chosen_stages(stage: str) -> list[str]:
    if stage == "all":
        return list(STAGES)
    if stage == VLM_GROUP:
        return list(VLM_STAGES)
    return [stage]


def write_all_assets(workdir: str, config: BenchConfig, stages: list[str], args) -> None:
    """The LLaVA stages' weights and data, and each image-text-to-text family's. DeepSpeed
    prints to stdout on import and when it first picks an accelerator: sent to stderr, so
    stdout holds the table or the JSON alone."""
    with contextlib.redirect_stdout(sys.stderr):
        from llava.bench.assets import write_assets
        from llava.bench.vlm_models import write_vlm_assets

        llava_stages = [stage for stage in stages if stage in (*STAGES, ANYRES_STAGE)]
        families = [stage for stage in stages if stage in VLM_STAGES]
        if llava_stages:
            write_assets(workdir, config, llava_stages, args.warmup, args.steps)
        if families:
            write_vlm_assets(workdir, config, families, args.warmup, args.steps)


def load_average() -> float:
    return os.getloadavg()[0]


def measure(args: argparse.Namespace, stages: list[str], workdir: str) -> list[dict]:
    """Alternate the systems: each round runs both, the order flipping every round."""
    records = []
    for stage in stages:
        for round_index in range(args.rounds):
            order = ["ours", "baseline"] if round_index % 2 == 0 else ["baseline", "ours"]
            for system in order:
                before = load_average()
                result = spawn(system, stage, args, workdir)
                entry = {**asdict(result), "round": round_index}
                entry["load"] = [round(before, 2), round(load_average(), 2)]
                records.append(entry)
                print(progress_line(entry), file=sys.stderr, flush=True)
    return records


def progress_line(entry: dict) -> str:
    rate = entry["stats"]["samples"] / entry["seconds"]
    return (
        f"  {entry['stage']:<9} round {entry['round']} {system_name(entry):<8} "
        f"{rate:7.3f} samples/s  peak +{entry['peak_memory_mib']:.0f} MiB  "
        f"load {entry['load'][0]:.1f}->{entry['load'][1]:.1f}"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.worker:
        worker_main(args)
        return
    from llava.bench.report import dry_run_report, summarise, table

    config = CONFIGS[args.config]
    stages = chosen_stages(args.stage)
    if args.dry_run:
        print(dry_run_report(config, stages, args.peak_tflops))
        return
    if any(stage in VLM_STAGES for stage in stages):
        with contextlib.redirect_stdout(sys.stderr):
            from llava.bench.trl_baseline import NOT_INSTALLED, trl_installed
        if not trl_installed():
            sys.exit(NOT_INSTALLED)

    workdir = args.workdir or tempfile.mkdtemp(prefix=f"llava-bench-{config.name}-")
    started = time.strftime("%Y-%m-%d %H:%M")
    print(f"building weights and data in {workdir}", file=sys.stderr, flush=True)
    write_all_assets(workdir, config, stages, args)
    records = measure(args, stages, workdir)
    summary = summarise(records, config, args.peak_tflops)
    results = {"config": config.name, "started": started, "runs": records, "summary": summary}
    if args.save_json:
        with open(args.save_json, "w") as f:
            json.dump(results, f, indent=1)
    print(json.dumps(results, indent=1) if args.json else table(summary, config, args, started))


if __name__ == "__main__":
    main()
