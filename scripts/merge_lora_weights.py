"""Merge a LoRA checkpoint into its base: writes a full model folder that loads on its own.

    python scripts/merge_lora_weights.py --model-path LORA_DIR --model-base BASE_LLM \
        --save-model-path OUT_DIR
"""

from __future__ import annotations

import argparse
import os

from llava.compat import save_tokenizer
from llava.model.builder import checkpoint_kind, load_pretrained_model


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", required=True, help="LoRA checkpoint folder")
    parser.add_argument("--model-base", required=True, help="The language model it was trained on")
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
    save_tokenizer(loaded.tokenizer, save_model_path)


def main(argv: list[str] | None = None) -> None:
    args = parse_arguments(argv)
    merge(args.model_path, args.model_base, args.save_model_path, args.vision_tower)


if __name__ == "__main__":
    main()
