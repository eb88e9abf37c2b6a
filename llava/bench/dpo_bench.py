"""DPO benchmark: this project's DPOTrainer against TRL's DPOTrainer, pairs/s and peak memory.

TRL cannot open the composed LLaVA model, so the two run on the part both can: the language
model, on text-only pairs. Ours trains the composed model (tower and projector frozen; its
forward runs one blank image per step to keep the image path in the graph, as every text-only
batch does), TRL the same Llama weights as a LlamaForCausalLM. Both: full fine-tuning of the
language model, sigmoid loss, beta 0.1, a frozen copy as the reference, the same pairs, batch,
optimizer and schedule. TRL is given the prompt as our v1 template renders it, so both score
the same tokens (its tokenizer is word-level: no merges across the prompt's end).

Each system runs in a subprocess of its own, so each peak resident set (CPU) or peak allocated
memory (CUDA) is its own. Run: `python -m llava.bench.dpo_bench --config small`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import replace

import torch

from llava.bench.assets import (
    Assets,
    clip_config,
    clip_processor,
    construction,
    llama_config,
)
from llava.bench.configs import CONFIGS, BenchConfig
from llava.bench.runs import CountingCollator, timed_train, trainer_settings
from llava.bench.synthetic import PROMPT_TOKENS, TURN_TOKENS, TextSampler, build_tokenizer
from llava.compat import save_tokenizer
from llava.conversation import USER, Turn
from llava.data.tokenize import ConversationTokenizer
from llava.train.throughput import ThroughputMeter

BETA = 0.1
LEARNING_RATE = 5e-7


def write_pairs(path: str, count: int, config: BenchConfig, seed: int) -> None:
    """`count` text pairs that fit model_max_length after the v1 system prompt: a question of
    up to a quarter of the room, answers of up to half of it (LLaVA-NeXT DPO's are sentences
    to paragraphs)."""
    sampler = TextSampler(config.vocab_size, seed)
    room = config.model_max_length - PROMPT_TOKENS - TURN_TOKENS
    rows = []
    for index in range(count):
        question = sampler.words(sampler.rng.randint(room // 8, room // 4))
        rows.append(
            {
                "id": f"pair{index}",
                "conversations": [{"from": "human", "value": question}],
                "chosen": sampler.words(sampler.rng.randint(room // 16, room // 2)),
                "rejected": sampler.words(sampler.rng.randint(room // 16, room // 2)),
            }
        )
    with open(path, "w") as f:
        json.dump(rows, f)


def write_assets(folder: str, config: BenchConfig, warmup: int, steps: int) -> Assets:
    from transformers import CLIPVisionModel, LlamaForCausalLM

    assets = Assets(folder)
    torch.manual_seed(0)
    with construction(config):
        llm, tower = LlamaForCausalLM(llama_config(config)), CLIPVisionModel(clip_config(config))
    llm.save_pretrained(assets.llm)
    save_tokenizer(build_tokenizer(config.vocab_size), assets.llm)
    tower.save_pretrained(assets.clip)
    clip_processor(config).save_pretrained(assets.clip)
    for part, count, seed in (("warmup", warmup, 10), ("measure", steps, 20)):
        write_pairs(assets.path(f"dpo-{part}.json"), count * config.batch_size, config, seed)
    return assets


# -- the two systems -------------------------------------------------------------------------------
def build_ours(assets: Assets, config: BenchConfig, output_dir: str):
    from llava.data.preference import build_preference_data
    from llava.model.builder import build_llava_model, load_tokenizer
    from llava.train.dpo import DPOTrainer, parse_dpo_arguments
    from llava.train.stages import apply_stage, plan_stage

    model = build_llava_model(assets.llm, assets.clip, torch_dtype=getattr(torch, config.dtype)).to(
        config.device
    )
    reference = copy.deepcopy(model).requires_grad_(False).eval()
    plan = plan_stage(freeze_mm_mlp_adapter=True)
    apply_stage(model, plan)
    tokenizer = load_tokenizer(assets.llm, config.model_max_length)
    settings = trainer_settings(config, "finetune", output_dir)
    settings.update(learning_rate=LEARNING_RATE, beta=BETA, dataloader_num_workers=0)
    flags = ["--model_name_or_path", assets.llm, *(f"--{k}={v}" for k, v in settings.items())]
    meter = ThroughputMeter(None, None)

    def make_trainer(part: str, steps: int, callbacks: list):
        meter.start()
        data_args = argparse.Namespace(data_path=assets.path(f"dpo-{part}.json"), image_folder=None)
        dataset, collator = build_preference_data(
            tokenizer, model.vision_tower.image_processor, model.num_image_tokens, data_args, "v1",
            config.model_max_length,
        )  # fmt: skip
        if len(dataset) != steps * config.batch_size:
            raise RuntimeError(f"pairs were dropped: {dataset.summary.line()}")
        _, _, args, dpo = parse_dpo_arguments([*flags, f"--max_steps={steps}"])
        trainer = DPOTrainer(
            model=model,
            args=args,
            stage_plan=plan,
            dpo=dpo,
            reference_model=reference,
            train_dataset=dataset,
            data_collator=CountingCollator(collator, meter),
            processing_class=tokenizer,
            callbacks=callbacks,
        )
        return trainer

    return make_trainer, meter


def trl_rows(path: str, tokenizer) -> dict[str, list[str]]:
    """Our pairs with the prompt as the v1 template renders it, the answers as TRL appends them."""
    renderer = ConversationTokenizer(tokenizer, "v1", 0)
    with open(path) as f:
        records = json.load(f)
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for record in records:
        turns = [Turn(USER, record["conversations"][0]["value"])]
        segments = renderer.render(turns, add_generation_prompt=True)
        rows["prompt"].append("".join(segment.text for segment in segments))
        rows["chosen"].append(" " + record["chosen"])
        rows["rejected"].append(" " + record["rejected"])
    return rows


def build_trl(assets: Assets, config: BenchConfig, output_dir: str):
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer

    model = LlamaForCausalLM.from_pretrained(assets.llm, dtype=getattr(torch, config.dtype))
    tokenizer = AutoTokenizer.from_pretrained(assets.llm)
    settings = trainer_settings(config, "finetune", output_dir)
    settings["learning_rate"] = LEARNING_RATE
    meter = ThroughputMeter(None, None)

    def make_trainer(part: str, steps: int, callbacks: list):
        meter.start()
        rows = trl_rows(assets.path(f"dpo-{part}.json"), tokenizer)
        args = DPOConfig(
            max_steps=steps, beta=BETA, loss_type=["sigmoid"], max_length=None,
            dataloader_num_workers=0, **settings,
        )  # fmt: skip
        trainer = DPOTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_dict(rows),
            processing_class=tokenizer,
            callbacks=callbacks,
        )
        trainer.data_collator = CountingCollator(trainer.data_collator, meter)
        return trainer

    return make_trainer, meter


def run_system(system: str, folder: str, config: BenchConfig, warmup: int, steps: int) -> dict:
    assets = Assets(folder)
    build = build_ours if system == "ours" else build_trl
    make_trainer, meter = build(assets, config, tempfile.mkdtemp(prefix=f"dpo-bench-{system}-"))
    _, seconds, peak, loss = timed_train(make_trainer, warmup, steps, config.device)
    totals = meter.totals()
    pairs = steps * config.batch_size
    return {
        "system": system,
        "pairs_per_second": round(pairs / seconds, 3),
        "tokens_per_second": round(totals["tokens"] / seconds, 1),
        "peak_memory_mib": round(peak / 2**20, 1),
        "mean_loss": round(loss, 5),
        "seconds": round(seconds, 2),
        "tokens": totals["tokens"],
        "device": config.device,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="small", choices=sorted(CONFIGS))
    parser.add_argument("--device", default=None, help="cpu or cuda (default: the config's)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--system", choices=("ours", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--assets", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    config = CONFIGS[args.config]
    if args.device:
        config = replace(config, device=args.device)
    if args.system:  # one system, in its own process
        result = run_system(args.system, args.assets, config, args.warmup, args.steps)
        print("RESULT " + json.dumps(result))
        return
    folder = tempfile.mkdtemp(prefix="dpo-bench-")
    write_assets(folder, config, args.warmup, args.steps)
    results = {}
    for system in ("ours", "trl"):
        command = [sys.executable, "-m", "llava.bench.dpo_bench", "--system", system]
        command += ["--assets", folder, "--config", args.config, "--device", config.device]
        command += ["--warmup", str(args.warmup), "--steps", str(args.steps)]
        output = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
        lines = [line for line in output.stdout.splitlines() if line.startswith("RESULT ")]
        if output.returncode != 0 or not lines:
            raise RuntimeError(f"{system} failed:\n{output.stderr[-4000:]}")
        results[system] = json.loads(lines[-1][len("RESULT ") :])
    ours, trl = results["ours"], results["trl"]
    print(f"DPO, config {config.name}, batch {config.batch_size} pairs, {args.steps} steps")
    for row in (ours, trl):
        print(json.dumps(row))
    print(
        f"speed-up {ours['pairs_per_second'] / trl['pairs_per_second']:.2f}x pairs/s, "
        f"peak memory {ours['peak_memory_mib']} MiB vs {trl['peak_memory_mib']} MiB (TRL)"
    )


if __name__ == "__main__":
    main()
