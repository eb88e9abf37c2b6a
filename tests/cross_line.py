"""Checkpoints written under one transformers line, read under the other (tests/test_cross_line.py).

    python -m tests.cross_line write DIR   # every artifact kind, with the outputs it gives here
    python -m tests.cross_line read DIR    # load each one here; compare with those outputs

`write` saves, with this interpreter's transformers: a base Llama (rope_theta 5e5, which
4.55 and 5.x store under different keys) with its tokenizer, a CLIP tower, the test
tokenizers of every family, and from them a full model, a stage-1 projector, a LoRA output
(with a trained tower) and a transformers Llava export. Beside them goes `reference.pt`: the logits each artifact
gives as loaded back on the writing line, the conversation ids and labels of each
tokenizer, and the export's processor ids. `read` loads everything on its own line and exits
non-zero naming each artifact whose outputs differ.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch
import transformers
from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

from llava.compat import make_config_portable, save_tokenizer, transformers_line
from llava.conversation import Turn
from llava.data.tokenize import ConversationTokenizer
from llava.export_hf import export
from llava.model.builder import build_llava_model, load_pretrained_model
from tests.fixtures.checkpoints import (
    logits_of,
    perturb,
    prompt_inputs,
    write_lora_checkpoint,
    write_projector_checkpoint,
)
from tests.fixtures.models import TEXT_SIZES, TINY_IMAGE_SIZE, save_tiny_clip
from tests.fixtures.tokenizers import (
    save_byte_level_bpe_tokenizer,
    save_sentencepiece_llama_tokenizer,
)

REFERENCE_FILE = "reference.pt"
TOLERANCE = 1e-5
# Tokenizer families and the template each is trained with.
TOKENIZERS = {
    "sp": ("v1", lambda folder: save_sentencepiece_llama_tokenizer(folder, legacy=False)),
    "sp_legacy": ("v1", lambda folder: save_sentencepiece_llama_tokenizer(folder, legacy=True)),
    "bpe_qwen2": ("chatml", lambda folder: save_byte_level_bpe_tokenizer(folder, "qwen2")),
    "bpe_llama3": ("llama_3", lambda folder: save_byte_level_bpe_tokenizer(folder, "llama3")),
}
TURNS = [
    Turn("user", "<image>\nWhat is in the picture?"),
    Turn("assistant", "A cat sitting on a red mat."),
    Turn("user", "What colour is the mat?"),
    Turn("assistant", "The mat is red {really}, 42 of them.\nYes!"),
]
EXPORT_TEXT = "USER: <image>\nWhat is it? ASSISTANT:"


def save_base_llm(folder: str) -> str:
    """A tiny Llama with a non-default rope_theta and its tokenizer, in the 4.x config layout
    hub checkpoints have (both lines read it)."""
    torch.manual_seed(4)
    config = transformers.LlamaConfig(**TEXT_SIZES, rope_theta=500000.0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    make_config_portable(folder)
    save_sentencepiece_llama_tokenizer(folder, legacy=False)
    return folder


def conversation_encodings(root: str) -> dict[str, list[list[int]]]:
    encodings = {}
    for name, (template, _) in TOKENIZERS.items():
        tokenizer = AutoTokenizer.from_pretrained(os.path.join(root, "tokenizers", name))
        encoded = ConversationTokenizer(tokenizer, template, 3).encode(TURNS)
        encodings[name] = [encoded.input_ids, encoded.labels]
    return encodings


def export_outputs(folder: str) -> tuple[list[int], torch.Tensor]:
    """(processor ids, logits) of the exported Llava on one image and prompt."""
    processor = AutoProcessor.from_pretrained(folder)
    model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    image = (np.arange(TINY_IMAGE_SIZE * TINY_IMAGE_SIZE * 3) % 251).astype(np.uint8)
    image = image.reshape(TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3)
    batch = processor(images=image, text=EXPORT_TEXT, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    return batch["input_ids"][0].tolist(), logits


def outputs(root: str) -> dict:
    """Every artifact under `root`, loaded on this line, and what it gives."""
    base = os.path.join(root, "base")
    result = {"tokenizers": conversation_encodings(root)}
    for kind in ("full", "projector", "lora"):
        model = load_pretrained_model(os.path.join(root, kind), model_base=base).model
        result[kind] = logits_of(model, prompt_inputs(model))
    result["export_ids"], result["export"] = export_outputs(os.path.join(root, "export"))
    return result


def write(root: str) -> None:
    base, clip = save_base_llm(os.path.join(root, "base")), os.path.join(root, "clip")
    save_tiny_clip(clip)
    for name, (_, save) in TOKENIZERS.items():
        source = save(os.path.join(root, "sources", name))
        save_tokenizer(
            AutoTokenizer.from_pretrained(source), os.path.join(root, "tokenizers", name)
        )
    model = build_llava_model(base, clip).eval()
    perturb(model.projector, 1)
    model.save_pretrained(os.path.join(root, "full"))
    write_projector_checkpoint(base, clip, os.path.join(root, "projector"))
    write_lora_checkpoint(base, clip, os.path.join(root, "lora"), tune_vision_tower=True)
    export(os.path.join(root, "full"), os.path.join(root, "export"), model_base=base)
    reference = outputs(root)
    reference["line"] = transformers_line()
    torch.save(reference, os.path.join(root, REFERENCE_FILE))


def differences(reference: dict, here: dict) -> list[str]:
    """What differs between the writing line's outputs and this line's, one line each."""
    found = []
    for name, encoding in reference["tokenizers"].items():
        if here["tokenizers"][name] != encoding:
            found.append(f"tokenizer {name}: conversation ids or labels differ")
    if here["export_ids"] != reference["export_ids"]:
        found.append("export: the processor's input ids differ")
    for kind in ("full", "projector", "lora", "export"):
        theirs, ours = reference[kind], here[kind]
        if theirs.shape != ours.shape or not torch.allclose(theirs, ours, atol=TOLERANCE):
            gap = (theirs - ours).abs().max().item() if theirs.shape == ours.shape else "shape"
            found.append(f"{kind}: logits differ (max gap {gap})")
    return found


def read(root: str) -> int:
    reference = torch.load(os.path.join(root, REFERENCE_FILE), weights_only=False)
    found = differences(reference, outputs(root))
    summary = {"written": reference["line"], "read": transformers_line(), "differences": found}
    print("RESULT " + json.dumps(summary), flush=True)
    return 1 if found else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["write", "read"])
    parser.add_argument("folder")
    args = parser.parse_args(argv)
    if args.action == "write":
        write(args.folder)
        return 0
    return read(args.folder)


if __name__ == "__main__":
    sys.exit(main())
