"""Write scikit-learn's handwritten digits as a LLaVA dataset: PNG scans, captions, chats, a test split.

    python -m playground.digits.data --out playground/data/digits [--image-size 32]
        [--test-fraction 0.2] [--train-limit N] [--test-limit N]

Files written under --out:
    images/train/NNNN.png, images/test/NNNN.png   the 8x8 scans upscaled (NNNN: sklearn index)
    pretrain.json            stage 1: one caption per training image ("a handwritten seven")
    finetune.json            stage 2: 1-3 question turns per training image, a question about
                             each training image beside another, and text-only rows (among
                             them comparisons of two named digits)
    test_questions.jsonl     {question_id, image, text}: every question type on every test image,
                             and the two-image question on each test image beside another
    test_annotations.jsonl   {question_id, image, category, answer, digit} for llava.eval.scores
"""

from __future__ import annotations

import argparse
import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

NUMBER_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
)  # fmt: skip
CAPTION_PROMPT = "Write a short caption for the image."
# Question type -> (question about an image, answer for a digit). The test asks exactly these.
QUESTIONS: dict[str, tuple[str, Callable[[int], str]]] = {
    "digit": ("What digit is this?", lambda digit: NUMBER_WORDS[digit]),
    "parity": ("Is this digit even or odd?", lambda digit: "even" if digit % 2 == 0 else "odd"),
    "plus_one": ("What is this digit plus one?", lambda digit: NUMBER_WORDS[digit + 1]),
}
# Text-only questions name the digit instead of showing it (as LLaVA's mixture has text rows).
TEXT_QUESTIONS: dict[str, str] = {
    "parity": "Is {word} even or odd?",
    "plus_one": "What is {word} plus one?",
}
TEXT_ONLY_FRACTION = 0.05
# The question about two images: the answer reads both digits, then compares them ("seven and
# three, so yes"), and scores only when all three parts are right.
PAIR_CATEGORY = "compare"
PAIR_QUESTION = "Is the first digit larger than the second?"
# Text-only comparisons of two named digits, answered the same way: the verdict from the words.
TEXT_COMPARE_QUESTION = "Is {first} larger than {second}?"
TEXT_COMPARE_ROWS = 1000


@dataclass(frozen=True)
class Scan:
    """One digit image as written: its sklearn index, label and path under the data folder."""

    index: int
    digit: int
    image: str


def caption(digit: int) -> str:
    return f"a handwritten {NUMBER_WORDS[digit]}"


def answer(category: str, digit: int) -> str:
    return QUESTIONS[category][1](digit)


def compare(first: int, second: int) -> str:
    verdict = "yes" if first > second else "no"
    return f"{NUMBER_WORDS[first]} and {NUMBER_WORDS[second]}, so {verdict}"


