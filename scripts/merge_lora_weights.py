"""Merge a LoRA checkpoint into its base: writes a full model folder that loads on its own.

    python scripts/merge_lora_weights.py --model-path LORA_DIR --model-base BASE \
        --save-model-path OUT_DIR

BASE is the language model of a composed LLaVA run, or the vision-language model folder of a
transformers image-text-to-text run (Qwen2-VL, Idefics3, ...): that one's merged folder is the
model's own class and processor, which plain AutoModelForImageTextToText / AutoProcessor load.
"""

from __future__ import annotations

import argparse
import os

from llava.compat import save_tokenizer
from llava.model.builder import checkpoint_kind, load_pretrained_model


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", required=True, help="LoRA checkpoint folder")
    parser.add_argument(
        "--model-base", required=True, help="The language model (or VLM folder) it was trained on"
    )
    parser.add_argument("--save-model-path", required=True, help="Where the merged model goes")
    parser.add_argument("--vision-tower", default=None, help="New location of the vision tower")
    return parser.parse_args(argv)


def merge(model_path: str, model_base: str, save_model_path: str, vision_tower: str | None = None):
    if checkpoint_kind(model_path) != "lora":
        raise ValueError(f"{model_path!r} is not a LoRA checkpoint (no adapter_config.json)")
    if os.path.exists(save_model_path) and os.listdir(save_model_path):
        raise FileExistsError(f"{save_model_path!r} exists and is not empty; nothing was written")
    loaded = load_pretrained_model(model_path, model_base, vision_tower=vision_tower)
    loaded.model.save_pretrained(save_model_path)
    if loaded.processor is not None:  # tokenizer, image processor and chat template
        loaded.processor.save_pretrained(save_model_path)
    else:
        save_tokenizer(loaded.tokenizer, save_model_path)


def main(argv: list[str] | None = None) -> None:
    args = parse_arguments(argv)
    merge(args.model_path, args.model_base, args.save_model_path, args.vision_tower)


if __name__ == "__main__":
    main()
