"""Answer a question file with a model: questions jsonl in, answers jsonl out (resumable).

    python -m llava.eval.model_vqa --model-path P [--model-base B] --question-file Q.jsonl \
        --image-folder F --answers-file A.jsonl [--conv-mode v1] [--temperature 0] \
        [--max-new-tokens 128] [--batch-size 8] [--num-chunks C --chunk-idx I]

The model is a composed LLaVA checkpoint or a transformers image-text-to-text one (a plain
folder, a fine-tune's output, or a LoRA output with --model-base the VLM it was trained from);
the latter answers through its own processor and chat template (PaliGemma's, which has none,
through a bare prompt: each question needs an image).

Questions are `{"question_id", "image", "text"}` (image optional, a path or a list of paths);
answers are `{"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}`. Lines
already in the answers file are kept and their questions skipped; a torn last line (from an
interrupted run) is cut off and its question answered again.
"""

from __future__ import annotations

import argparse
import json
import os
import uuid
from collections.abc import Iterator
from typing import Any

from tqdm import tqdm

from llava.constants import IMAGE_TOKEN
from llava.inference import Answerer, answerer_for, sampling_kwargs
from llava.model.builder import add_loading_flags, load_from_flags


def read_jsonl(path: str) -> list[dict[str, Any]]:
    rows = []
    with open(path) as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not JSON ({error.msg})") from None
    return rows


def chunk(items: list[Any], num_chunks: int, index: int) -> list[Any]:
    """The index-th of num_chunks contiguous, near-equal parts (for one process of many)."""
    if num_chunks < 1:
        raise ValueError(f"--num-chunks must be at least 1, not {num_chunks}")
    if not 0 <= index < num_chunks:
        raise ValueError(f"--chunk-idx {index} is not in [0, {num_chunks})")
    size, extra = divmod(len(items), num_chunks)
    start = index * size + min(index, extra)
    return items[start : start + size + (1 if index < extra else 0)]


def answered_ids(answers_file: str) -> set[Any]:
    """question_ids already in an answers file.

    Only the last line can be torn (a run stopped mid-write): it is cut off, so its question
    is answered again. A bad line before it is an error, never silently dropped.
    """
    if not os.path.exists(answers_file):
        return set()
    with open(answers_file) as f:
        text = f.read()
    lines = text.splitlines()
    done, kept = set(), []
    for line_number, line in enumerate(lines, start=1):
        try:
            done.add(json.loads(line)["question_id"])
            kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            if line_number < len(lines):
                raise ValueError(
                    f"{answers_file}:{line_number}: not an answer row; only a torn last line "
                    "is dropped on resume"
                ) from None
    if len(kept) != len(lines) or not text.endswith("\n"):
        with open(answers_file + ".tmp", "w") as f:
            f.writelines(line + "\n" for line in kept)
        os.replace(answers_file + ".tmp", answers_file)
    return done


def image_sources(question: dict[str, Any], image_folder: str | None) -> list[str]:
    images = question.get("image") or []
    images = [images] if isinstance(images, str) else list(images)
    paths = [os.path.join(image_folder or "", image) for image in images]
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"question {question.get('question_id')!r}: image {path!r} does not exist"
            )
    return paths


def check_questions(questions: list[dict[str, Any]], image_folder: str | None) -> None:
    """Fail before any answer is generated: fields, unique ids, image files and tags."""
    seen = set()
    for number, question in enumerate(questions, start=1):
        missing = [key for key in ("question_id", "text") if key not in question]
        if missing:
            raise ValueError(f"question {number} of the file has no {' or '.join(missing)}")
        if question["question_id"] in seen:
            raise ValueError(f"question_id {question['question_id']!r} appears twice")
        seen.add(question["question_id"])
        num_images = len(image_sources(question, image_folder))
        num_tags = question["text"].count(IMAGE_TOKEN)
        if num_tags not in (0, num_images):
            raise ValueError(
                f"question {question['question_id']!r}: {num_tags} {IMAGE_TOKEN} tags in its text "
                f"but {num_images} images"
            )


def batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def question_prompt(answerer: Answerer, question: dict[str, Any], image_folder: str | None):
    """The answerer's prompt for a question; one it cannot ask (PaliGemma's without an image,
    say) is named in the error."""
    try:
        return answerer.question_prompt(question["text"], image_sources(question, image_folder))
    except ValueError as error:
        raise ValueError(f"question {question['question_id']!r}: {error}") from None


def answer_questions(
    answerer: Answerer,
    questions: list[dict[str, Any]],
    answers_file: str,
    image_folder: str | None,
    model_id: str,
    batch_size: int,
    generate_kwargs: dict[str, Any],
) -> int:
    """Append answers for the questions not yet answered; returns how many were written."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, not {batch_size}")
    check_questions(questions, image_folder)
    done = answered_ids(answers_file)
    todo = [q for q in questions if q["question_id"] not in done]
    os.makedirs(os.path.dirname(os.path.abspath(answers_file)), exist_ok=True)
    written = 0
    with open(answers_file, "a") as out, tqdm(total=len(todo), desc="answering") as progress:
        for batch in batches(todo, batch_size):
            prompts = [question_prompt(answerer, q, image_folder) for q in batch]
            for question, text in zip(batch, answerer.generate(prompts, **generate_kwargs)):
                row = {
                    "question_id": question["question_id"],
                    "prompt": question["text"],
                    "text": text,
                    "answer_id": uuid.uuid4().hex,
                    "model_id": model_id,
                    "metadata": {},
                }
                out.write(json.dumps(row) + "\n")
                written += 1
            out.flush()
            progress.update(len(batch))
    return written


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_loading_flags(parser)
    parser.add_argument("--question-file", required=True)
    parser.add_argument("--image-folder", default=None)
    parser.add_argument("--answers-file", required=True)
    parser.add_argument(
        "--conv-mode",
        default=None,
        help="chat template; default: v1, or the model's own where it has a processor",
    )
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--num_beams", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--num-chunks", type=int, default=1)
    parser.add_argument("--chunk-idx", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_arguments(argv)
    questions = chunk(read_jsonl(args.question_file), args.num_chunks, args.chunk_idx)
    check_questions(questions, args.image_folder)  # before the model loads
    loaded = load_from_flags(args)
    written = answer_questions(
        answerer_for(loaded, args.conv_mode),
        questions,
        args.answers_file,
        args.image_folder,
        model_id=os.path.basename(os.path.normpath(args.model_path)),
        batch_size=args.batch_size,
        generate_kwargs=sampling_kwargs(
            args.temperature, args.top_p, args.num_beams, args.max_new_tokens
        ),
    )
    print(f"wrote {written} answers to {args.answers_file}")


if __name__ == "__main__":
    main()
