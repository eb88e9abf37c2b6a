"""Chat about an image in the terminal, with the answer streamed token by token.

    python -m llava.serve.cli --model-path P [--model-base B] --image-file IMG \
        [--conv-mode v1] [--temperature 0.2] [--max-new-tokens 512]

A transformers image-text-to-text model (plain, fine-tuned, or LoRA over --model-base) chats
through its own processor and chat template; one whose processor takes a bare prompt
(PaliGemma's) is asked each question alone about the image, without the history. An empty line
(or end of input) ends the chat.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from transformers import TextStreamer

from llava.conversation import ASSISTANT, USER, Turn
from llava.inference import Answerer, answerer_for, sampling_kwargs, with_image_tag
from llava.model.builder import add_loading_flags, load_from_flags

ONE_QUESTION_NOTE = (
    "{name} takes one question per prompt (no chat template): each question is asked alone "
    "about the image, without the earlier ones and their answers."
)


def chat(
    answerer: Answerer,
    image_file: str,
    generate_kwargs: dict[str, Any],
    read: Callable[[str], str] = input,
    write: Callable[..., None] = print,
) -> list[Turn]:
    """The chat loop: the image goes with the first question; history grows turn by turn.

    A model that takes one question per prompt gets each question alone with the image (said
    once, at the start); the turns returned are then those of the last question."""
    turns: list[Turn] = []
    streamer = TextStreamer(answerer.tokenizer, skip_prompt=True, skip_special_tokens=True)
    if answerer.one_question_per_prompt:
        write(ONE_QUESTION_NOTE.format(name=type(answerer.model).__name__))
    while True:
        try:
            question = read(f"{USER.upper()}: ")
        except EOFError:
            question = ""
        if not question.strip():
            return turns
        if answerer.one_question_per_prompt:
            turns = []
        text = question if turns else with_image_tag(question, 1)
        turns.append(Turn(USER, text))
        write(f"{ASSISTANT.upper()}: ", end="", flush=True)
        prompt = answerer.prompt(turns, [image_file])
        answer = answerer.generate([prompt], streamer=streamer, **generate_kwargs)[0]
        turns.append(Turn(ASSISTANT, answer))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_loading_flags(parser)
    parser.add_argument("--image-file", required=True)
    parser.add_argument(
        "--conv-mode",
        default=None,
        help="chat template; default: v1, or the model's own where it has a processor",
    )
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    args = parser.parse_args(argv)
    if not os.path.isfile(args.image_file):
        sys.exit(f"--image-file {args.image_file!r} does not exist")
    loaded = load_from_flags(args)
    chat(
        answerer_for(loaded, args.conv_mode),
        args.image_file,
        sampling_kwargs(args.temperature, None, 1, args.max_new_tokens),
    )


if __name__ == "__main__":
    main()
