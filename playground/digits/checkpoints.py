"""Build the demo's starting checkpoints from configs: a random CLIP, a random Llama, a tokenizer.

    python -m playground.digits.checkpoints --out playground/demo [--image-size 32]
        [--vision-width 64] [--vision-layers 2] [--text-width 256] [--text-layers 2]

Writes, in the layouts real checkpoints have, so training loads them as it would
openai/clip-vit-large-patch14-336 and lmsys/vicuna-7b-v1.5:
    OUT/clip/         a CLIPModel (vision + text) with preprocessor_config.json
    OUT/llama/        a LlamaForCausalLM with its sentencepiece tokenizer
Nothing is downloaded: the weights are random, the tokenizer is trained here on the demo's text.
"""

from __future__ import annotations

import argparse
import io
import os

import torch
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
)

from llava import compat
from llava.conversation import TEMPLATES
from playground.digits.data import demo_sentences

TOKENIZER_VOCAB_SIZE = 512  # 256 byte-fallback pieces, the demo's words and their parts
PATCH_SIZE = 8


def tokenizer_corpus() -> list[str]:
    """The dataset's text and the v1 chat template's words (system prompt, USER, ASSISTANT)."""
    return demo_sentences() + [TEMPLATES["v1"].system, "USER: ASSISTANT:"]


def train_sentencepiece(
    lines: list[str], vocab_size: int = TOKENIZER_VOCAB_SIZE, **options: object
) -> bytes:
    """A Llama-style sentencepiece BPE model (byte fallback, split digits), serialized.

    `options` are further sentencepiece trainer settings (the test tokenizers use one).
    """
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # small corpus: take the pieces it has
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
        **options,
    )
    return model.getvalue()


def save_tokenizer(folder: str) -> PreTrainedTokenizerBase:
    """tokenizer.model plus the fast tokenizer.json, as Llama checkpoints ship them."""
    return save_sentencepiece_tokenizer(folder, train_sentencepiece(tokenizer_corpus()), False)


def save_sentencepiece_tokenizer(
    folder: str, model: bytes, legacy: bool, chat_template: str | None = None
) -> PreTrainedTokenizerBase:
    """A serialized sentencepiece model saved as a Llama tokenizer folder (tokenizer.model,
    tokenizer.json, tokenizer_config.json with `legacy`), loadable by either transformers line."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
        f.write(model)
    tokenizer = compat.sentencepiece_llama_tokenizer(folder, legacy, chat_template=chat_template)
    compat.save_tokenizer(tokenizer, folder)
    return tokenizer


def save_clip(folder: str, image_size: int, width: int, layers: int, seed: int = 0) -> None:
    """A random CLIPModel: image_size / 8 squared patch tokens of `width` features."""
    torch.manual_seed(seed)
    vision = dict(
        image_size=image_size,
        patch_size=PATCH_SIZE,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=max(1, width // 32),
    )
    text = dict(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
    )
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    ).save_pretrained(folder)


def save_llama(
    folder: str, tokenizer: PreTrainedTokenizerBase, width: int, layers: int, seed: int = 0
) -> None:
    """A random LlamaForCausalLM sized to the tokenizer (saved in the same folder).

    Weights start at std 1/sqrt(width) rather than Llama's 0.02 (chosen for widths near 4096):
    LoRA never trains lm_head or the final norm, and at 0.02 a width-256 model's logits cannot
    grow far enough apart to make one answer likely.
    """
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=max(1, width // 64),
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=width**-0.5,
    )
    LlamaForCausalLM(config).save_pretrained(folder)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for clip/ and llama/ (created)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--vision-width", type=int, default=64)
    parser.add_argument("--vision-layers", type=int, default=2)
    parser.add_argument("--text-width", type=int, default=256)
    parser.add_argument("--text-layers", type=int, default=2)
    args = parser.parse_args(argv)
    clip, llama = os.path.join(args.out, "clip"), os.path.join(args.out, "llama")
    save_clip(clip, args.image_size, args.vision_width, args.vision_layers)
    tokenizer = save_tokenizer(llama)
    save_llama(llama, tokenizer, args.text_width, args.text_layers)
    print(f"vision tower: {clip}\nlanguage model: {llama} (vocabulary {len(tokenizer)})")


if __name__ == "__main__":
    main()
