"""One measured run (in its own process): build a system for a stage, warm up, train the
measured records once, and report time, batch statistics, peak memory and mean loss."""

from __future__ import annotations

import gc
import importlib.util
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from transformers import TrainerCallback

from llava.bench.assets import SELECT_LAYER, Assets
from llava.bench.configs import ANYRES_STAGE, VLM_STAGES, BenchConfig
from llava.train.arguments import PACKINGS
from llava.train.throughput import ThroughputMeter

# LLaVA-1.5's learning rates (speed does not depend on them; a constant schedule does not
# change over the warm-up and measured runs). The image-text-to-text families fine-tune fully.
LEARNING_RATES = {"pretrain": 1e-3, "finetune": 2e-5, "lora": 2e-4, ANYRES_STAGE: 2e-5}
LEARNING_RATES.update({family: LEARNING_RATES["finetune"] for family in VLM_STAGES})
LORA_DROPOUT = 0.05


@dataclass
class OursOptions:
    """This project's performance settings; the defaults are what the benchmark measures.

    packing: `flat` (one row per batch, attention per sample through `sdpa_packed`), `rows`
    (rows bounded by the longest sample, plain sdpa) or `none` (right padding).
    """

    packing: str = "flat"
    group_by_length: bool = False
    dataloader_workers: int = 0

    def __post_init__(self):
        if self.packing not in PACKINGS:
            raise ValueError(f"packing must be one of {PACKINGS}, not {self.packing!r}")

    @property
    def attn_implementation(self) -> str:
        """flash_attention_2 for flat batches on a GPU that has it, else sdpa_packed; rows and
        padded batches take plain sdpa."""
        if self.packing != "flat":
            return "sdpa"
        if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
        return "sdpa_packed"


@dataclass
class RunResult:
    """One measured run; `stats` are the summed batch statistics (llava.train.throughput)."""

    system: str
    stage: str
    seconds: float
    steps: int
    stats: dict[str, int]
    peak_memory_mib: float
    loss: float
    device: str
    options: dict[str, Any] = field(default_factory=dict)
    trainable_parameters: int = 0


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class WallClock(TrainerCallback):
    """Wall time from the start to the end of `train()`'s loop (the device drained)."""

    def __init__(self):
        self.start = self.end = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        synchronize(args.device)
        self.start = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        synchronize(args.device)
        self.end = time.perf_counter()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# Memory: the peak during training above what the process held before it.


def rss_bytes(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field_name} in /proc/self/status")


def reset_peak_memory(device: str) -> int:
    """Start a peak window; returns the bytes held now (CPU: resident set; GPU: allocated).

    On CPU the kernel's high-water mark (VmHWM) is reset through /proc/self/clear_refs, so
    the peak covers only what follows; it counts every allocation (torch's, Python's, the
    loader's), which tracemalloc would not see.
    """
    gc.collect()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss_bytes("VmRSS")


