"""LLaVA-1.5's training entry, as its scripts launch it (`deepspeed llava/train/train_mem.py ...`):
llava/train/train.py's main, with flash attention where it can run.

The original forced flash_attention_2. Here an explicit --attn_implementation stands; without one,
flash_attention_2 is chosen when the flash_attn package is installed and CUDA is available, and
otherwise the project's default (sdpa) stays. The choice is logged.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys

import torch

from llava.train.train import main

logger = logging.getLogger("llava.train")

FLASH_ATTENTION = "flash_attention_2"
ATTENTION_FLAG = "--attn_implementation"


def flash_attention_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def with_attention_choice(argv: list[str], flash_available: bool) -> tuple[list[str], str]:
    """(the arguments, with --attn_implementation flash_attention_2 added where it is not given
    and flash attention can run; a line saying what was chosen and why)."""
    if any(arg == ATTENTION_FLAG or arg.startswith(ATTENTION_FLAG + "=") for arg in argv):
        return argv, f"attention: as {ATTENTION_FLAG} says"
    if flash_available:
        return [*argv, ATTENTION_FLAG, FLASH_ATTENTION], (
            f"attention: {FLASH_ATTENTION} (flash_attn is installed and CUDA is available)"
        )
    return argv, (
        f"attention: the default (sdpa), not {FLASH_ATTENTION}: "
        + (
            "CUDA is not available"
            if not torch.cuda.is_available()
            else "flash_attn is not installed"
        )
    )


def main_with_flash_attention(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    argv, choice = with_attention_choice(argv, flash_attention_available())
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s: %(message)s", stream=sys.stdout)
    if os.environ.get("RANK", "0") == "0":
        logger.warning("train_mem: %s", choice)
    main(argv)


if __name__ == "__main__":
    main_with_flash_attention()
