"""DPO benchmark: this project's DPOTrainer against TRL's DPOTrainer, pairs/s and peak memory.

TRL cannot open the composed LLaVA model, so the two run on the part both can: the language
model, on text-only pairs. Ours trains the composed model (tower and projector frozen; its
forward runs one blank image per step to keep the image path in the graph, as every text-only
batch does), TRL the same Llama weights as a LlamaForCausalLM. Both: full fine-tuning of the
language model, sigmoid loss, beta 0.1, a frozen copy as the reference, the same pairs, batch,
optimizer and schedule. TRL is given the prompt as our v1 template renders it, so both score
the same tokens (its tokenizer is word-level: no merges across the prompt's end).

With `--model vlm` the two train the same transformers image-text-to-text model instead: a
llava-hf LlavaForConditionalGeneration at the config's CLIP and Llama shapes, with its
LlavaProcessor and a LLaVA-1.5-style chat template, saved once and opened by both (ours as the
image-text-to-text kind, llava/train/dpo_vlm.py). Pairs have one image each; both render them
with the processor's template and score the same tokens (the answer and </s>). Both: full
fine-tuning of the language model with the tower and projector frozen, a frozen reference.

Each system runs in a subprocess of its own, so each peak resident set (CPU) or peak allocated
memory (CUDA) is its own. Run: `python -m llava.bench.dpo_bench --config small [--model vlm]`.
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
from typing import Any

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
from llava.bench.synthetic import (
    NUM_SOURCE_IMAGES,
    PROMPT_TOKENS,
    TURN_TOKENS,
    TextSampler,
    build_tokenizer,
    write_images,
)
from llava.bench.vlm_models import RENDER_CONTENT, Family, text_config
from llava.bench.vlm_models import build_tokenizer as build_family_tokenizer
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

    model = build_llava_model(assets.llm, assets.clip, torch_dtype=getattr(torch, config.dtype)).to(
        config.device
    )
    tokenizer = load_tokenizer(assets.llm, config.model_max_length)

    def pair_data(part: str):
        data_args = argparse.Namespace(data_path=assets.path(f"dpo-{part}.json"), image_folder=None)
        return build_preference_data(
            tokenizer, model.vision_tower.image_processor, model.num_image_tokens, data_args, "v1",
            config.model_max_length,
        )  # fmt: skip

    return ours_trainer_maker(model, assets.llm, tokenizer, pair_data, config, output_dir)


def ours_trainer_maker(model, model_path: str, processing_class, pair_data, config, output_dir):
    """(make_trainer, meter) for our DPOTrainer: full fine-tuning of the language model with the
    tower and projector frozen, a frozen copy as the reference; `pair_data(part)` gives the
    part's (dataset, collator), which must keep every pair."""
    from llava.train.dpo import DPOTrainer, parse_dpo_arguments
    from llava.train.stages import apply_stage, plan_stage

    reference = copy.deepcopy(model).requires_grad_(False).eval()
    plan = plan_stage(freeze_mm_mlp_adapter=True)
    apply_stage(model, plan)
    settings = trainer_settings(config, "finetune", output_dir)
    settings.update(learning_rate=LEARNING_RATE, beta=BETA, dataloader_num_workers=0)
    flags = ["--model_name_or_path", model_path, *(f"--{k}={v}" for k, v in settings.items())]
    meter = ThroughputMeter(None, None)

    def make_trainer(part: str, steps: int, callbacks: list):
        meter.start()
        dataset, collator = pair_data(part)
        if len(dataset) != steps * config.batch_size:
            raise RuntimeError(f"pairs were dropped: {dataset.summary.line()}")
        _, _, args, dpo = parse_dpo_arguments([*flags, f"--max_steps={steps}"])
        return DPOTrainer(
            model=model,
            args=args,
            stage_plan=plan,
            dpo=dpo,
            reference_model=reference,
            train_dataset=dataset,
            data_collator=CountingCollator(collator, meter),
            processing_class=processing_class,
            callbacks=callbacks,
        )

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
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(assets.llm, dtype=getattr(torch, config.dtype))
    tokenizer = AutoTokenizer.from_pretrained(assets.llm)
    settings = trainer_settings(config, "finetune", output_dir)
    settings["learning_rate"] = LEARNING_RATE
    return trl_trainer_maker(
        model,
        tokenizer,
        settings,
        lambda part: trl_rows(assets.path(f"dpo-{part}.json"), tokenizer),
    )