def peak_memory(device: str, start: int) -> int:
    """CPU: peak resident set above `start`; GPU: torch.cuda.max_memory_allocated()."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return rss_bytes("VmHWM") - start


# ---------------------------------------------------------------------------------------------
# Common trainer settings.


def trainer_settings(config: BenchConfig, stage: str, output_dir: str) -> dict[str, Any]:
    """What both systems share: batch, schedule, precision; no saving, no logging mid-run."""
    return {
        "output_dir": output_dir,
        "per_device_train_batch_size": config.batch_size,
        "learning_rate": LEARNING_RATES[stage],
        "lr_scheduler_type": "constant",
        "weight_decay": 0.0,
        "logging_steps": 10**6,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "use_cpu": config.device == "cpu",
        "bf16": config.dtype == "bfloat16",
        "gradient_checkpointing": config.gradient_checkpointing,
        "seed": 0,
    }


def timed_train(make_trainer, warmup: int, steps: int, device: str):
    """Train `warmup` steps on the warm-up records, then `steps` on the measured ones (one
    epoch of them) with a fresh trainer (and optimizer) on the same model.

    Returns (measured trainer, its seconds, peak memory bytes of both runs, mean loss). The
    peak is the process's own: on CPU keep the loader in-process (0 workers) to count it all.
    """
    start = reset_peak_memory(device)
    if warmup:
        make_trainer("warmup", warmup, []).train()
        gc.collect()
    clock = WallClock()
    trainer = make_trainer("measure", steps, [clock])
    output = trainer.train()
    seconds = clock.end - clock.start
    return trainer, seconds, peak_memory(device, start), output.training_loss


# ---------------------------------------------------------------------------------------------
# This project.


def ours_flags(
    assets: Assets, config: BenchConfig, stage: str, part: str, steps: int, options: OursOptions
) -> list[str]:
    """The command line of `llava.train.train` for the stage, as the scripts give it."""
    if stage in VLM_STAGES:
        return vlm_flags(assets, config, stage, part, steps, options)
    flags = {
        "--model_name_or_path": assets.llm,
        "--vision_tower": assets.clip,
        "--mm_projector_type": "mlp2x_gelu",
        "--mm_vision_select_layer": str(SELECT_LAYER),
        "--pretrain_mm_mlp_adapter": assets.projector,
        "--data_path": assets.data(stage, part),
        "--image_folder": assets.images,
        "--version": "plain" if stage == "pretrain" else "v1",
        # The baseline's processor resizes and crops; so does `square` (LLaVA-1.5's stage 2
        # pads to a square first, which costs a paste per image).
        "--image_aspect_ratio": "square",
        "--model_max_length": str(config.model_max_length),
        "--max_steps": str(steps),
        "--dataloader_num_workers": str(options.dataloader_workers),
        "--group_by_modality_length": str(options.group_by_length),
        "--attn_implementation": options.attn_implementation,
        "--packing": options.packing,
    }
    if stage == "pretrain":
        flags["--tune_mm_mlp_adapter"] = "True"
    if stage == ANYRES_STAGE:  # a full stage 2 on LLaVA-NeXT's tiles
        flags.update(
            {
                "--pretrain_mm_mlp_adapter": assets.anyres_projector,
                "--image_aspect_ratio": "anyres",
                "--image_grid_pinpoints": config.anyres_pinpoints,
                "--mm_patch_merge_type": "spatial_unpad",
                "--model_max_length": str(config.anyres_max_length),
            }
        )
    if stage == "lora":
        flags.update(
            {
                "--lora_enable": "True",
                "--lora_r": str(config.lora_r),
                "--lora_alpha": str(config.lora_alpha),
                "--lora_dropout": str(LORA_DROPOUT),
            }
        )
    return [item for pair in flags.items() for item in pair]


def vlm_flags(
    assets: Assets, config: BenchConfig, family: str, part: str, steps: int, options: OursOptions
) -> list[str]:
    """Full fine-tuning of a family's complete model, as a user runs it: its own chat template
    (--version auto) and processor, unpacked batches (packing is not implemented for these
    model classes), and the vision tower training too, as in the peer's run."""
    flags = {
        "--model_name_or_path": assets.vlm(family),
        "--version": "auto",
        "--data_path": assets.data(family, part),
        "--image_folder": assets.images,
        "--model_max_length": str(config.model_max_length),
        "--max_steps": str(steps),
        "--dataloader_num_workers": str(options.dataloader_workers),
        "--group_by_modality_length": str(options.group_by_length),
        "--attn_implementation": options.attn_implementation,
        "--packing": options.packing,
        "--tune_vision_tower": "True",
    }
    return [item for pair in flags.items() for item in pair]


def settings_flags(settings: dict[str, Any]) -> list[str]:
    return [item for key, value in settings.items() for item in (f"--{key}", str(value))]


def build_ours(assets: Assets, config: BenchConfig, stage: str, options: OursOptions):
    """make_trainer(part, steps, callbacks) over one model, built as llava.train.train builds
    it (flags parsed, model built, stage applied, LoRA added, data read)."""
    from llava.model.builder import load_tokenizer
    from llava.model.llava import register_packed_attention
    from llava.train import train as entry
    from llava.train.arguments import parse_arguments

    output_dir = tempfile.mkdtemp(prefix="bench-ours-")
    shared = settings_flags(trainer_settings(config, stage, output_dir))
    if config.gradient_checkpointing:
        shared += ["--gradient_checkpointing_kwargs", '{"use_reentrant": false}']

    def arguments(part: str, steps: int):
        return parse_arguments(ours_flags(assets, config, stage, part, steps, options) + shared)

    register_packed_attention()
    model_args, data_args, args = arguments("warmup", 1)
    model, processor = entry.build_model(model_args, args, data_args)
    if processor is None:
        tokenizer = load_tokenizer(model_args.model_name_or_path, args.model_max_length)
        model.config.image_aspect_ratio = data_args.image_aspect_ratio
    else:
        entry.check_flags_for_processor_model(model_args, data_args, args)
        tokenizer = entry.processor_tokenizer(processor, args.model_max_length)
    model, plan = entry.prepare_model(model, model_args, args)

    def make_trainer(part: str, steps: int, callbacks: list):
        model_args, data_args, args = arguments(part, steps)
        dataset, _, collator = entry.build_data(
            model, tokenizer, model_args, data_args, args, processor
        )
        check_untruncated(dataset)
        return entry.build_trainer(
            model,
            args,
            plan,
            train_dataset=dataset,
            data_collator=collator,
            processing_class=processor if processor is not None else tokenizer,
            callbacks=callbacks,
        )

    return make_trainer


