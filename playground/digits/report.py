"""Draw the demo's report: both stages' loss curves and a grid of test questions with answers.

    python -m playground.digits.report --stage-dirs STAGE1_DIR STAGE2_DIR \
        --answers-file A.jsonl --annotation-file T.jsonl --image-folder DATA --out REPORT_DIR

Writes REPORT_DIR/loss_curves.png (training loss per step, from each output folder's
trainer_state.json) and REPORT_DIR/test_examples.png (test images with the question, the
model's answer and the truth; wrong answers in red).
"""

from __future__ import annotations

import argparse
import json
import os
import random
from typing import Any

from matplotlib.figure import Figure  # without pyplot: PNGs render with Agg, no display
from PIL import Image

from llava.eval.model_vqa import read_jsonl
from llava.eval.scores import score_one

STAGE_TITLES = ("stage 1: projector (captions)", "stage 2: LoRA + projector (chat)")


def logged_losses(output_dir: str) -> tuple[list[int], list[float]]:
    """(steps, losses) from the log_history of a run's trainer_state.json."""
    with open(os.path.join(output_dir, "trainer_state.json")) as f:
        history = json.load(f)["log_history"]
    entries = [entry for entry in history if "loss" in entry]
    return [entry["step"] for entry in entries], [entry["loss"] for entry in entries]


def plot_losses(stage_dirs: list[str], path: str) -> None:
    figure = Figure(figsize=(5 * len(stage_dirs), 3.5))
    axes = figure.subplots(1, len(stage_dirs))
    for axis, output_dir, title in zip(axes, stage_dirs, STAGE_TITLES):
        steps, losses = logged_losses(output_dir)
        axis.plot(steps, losses, linewidth=1)
        axis.set(title=title, xlabel="optimizer step", ylabel="training loss", yscale="log")
        axis.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def pick_examples(rows: list[dict[str, Any]], count: int, seed: int = 0) -> list[dict[str, Any]]:
    """A seeded sample of `count` rows, right answers first, ending with a few wrong ones."""
    shuffled = random.Random(seed).sample(rows, len(rows))
    wrong = [row for row in shuffled if not row["correct"]][: count // 6]
    right = [row for row in shuffled if row["correct"]]
    return right[: count - len(wrong)] + wrong


def joined_rows(answers_file: str, annotation_file: str) -> list[dict[str, Any]]:
    """Each answered question with its reference and whether the answer scored."""
    references = {row["question_id"]: row for row in read_jsonl(annotation_file)}
    rows = []
    for answer in read_jsonl(answers_file):
        reference = references[answer["question_id"]]
        row = {**reference, "question": answer["prompt"], "model": answer["text"]}
        row["correct"] = score_one(answer["text"], reference["answer"]) == 1.0
        rows.append(row)
    return rows


def side_by_side(image_folder: str, images: str | list[str]) -> Image.Image:
    """A question's image, or its images left to right (greyscale)."""
    opened = [
        Image.open(os.path.join(image_folder, image)).convert("L")
        for image in ([images] if isinstance(images, str) else images)
    ]
    canvas = Image.new("L", (sum(i.width for i in opened), max(i.height for i in opened)), 255)
    left = 0
    for image in opened:
        canvas.paste(image, (left, 0))
        left += image.width
    return canvas


def plot_examples(
    rows: list[dict[str, Any]], image_folder: str, path: str, columns: int = 6
) -> None:
    """A grid of test images titled with question, model answer and truth."""
    num_rows = max(1, -(-len(rows) // columns))
    figure = Figure(figsize=(2.4 * columns, 3.0 * num_rows))
    figure.subplots(num_rows, columns)
    for axis in figure.axes:
        axis.axis("off")
    for axis, row in zip(figure.axes, rows):
        axis.imshow(side_by_side(image_folder, row["image"]), cmap="gray", vmin=0, vmax=255)
        colour = "darkgreen" if row["correct"] else "red"
        title = f"{row['question']}\nmodel: {row['model']}\ntruth: {row['answer']}"
        axis.set_title(title, fontsize=8, color=colour)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage-dirs", nargs=2, required=True, help="stage 1 and stage 2 output")
    parser.add_argument("--answers-file", required=True)
    parser.add_argument("--annotation-file", required=True)
    parser.add_argument("--image-folder", required=True)
    parser.add_argument("--out", required=True, help="report folder (created)")
    parser.add_argument("--num-examples", type=int, default=24)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    plot_losses(args.stage_dirs, os.path.join(args.out, "loss_curves.png"))
    rows = pick_examples(joined_rows(args.answers_file, args.annotation_file), args.num_examples)
    plot_examples(rows, args.image_folder, os.path.join(args.out, "test_examples.png"))
    print(f"report: {args.out}/loss_curves.png, {args.out}/test_examples.png")


if __name__ == "__main__":
    main()
