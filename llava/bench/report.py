"""Benchmark figures: medians per system and stage, the ours/baseline ratios, the printed table,
and the dry run (shapes, parameter counts and FLOPs per step without building weights)."""

from __future__ import annotations

import os
import platform
import statistics
from typing import Any

import torch

from llava.bench.configs import STAGES, VLM_STAGES, BenchConfig, system_name
from llava.model.kinds import CONNECTOR, LANGUAGE_MODEL, VISION, parts_by_role
from llava.train.stages import StagePlan, plan_stage
from llava.train.throughput import (
    PEAK_FLOPS,
    FlopModel,
    flop_model_for,
    stage_grads,
    tower_shape,
)

# The flags each benchmark stage trains with (as llava/bench/runs.py passes them).
STAGE_FLAGS = {
    "pretrain": {"tune_mm_mlp_adapter": True},
    "finetune": {},
    "lora": {"lora_enable": True},
}


def llava_config(config: BenchConfig):
    """This project's LlavaConfig for a benchmark config (no weights)."""
    from llava.bench.assets import (
        PROJECTOR_TYPE,
        SELECT_LAYER,
        clip_config,
        clip_processor,
        llama_config,
    )
    from llava.model.config import LlavaConfig

    tower = {
        "tower_type": "clip",
        "vision_config": clip_config(config).to_dict(),
        "image_processor": clip_processor(config).to_dict(),
    }
    return LlavaConfig(
        text_config=llama_config(config),
        vision_tower_config=tower,
        mm_projector_type=PROJECTOR_TYPE,
        mm_vision_select_layer=SELECT_LAYER,
        mm_hidden_size=config.vision_width,
        num_image_tokens=config.num_image_tokens,
    )


def stage_plan(stage: str) -> StagePlan:
    return plan_stage(**STAGE_FLAGS[stage])


def flop_model(stage: str, config: BenchConfig) -> FlopModel | None:
    """The LLaVA stages' FLOP model; None for the image-text-to-text families (not counted)."""
    if stage not in STAGES:
        return None
    grads = stage_grads(stage_plan(stage), lora_rank=config.lora_r)
    return flop_model_for(llava_config(config), grads)