def check_untruncated(dataset) -> None:
    """Both systems must see the same tokens: nothing shortened or dropped."""
    summary = dataset.summary
    if summary.shortened or summary.dropped_too_long or summary.dropped_no_supervision:
        raise RuntimeError(f"the benchmark data does not fit model_max_length: {summary.line()}")


def run_ours(
    assets: Assets, config: BenchConfig, stage: str, warmup: int, steps: int, options: OursOptions
) -> RunResult:
    make_trainer = build_ours(assets, config, stage, options)
    trainer, seconds, peak, loss = timed_train(make_trainer, warmup, steps, config.device)
    stats = trainer.throughput_callback().meter.totals()
    return RunResult(
        "ours", stage, seconds, steps, stats, peak / 2**20, loss, config.device, asdict(options),
        trainable_parameters(trainer.model),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The baseline: transformers' Llava, stock Trainer, its usual data path.


class CountingCollator:
    """Wraps a collator (run in the main process) and records each batch's statistics."""

    def __init__(self, collator, meter: ThroughputMeter):
        self.collator, self.meter = collator, meter

    def __call__(self, records):
        batch = self.collator(records)
        self.meter.record(batch)
        return batch


def freeze_baseline(model, stage: str, config: BenchConfig):
    """The same parts train as in this project's stage; LoRA through peft on the LM linears."""
    model.requires_grad_(False)
    inner = model.model
    inner.multi_modal_projector.requires_grad_(True)
    if stage == "finetune":
        inner.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    if stage != "lora":
        return model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=LORA_DROPOUT,
        target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
    )
    model = get_peft_model(model, lora)
    for parameter in model.base_model.model.model.multi_modal_projector.parameters():
        parameter.requires_grad_(True)
    return model


def build_baseline(assets: Assets, config: BenchConfig, stage: str):
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        LlavaForConditionalGeneration,
        Trainer,
        TrainingArguments,
    )

    from llava.bench.baseline import HFLlavaCollator, JsonRecords

    dtype = getattr(torch, config.dtype)
    model = LlavaForConditionalGeneration.from_pretrained(
        assets.hf_llava, torch_dtype=dtype, attn_implementation="sdpa"
    )
    model = freeze_baseline(model, stage, config)
    tokenizer = AutoTokenizer.from_pretrained(assets.hf_llava)
    collator = HFLlavaCollator(
        tokenizer=tokenizer,
        image_processor=CLIPImageProcessor.from_pretrained(assets.hf_llava),
        image_seq_length=config.num_image_tokens,
        image_folder=assets.images,
        version="plain" if stage == "pretrain" else "v1",
        model_max_length=config.model_max_length,
    )
    output_dir = tempfile.mkdtemp(prefix="bench-baseline-")
    settings = trainer_settings(config, stage, output_dir)
    if config.gradient_checkpointing:
        settings["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    meter = ThroughputMeter(None, None)

    def make_trainer(part: str, steps: int, callbacks: list):
        meter.start()
        args = TrainingArguments(max_steps=steps, remove_unused_columns=False, **settings)
        return Trainer(
            model=model,
            args=args,
            train_dataset=JsonRecords(assets.data(stage, part)),
            data_collator=CountingCollator(collator, meter),
            callbacks=callbacks,
        )

    return make_trainer, meter


def run_baseline(
    assets: Assets, config: BenchConfig, stage: str, warmup: int, steps: int
) -> RunResult:
    if stage == ANYRES_STAGE:
        from llava.bench.anyres_bench import build_anyres_baseline

        make_trainer, meter = build_anyres_baseline(assets, config)
    else:
        make_trainer, meter = build_baseline(assets, config, stage)
    trainer, seconds, peak, loss = timed_train(make_trainer, warmup, steps, config.device)
    return RunResult(
        "baseline", stage, seconds, steps, meter.totals(), peak / 2**20, loss, config.device,
        trainable_parameters=trainable_parameters(trainer.model),
    )  # fmt: skip


def run(
    system: str,
    folder: str,
    config: BenchConfig,
    stage: str,
    warmup: int,
    steps: int,
    options: OursOptions,
) -> RunResult:
    """One measured run of `system` (ours | baseline) on the assets in `folder`; the baseline
    of an image-text-to-text family (VLM_STAGES) is TRL's SFTTrainer, the anyres stage's
    transformers' LlavaNext (llava/bench/anyres_bench.py)."""
    assets = Assets(folder)
    torch.manual_seed(0)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if stage in VLM_STAGES:
        options = replace(options, packing="none")  # not implemented for these model classes
    if system == "ours":
        return run_ours(assets, config, stage, warmup, steps, options)
    if stage in VLM_STAGES:
        from llava.bench.trl_baseline import run_trl

        return run_trl(assets, config, stage, warmup, steps)
    return run_baseline(assets, config, stage, warmup, steps)