def trl_trainer_maker(model, processing_class, settings: dict, rows_of):
    """(make_trainer, meter) for TRL's DPOTrainer: sigmoid loss, beta BETA, no truncation;
    `rows_of(part)` gives the part's rows (a dict of columns or a list of rows)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    meter = ThroughputMeter(None, None)

    def make_trainer(part: str, steps: int, callbacks: list):
        meter.start()
        rows = rows_of(part)
        args = DPOConfig(
            max_steps=steps, beta=BETA, loss_type=["sigmoid"], max_length=None,
            dataloader_num_workers=0, **settings,
        )  # fmt: skip
        trainer = DPOTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_dict(rows)
            if isinstance(rows, dict)
            else Dataset.from_list(rows),
            processing_class=processing_class,
            callbacks=callbacks,
        )
        trainer.data_collator = CountingCollator(trainer.data_collator, meter)
        return trainer

    return make_trainer, meter


# -- the image-text-to-text row (--model vlm) ------------------------------------------------------
LLAVA_TEMPLATE = RENDER_CONTENT + (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ 'USER: ' + render_content(message['content'], '<image>\\n') + ' ' }}"
    "{%- else -%}"
    "{{ 'ASSISTANT:' }}"
    "{%- generation -%}"
    "{{ ' ' + render_content(message['content'], '') + '</s>' }}"
    "{%- endgeneration -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)


def build_hf_llava(config: BenchConfig, tokenizer: Any) -> tuple[Any, Any]:
    """LlavaForConditionalGeneration (CLIP + Llama at the config's shapes) and its processor."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    model_config = LlavaConfig(
        vision_config=clip_config(config),
        text_config=text_config(config, tokenizer, model_type="llama"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    processor = LlavaProcessor(
        image_processor=clip_processor(config),
        tokenizer=tokenizer,
        patch_size=config.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    )
    return LlavaForConditionalGeneration(model_config), processor


HF_LLAVA = Family(
    named=dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"),
    unknown="<unk>",
    special=("<image>",),
    words="USER ASSISTANT :",
    chat_template=LLAVA_TEMPLATE,
    build=build_hf_llava,
    max_image_tokens=lambda config: config.num_image_tokens,
)


def write_vlm_assets(folder: str, config: BenchConfig, warmup: int, steps: int) -> Assets:
    """The llava-hf folder, the JPEGs, and one-image pairs that fit model_max_length."""
    assets = Assets(folder)
    tokenizer = build_family_tokenizer(HF_LLAVA, config.vocab_size)
    torch.manual_seed(0)
    with construction(config):
        model, processor = build_hf_llava(config, tokenizer)
    model.save_pretrained(assets.hf_llava)
    processor.save_pretrained(assets.hf_llava)
    write_images(assets.images, config, seed=0)
    room = config.model_max_length - config.num_image_tokens - TURN_TOKENS
    for part, count, seed in (("warmup", warmup, 10), ("measure", steps, 20)):
        sampler = TextSampler(config.vocab_size, seed)
        rows = []
        for index in range(count * config.batch_size):
            question = sampler.words(sampler.rng.randint(room // 8, room // 4))
            rows.append(
                {
                    "id": f"pair{index}",
                    "image": f"{index % NUM_SOURCE_IMAGES:03d}.jpg",
                    "conversations": [{"from": "human", "value": f"<image>\n{question}"}],
                    "chosen": sampler.words(sampler.rng.randint(room // 16, room // 2)),
                    "rejected": sampler.words(sampler.rng.randint(room // 16, room // 2)),
                }
            )
        with open(assets.path(f"dpo-vlm-{part}.json"), "w") as f:
            json.dump(rows, f)
    return assets


def build_ours_vlm(assets: Assets, config: BenchConfig, output_dir: str):
    from llava.data.processor_preference import build_processor_preference_data
    from llava.model.builder import load_image_text_to_text
    from llava.train.train import processor_tokenizer

    model, processor = load_image_text_to_text(assets.hf_llava, getattr(torch, config.dtype))
    model.to(config.device)
    processor_tokenizer(processor, config.model_max_length)

    def pair_data(part: str):
        data_args = argparse.Namespace(
            data_path=assets.path(f"dpo-vlm-{part}.json"), image_folder=assets.images
        )
        return build_processor_preference_data(
            processor, data_args, "auto", config.model_max_length
        )

    return ours_trainer_maker(model, assets.hf_llava, processor, pair_data, config, output_dir)


def trl_vlm_rows(path: str, image_folder: str) -> list[dict[str, Any]]:
    """Our pairs as TRL's conversational vision layout: the prompt's messages with an image
    part, each answer as an assistant message, the image (decoded) beside them."""
    from PIL import Image

    with open(path) as f:
        records = json.load(f)
    rows = []
    for record in records:
        question = record["conversations"][0]["value"].removeprefix("<image>\n")
        content = [{"type": "image"}, {"type": "text", "text": question}]
        image = Image.open(os.path.join(image_folder, record["image"])).convert("RGB")
        rows.append(
            {
                "images": [image],
                "prompt": [{"role": "user", "content": content}],
                "chosen": [{"role": "assistant", "content": record["chosen"]}],
                "rejected": [{"role": "assistant", "content": record["rejected"]}],
            }
        )
    return rows


def build_trl_vlm(assets: Assets, config: BenchConfig, output_dir: str):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from llava.model.kinds import CONNECTOR, VISION, parts_by_role

    dtype = getattr(torch, config.dtype)
    model = LlavaForConditionalGeneration.from_pretrained(assets.hf_llava, dtype=dtype)
    parts = parts_by_role(model)
    parts[VISION].requires_grad_(False)
    parts[CONNECTOR].requires_grad_(False)
    processor = AutoProcessor.from_pretrained(assets.hf_llava)
    settings = trainer_settings(config, "finetune", output_dir)
    settings["learning_rate"] = LEARNING_RATE
    return trl_trainer_maker(
        model,
        processor,
        settings,
        lambda part: trl_vlm_rows(assets.path(f"dpo-vlm-{part}.json"), assets.images),
    )


BUILDERS = {
    ("lm", "ours"): build_ours,
    ("lm", "trl"): build_trl,
    ("vlm", "ours"): build_ours_vlm,
    ("vlm", "trl"): build_trl_vlm,
}


def run_system(
    system: str, folder: str, config: BenchConfig, warmup: int, steps: int, model: str = "lm"
) -> dict:
    assets = Assets(folder)
    build = BUILDERS[model, system]
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


def run_in_subprocess(system: str, folder: str, args: argparse.Namespace, config) -> dict:
    """One system's result, measured in a process of its own (its own peak memory)."""
    command = [sys.executable, "-m", "llava.bench.dpo_bench", "--system", system]
    command += ["--assets", folder, "--config", args.config, "--device", config.device]
    command += ["--warmup", str(args.warmup), "--steps", str(args.steps), "--model", args.model]
    output = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    lines = [line for line in output.stdout.splitlines() if line.startswith("RESULT ")]
    if output.returncode != 0 or not lines:
        raise RuntimeError(f"{system} failed:\n{output.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="small", choices=sorted(CONFIGS))
    parser.add_argument("--device", default=None, help="cpu or cuda (default: the config's)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument(
        "--model",
        default="lm",
        choices=("lm", "vlm"),
        help="lm: the language model on text pairs; vlm: a llava-hf VLM on image pairs",
    )
    parser.add_argument("--system", choices=("ours", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--assets", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    config = CONFIGS[args.config]
    if args.device:
        config = replace(config, device=args.device)
    if args.system:  # one system, in its own process
        result = run_system(args.system, args.assets, config, args.warmup, args.steps, args.model)
        print("RESULT " + json.dumps(result))
        return
    with tempfile.TemporaryDirectory(prefix="dpo-bench-") as folder:
        writer = write_vlm_assets if args.model == "vlm" else write_assets
        writer(folder, config, args.warmup, args.steps)
        ours, trl = (run_in_subprocess(system, folder, args, config) for system in ("ours", "trl"))
    print(
        f"DPO ({args.model}), config {config.name}, batch {config.batch_size} pairs, "
        f"{args.steps} steps"
    )
    for row in (ours, trl):
        print(json.dumps(row))
    print(
        f"speed-up {ours['pairs_per_second'] / trl['pairs_per_second']:.2f}x pairs/s, "
        f"peak memory {ours['peak_memory_mib']} MiB vs {trl['peak_memory_mib']} MiB (TRL)"
    )


if __name__ == "__main__":
    main()