def scan_to_png(pixels: np.ndarray, size: int) -> Image.Image:
    """An 8x8 scan (ink 0..16) as a size x size greyscale image, dark ink on white paper."""
    grey = (255 - pixels * (255 / 16)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").resize((size, size), Image.Resampling.BILINEAR)


def split_indices(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Stratified train/test indices: every digit in both, no image in both."""
    from sklearn.model_selection import train_test_split

    train, test = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, stratify=labels, random_state=seed
    )
    return sorted(train.tolist()), sorted(test.tolist())


def write_scans(
    images: np.ndarray, labels: np.ndarray, indices: list[int], out: str, split: str, size: int
) -> list[Scan]:
    folder = os.path.join(out, "images", split)
    os.makedirs(folder, exist_ok=True)
    scans = []
    for index in indices:
        relative = f"images/{split}/{index:04d}.png"
        scan_to_png(images[index], size).save(os.path.join(out, relative))
        scans.append(Scan(index, int(labels[index]), relative))
    return scans


def turn(speaker: str, text: str) -> dict[str, str]:
    return {"from": speaker, "value": text}


def caption_record(scan: Scan) -> dict[str, Any]:
    """Stage 1: the plain template keeps only the image and the caption."""
    conversation = [turn("human", f"<image>\n{CAPTION_PROMPT}"), turn("gpt", caption(scan.digit))]
    return {"id": f"caption-{scan.index:04d}", "image": scan.image, "conversations": conversation}


def chat_record(scan: Scan, rng: random.Random) -> dict[str, Any]:
    """Stage 2: one to three question types in random order, so each can come first."""
    categories = rng.sample(list(QUESTIONS), k=rng.randint(1, len(QUESTIONS)))
    conversation = []
    for position, category in enumerate(categories):
        question = QUESTIONS[category][0]
        if position == 0:
            question = f"<image>\n{question}"
        conversation += [turn("human", question), turn("gpt", answer(category, scan.digit))]
    return {"id": f"chat-{scan.index:04d}", "image": scan.image, "conversations": conversation}


def pairs_of(scans: list[Scan], rng: random.Random) -> list[tuple[Scan, Scan]]:
    """Each scan first once, beside the next scan of a shuffled order (never itself)."""
    order = list(scans)
    rng.shuffle(order)
    return [(order[k], order[(k + 1) % len(order)]) for k in range(len(order))]


def pair_record(first: Scan, second: Scan) -> dict[str, Any]:
    """Stage 2: two images, one question about both."""
    conversation = [
        turn("human", f"<image>\n<image>\n{PAIR_QUESTION}"),
        turn("gpt", compare(first.digit, second.digit)),
    ]
    return {
        "id": f"pair-{first.index:04d}-{second.index:04d}",
        "image": [first.image, second.image],
        "conversations": conversation,
    }


def text_only_record(number: int, rng: random.Random) -> dict[str, Any]:
    digit = rng.randrange(10)
    category = rng.choice(list(TEXT_QUESTIONS))
    question = TEXT_QUESTIONS[category].format(word=NUMBER_WORDS[digit])
    conversation = [turn("human", question), turn("gpt", answer(category, digit))]
    return {"id": f"text-{number:04d}", "conversations": conversation}


def text_compare_record(number: int, rng: random.Random) -> dict[str, Any]:
    first, second = rng.randrange(10), rng.randrange(10)
    words = {"first": NUMBER_WORDS[first], "second": NUMBER_WORDS[second]}
    conversation = [
        turn("human", TEXT_COMPARE_QUESTION.format(**words)),
        turn("gpt", compare(first, second)),
    ]
    return {"id": f"text-compare-{number:04d}", "conversations": conversation}


def test_rows(
    scans: list[Scan], pairs: list[tuple[Scan, Scan]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(questions, annotations): every question type about every test image, then the two-image
    question about each of `pairs`."""
    questions, annotations = [], []
    for scan in scans:
        for category, (question, _) in QUESTIONS.items():
            question_id = f"{scan.index:04d}-{category}"
            questions.append({"question_id": question_id, "image": scan.image, "text": question})
            annotations.append(
                {
                    "question_id": question_id,
                    "image": scan.image,
                    "category": category,
                    "answer": answer(category, scan.digit),
                    "digit": scan.digit,
                }
            )
    for first, second in pairs:
        question_id = f"{first.index:04d}-{second.index:04d}-{PAIR_CATEGORY}"
        images = [first.image, second.image]
        questions.append({"question_id": question_id, "image": images, "text": PAIR_QUESTION})
        annotations.append(
            {
                "question_id": question_id,
                "image": images,
                "category": PAIR_CATEGORY,
                "answer": compare(first.digit, second.digit),
                "digits": [first.digit, second.digit],
            }
        )
    return questions, annotations


def demo_sentences() -> list[str]:
    """Every piece of text the dataset can contain, for training the demo's tokenizer."""
    lines = [CAPTION_PROMPT, PAIR_QUESTION]
    lines += [question for question, _ in QUESTIONS.values()]
    for digit in range(10):
        lines.append(caption(digit))
        lines += [compare(digit, other) for other in range(10)]
        lines += [
            TEXT_COMPARE_QUESTION.format(first=NUMBER_WORDS[digit], second=NUMBER_WORDS[other])
            for other in range(10)
        ]
        lines += [answer(category, digit) for category in QUESTIONS]
        lines += [q.format(word=NUMBER_WORDS[digit]) for q in TEXT_QUESTIONS.values()]
    return lines


def write_json(path: str, rows: list[dict[str, Any]]) -> None:
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)


def write_jsonl(path: str, rows: list[dict[str, Any]]) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def write_dataset(
    out: str,
    image_size: int = 32,
    test_fraction: float = 0.2,
    seed: int = 0,
    train_limit: int | None = None,
    test_limit: int | None = None,
) -> dict[str, int]:
    """Write every file of the dataset under `out`; returns the record count of each file."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    train, test = split_indices(digits.target, test_fraction, seed)
    train, test = train[:train_limit], test[:test_limit]
    train_scans = write_scans(digits.images, digits.target, train, out, "train", image_size)
    test_scans = write_scans(digits.images, digits.target, test, out, "test", image_size)

    rng = random.Random(seed)
    pretrain = [caption_record(scan) for scan in train_scans]
    finetune = [chat_record(scan, rng) for scan in train_scans]
    num_text_only = max(1, round(TEXT_ONLY_FRACTION * len(finetune)))
    finetune += [text_only_record(number, rng) for number in range(num_text_only)]
    finetune += [pair_record(*pair) for pair in pairs_of(train_scans, rng)]
    num_compare = min(TEXT_COMPARE_ROWS, len(train_scans))
    finetune += [text_compare_record(number, rng) for number in range(num_compare)]
    rng.shuffle(finetune)
    questions, annotations = test_rows(test_scans, pairs_of(test_scans, random.Random(seed + 1)))

    write_json(os.path.join(out, "pretrain.json"), pretrain)
    write_json(os.path.join(out, "finetune.json"), finetune)
    write_jsonl(os.path.join(out, "test_questions.jsonl"), questions)
    write_jsonl(os.path.join(out, "test_annotations.jsonl"), annotations)
    return {
        "pretrain.json": len(pretrain),
        "finetune.json": len(finetune),
        "test_questions.jsonl": len(questions),
        "test_annotations.jsonl": len(annotations),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="dataset folder (created)")
    parser.add_argument("--image-size", type=int, default=32, help="side of the PNGs in pixels")
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-limit", type=int, default=None, help="use at most N train images")
    parser.add_argument("--test-limit", type=int, default=None, help="use at most N test images")
    args = parser.parse_args(argv)
    counts = write_dataset(
        args.out, args.image_size, args.test_fraction, args.seed, args.train_limit, args.test_limit
    )
    for name, count in counts.items():
        print(f"{os.path.join(args.out, name)}: {count} records")


if __name__ == "__main__":
    main()
