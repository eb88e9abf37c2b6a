"""Score an answers file against references: exact match and VQA accuracy, per category.

    python -m llava.eval.scores --answers-file A.jsonl --annotation-file Q.jsonl \
        [--answer-field answer] [--category-field category] [--json]

A reference row has `question_id` and an answer: one string (exact match after
normalisation) or a list of human answers (VQA accuracy: min(1, agreeing humans / 3)).
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from typing import Any

from llava.eval.model_vqa import read_jsonl

ARTICLES = {"a", "an", "the"}
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
PUNCTUATION = re.compile(r"[^\w\s]")


def normalise(answer: str) -> str:
    """Lower case, no punctuation or articles, number words as digits (as VQA scoring does)."""
    words = PUNCTUATION.sub(" ", answer.lower()).split()
    return " ".join(NUMBER_WORDS.get(word, word) for word in words if word not in ARTICLES)


def score_one(prediction: str, reference: str | list[str]) -> float:
    predicted = normalise(prediction)
    if isinstance(reference, list):
        agreeing = sum(normalise(answer) == predicted for answer in reference)
        return min(1.0, agreeing / 3.0)
    return float(predicted == normalise(reference))


def score(
    answers: list[dict[str, Any]],
    references: list[dict[str, Any]],
    answer_field: str = "answer",
    category_field: str = "category",
) -> dict[str, dict[str, float]]:
    """{category: {"accuracy", "count"}} plus "all"; every answer needs a reference."""
    by_id = {row["question_id"]: row for row in references}
    totals: dict[str, list[float]] = defaultdict(list)
    for answer in answers:
        reference = by_id.get(answer["question_id"])
        if reference is None or answer_field not in reference:
            raise KeyError(
                f"question {answer['question_id']!r} has no reference {answer_field!r} "
                "in the annotation file"
            )
        value = score_one(answer["text"], reference[answer_field])
        totals["all"].append(value)
        if category_field in reference:
            totals[str(reference[category_field])].append(value)
    return {
        name: {"accuracy": sum(values) / len(values), "count": len(values)}
        for name, values in totals.items()
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--answers-file", required=True)
    parser.add_argument("--annotation-file", required=True)
    parser.add_argument("--answer-field", default="answer")
    parser.add_argument("--category-field", default="category")
    parser.add_argument("--json", action="store_true", help="print the scores as JSON")
    args = parser.parse_args(argv)
    answers = read_jsonl(args.answers_file)
    if not answers:
        raise SystemExit(f"{args.answers_file} holds no answers")
    scores = score(
        answers, read_jsonl(args.annotation_file), args.answer_field, args.category_field
    )
    if args.json:
        print(json.dumps(scores, indent=2))
        return
    for name, result in sorted(scores.items(), key=lambda item: item[0] != "all"):
        print(f"{name:<24} {100 * result['accuracy']:6.2f}%  ({result['count']} questions)")


if __name__ == "__main__":
    main()
