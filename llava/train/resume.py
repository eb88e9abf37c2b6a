"""How a run starts: afresh, from which checkpoint, or not at all because it already finished.

Decided from the output folder's files before the model is built, and said in the log:

- `--overwrite_output_dir`: afresh; the folder's old checkpoints and finish record go.
- a finish record (run_complete.json) with the same --max_steps / --num_train_epochs: nothing
  to do, exit 0 with the folder untouched; with other values the run continues from its last
  checkpoint.
- otherwise the newest committed checkpoint, or the one --resume_from_checkpoint names, after
  the completeness check (llava/train/commit.py) and the flags check (run_folder.py). A
  checkpoint at the run's last step means training is over and only the final save was
  interrupted: its model files are published as the final ones, without training.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Any

from llava.data.skipped import PARTS_FOLDER, SKIPPED_RECORDS
from llava.train.commit import (
    checkpoint_state,
    checkpoints,
    discard,
    latest_complete_checkpoint,
    publish,
    remove_leftovers,
    stage_model_files_of,
    staging_folder,
    verify_checkpoint,
)
from llava.train.run_folder import (
    RUN_COMPLETE_FILE,
    check_resume_flags,
    read_run_complete,
    read_run_flags,
    same_length,
    write_run_complete,
)
from llava.train.stages import StagePlan

FRESH, RESUME, FINISHED, PUBLISH = "fresh", "resume", "finished", "publish"


@dataclass
class RunStart:
    """What the run does: FRESH, RESUME (from `checkpoint`), FINISHED (nothing to do) or
    PUBLISH (training ended at `checkpoint`; only its final save is left); `reason` is logged."""

    action: str
    reason: str
    checkpoint: str | None = None
    global_step: int = 0


def explicit_checkpoint(requested: str | None) -> str | None:
    """The folder --resume_from_checkpoint names (None for none, 'true' or '1': automatic)."""
    if not requested or requested.lower() in ("true", "1", "false", "0"):
        return None
    return requested


def ignored_flags(args: Any) -> set[str]:
    names = getattr(args, "ignore_checkpoint_flags", None) or ""
    return {name.strip().lstrip("-") for name in names.split(",") if name.strip()}


def plan_start(args: Any, flags: dict[str, Any], plan: StagePlan) -> RunStart:
    """Decide how the run starts (reads files only: every rank may call it)."""
    output_dir = args.output_dir
    explicit = explicit_checkpoint(args.resume_from_checkpoint)
    if args.overwrite_output_dir and explicit is None:
        return RunStart(FRESH, f"--overwrite_output_dir: starting afresh in {output_dir}")
    finished = read_run_complete(output_dir) if explicit is None else None
    if finished is not None:
        check_resume_flags(
            os.path.join(output_dir, RUN_COMPLETE_FILE),
            finished.get("flags", {}),
            flags,
            ignored_flags(args),
        )
        if same_length(finished.get("flags", {}), flags):
            return RunStart(
                FINISHED,
                f"{output_dir} holds a run that finished at step {finished.get('global_step')} "
                f"({finished.get('finished')}): nothing to do. Raise --max_steps or "
                "--num_train_epochs to train on, or pass --overwrite_output_dir to start afresh",
                global_step=int(finished.get("global_step", 0)),
            )
    checkpoint = explicit or latest_complete_checkpoint(output_dir)
    if checkpoint is None:
        return RunStart(FRESH, f"starting afresh: no complete checkpoint in {output_dir}")
    verify_checkpoint(checkpoint, plan.weight_files)
    saved_flags = read_run_flags(checkpoint)
    if saved_flags is not None:
        check_resume_flags(checkpoint, saved_flags, flags, ignored_flags(args))
    state = checkpoint_state(checkpoint)
    step, last_step = int(state.get("global_step", 0)), int(state.get("max_steps", 0))
    if args.max_steps > 0 and step > args.max_steps:
        raise ValueError(
            f"{checkpoint} is at step {step}, past --max_steps {args.max_steps}: raise "
            "--max_steps, or start afresh with --overwrite_output_dir"
        )
    training_over = (args.max_steps > 0 and step == args.max_steps) or (
        step >= last_step > 0 and saved_flags is not None and same_length(saved_flags, flags)
    )
    if training_over:
        return RunStart(
            PUBLISH,
            f"{checkpoint} is the run's last step ({step}): training is over, its final save "
            "was interrupted; publishing the checkpoint's model files",
            checkpoint,
            step,
        )
    return RunStart(RESUME, f"resuming from {checkpoint} at step {step}", checkpoint, step)


def prepare_output_dir(start: RunStart, output_dir: str) -> list[str]:
    """The writing process's share of the start: clear leftovers of interrupted saves, the old
    checkpoints on --overwrite_output_dir, the finish record of a run that trains on. Returns
    what it removed."""
    if start.action == FINISHED:
        return []
    removed = remove_leftovers(output_dir)
    if start.action == FRESH:
        for _, folder in checkpoints(output_dir, complete=True):
            discard(folder)
            removed.append(os.path.basename(folder))
        for name in (SKIPPED_RECORDS, PARTS_FOLDER):  # an earlier run's list
            path = os.path.join(output_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
                removed.append(name)
            elif os.path.exists(path):
                os.remove(path)
                removed.append(name)
    record = os.path.join(output_dir, RUN_COMPLETE_FILE)
    if os.path.exists(record):
        os.remove(record)
        removed.append(RUN_COMPLETE_FILE)
    return removed


def publish_checkpoint(start: RunStart, output_dir: str, flags: dict[str, Any]) -> None:
    """Finish a run whose last checkpoint is its result: its model files become the final ones."""
    staging = staging_folder(output_dir)
    stage_model_files_of(start.checkpoint, staging)
    publish(staging, output_dir)
    write_run_complete(output_dir, start.global_step, flags)