def peak_flops(config: BenchConfig, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    device = "H100" if config.device == "cuda" else config.device
    return PEAK_FLOPS.get((device, config.dtype))


# ---------------------------------------------------------------------------------------------
# Measured runs -> summary.


def figures(run: dict[str, Any], flops: FlopModel | None, peak: float | None) -> dict[str, float]:
    stats, seconds = run["stats"], run["seconds"]
    rate = flops.step_flops(stats) / seconds if flops is not None else float("nan")
    return {
        "samples_per_s": stats["samples"] / seconds,
        "tokens_per_s": stats["tokens"] / seconds,
        "peak_memory_mib": run["peak_memory_mib"],
        "tflops": rate / 1e12,
        "mfu": rate / peak if peak else float("nan"),  # nan without a FLOP model
        "padding": 1 - stats["tokens"] / max(stats["slots"], 1),
        "loss": run["loss"],
    }


def summarise(
    records: list[dict[str, Any]], config: BenchConfig, override_tflops: float | None = None
) -> dict[str, Any]:
    """Per stage: each system's median figures and the median of the per-round ratios."""
    peak = peak_flops(config, override_tflops)
    summary: dict[str, Any] = {}
    for stage in dict.fromkeys(r["stage"] for r in records):
        flops = flop_model(stage, config)
        runs = [r for r in records if r["stage"] == stage]
        check_same_work(runs)
        by_system: dict[str, list[dict[str, float]]] = {"ours": [], "baseline": []}
        by_round: dict[int, dict[str, dict[str, float]]] = {}
        for run in runs:
            values = figures(run, flops, peak)
            by_system[run["system"]].append(values)
            by_round.setdefault(run["round"], {})[run["system"]] = values
        ratios = [
            pair["ours"]["samples_per_s"] / pair["baseline"]["samples_per_s"]
            for pair in by_round.values()
            if len(pair) == 2
        ]
        summary[stage] = {
            system: {key: statistics.median(v[key] for v in values) for key in values[0]}
            for system, values in by_system.items()
            if values
        }
        summary[stage]["speedup"] = statistics.median(ratios) if ratios else float("nan")
        summary[stage]["speedups"] = ratios
        summary[stage]["memory_ratio"] = (
            summary[stage]["ours"]["peak_memory_mib"]
            / summary[stage]["baseline"]["peak_memory_mib"]
        )
        summary[stage]["load"] = [load for run in runs for load in run["load"]]
    return summary


def check_same_work(runs: list[dict[str, Any]]) -> None:
    """Both systems must have trained the same samples, tokens and supervised tokens (and, for
    the image-text-to-text families, the same number of parameters)."""
    keys = ("samples", "tokens", "supervised", "images", "squared_lengths")
    seen = {tuple(run["stats"][key] for key in keys) for run in runs}
    if len(seen) != 1:
        raise RuntimeError(f"the systems did different work: {sorted(seen)} ({keys})")
    if runs[0]["stage"] in VLM_STAGES:
        trained = {run["trainable_parameters"] for run in runs}
        if len(trained) != 1:
            raise RuntimeError(f"the systems trained different parameter counts: {trained}")


def table(summary: dict[str, Any], config: BenchConfig, args: Any, started: str) -> str:
    """The table docs/benchmarks.md holds: one row per stage and system, then the ratio."""
    lines = [
        f"llava.bench --config {config.name} --steps {args.steps} --warmup {args.warmup} "
        f"--rounds {args.rounds}  ({started}, {machine()})",
        "",
        "| stage | system | samples/s | tokens/s | peak mem (MiB) | TFLOP/s | MFU | padding |"
        " loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for stage, row in summary.items():
        for system in ("ours", "baseline"):
            v = row[system]
            name = system_name({"system": system, "stage": stage})
            lines.append(
                f"| {stage} | {name} | {v['samples_per_s']:.3f} | {v['tokens_per_s']:.0f} | "
                f"{v['peak_memory_mib']:.0f} | {number(v['tflops'], 4)} | {number(v['mfu'], 3)} | "
                f"{v['padding']:.2f} | {v['loss']:.3f} |"
            )
    lines += ["", "| stage | speedup (samples/s) | per round | memory ours/baseline | load |"]
    lines.append("|---|---|---|---|---|")
    for stage, row in summary.items():
        rounds = ", ".join(f"{r:.2f}" for r in row["speedups"])
        load = f"{min(row['load']):.1f}-{max(row['load']):.1f}"
        lines.append(
            f"| {stage} | {row['speedup']:.2f}x | {rounds} | {row['memory_ratio']:.2f} | {load} |"
        )
    return "\n".join(lines)


def number(value: float, decimals: int) -> str:
    """A figure, or "-" where there is none (no FLOP model for the image-text-to-text stages)."""
    return "-" if value != value else f"{value:.{decimals}f}"


def machine() -> str:
    """CPU model, cores this process may use, GPU."""
    model = platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        model = names[0] if names else model
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{model}, {len(os.sched_getaffinity(0))} cores, {device}"


# ---------------------------------------------------------------------------------------------
# Dry run.


def parameter_counts(config: BenchConfig) -> dict[str, int]:
    """Parameters per role (vision, connector, language model, head inside it), from the model
    built on the meta device (no memory)."""
    from llava.model.llava import LlavaForCausalLM

    with torch.device("meta"):
        model = LlavaForCausalLM(llava_config(config))
    return {
        role: sum(p.numel() for p in part.parameters())
        for role, part in parts_by_role(model).items()
    }


def typical_statistics(stage: str, config: BenchConfig, samples: int = 256) -> dict[str, float]:
    """Mean per-step statistics of the synthetic data (tokenized, no images decoded)."""
    from llava.bench.baseline import HFLlavaCollator
    from llava.bench.synthetic import build_tokenizer, make_records

    tokenizer = build_tokenizer(config.vocab_size)
    collator = HFLlavaCollator(
        tokenizer, None, config.num_image_tokens, "", "plain" if stage == "pretrain" else "v1",
        config.model_max_length,
    )  # fmt: skip
    records = make_records(stage, samples, config, seed=20)
    encoded = [collator.encode(record) for record in records]
    lengths = [len(ids) for ids, _ in encoded]
    scale = config.batch_size / samples
    return {
        "samples": config.batch_size,
        "tokens": sum(lengths) * scale,
        "squared_lengths": sum(n * n for n in lengths) * scale,
        "supervised": sum(sum(t != -100 for t in labels[1:]) for _, labels in encoded) * scale,
        "images": sum(1 for r in records if r.get("image")) * scale,
        "slots": sum(lengths) * scale,
    }


def dry_run_report(config: BenchConfig, stages: list[str], override_tflops: float | None) -> str:
    """Shapes and FLOPs of the LLaVA stages; shapes of the image-text-to-text families."""
    families = [stage for stage in stages if stage in VLM_STAGES]
    stages = [stage for stage in stages if stage in STAGES]
    lines = llava_dry_run_lines(config, stages, override_tflops) if stages else []
    return "\n".join(lines + [vlm_dry_run_line(config, family) for family in families])


def vlm_dry_run_line(config: BenchConfig, family: str) -> str:
    """A family's parameters per role, from its model built on the meta device (no memory)."""
    from llava.bench.vlm_models import FAMILIES, build_tokenizer

    spec = FAMILIES[family]
    with torch.device("meta"):
        model, _ = spec.build(config, build_tokenizer(spec, config.vocab_size))
    counts = {
        role: sum(p.numel() for p in part.parameters())
        for role, part in parts_by_role(model).items()
    }
    total = sum(p.numel() for p in model.parameters())
    return (
        f"{family} ({type(model).__name__}): {total / 1e6:.1f}M parameters (vision "
        f"{counts[VISION] / 1e6:.1f}M, connector {counts[CONNECTOR] / 1e6:.2f}M, language model "
        f"{counts[LANGUAGE_MODEL] / 1e6:.1f}M; Qwen2-VL's connector is inside its vision model); "
        f"up to {spec.max_image_tokens(config)} tokens an image; no FLOP model"
    )


def llava_dry_run_lines(
    config: BenchConfig, stages: list[str], override_tflops: float | None
) -> list[str]:
    counts = parameter_counts(config)
    tower = tower_shape(llava_config(config).vision_tower_config)
    peak = peak_flops(config, override_tflops)
    lines = [
        f"config {config.name}: {config.device}, {config.dtype}, batch {config.batch_size}, "
        f"max length {config.model_max_length}",
        f"vision tower: CLIP {config.image_size}px/{config.patch_size}, {config.vision_layers} "
        f"layers x {config.vision_width}, {tower.positions} positions, "
        f"{config.num_image_tokens} image tokens; {counts[VISION] / 1e6:.1f}M parameters",
        f"projector: mlp2x_gelu {config.vision_width}->{config.text_width}; "
        f"{counts[CONNECTOR] / 1e6:.2f}M parameters",
        f"language model: Llama {config.text_layers} layers x {config.text_width} "
        f"(MLP {config.text_intermediate}, {config.text_heads} heads), vocab {config.vocab_size}; "
        f"{counts[LANGUAGE_MODEL] / 1e6:.1f}M parameters",
        f"peak: {peak / 1e12 if peak else float('nan'):.3g} TFLOP/s",
        "",
        "| stage | tokens/step | supervised/step | TFLOP/step | s/step at 100% MFU | at 40% |",
        "|---|---|---|---|---|---|",
    ]
    for stage in stages:
        stats = typical_statistics(stage, config)
        flops = flop_model(stage, config).step_flops(stats)
        ideal = flops / peak if peak else float("nan")
        lines.append(
            f"| {stage} | {stats['tokens']:.0f} | {stats['supervised']:.0f} | "
            f"{flops / 1e12:.2f} | {ideal:.3f} | {ideal / 0.4:.3f} |"
        )
    return lines
