"""The training entry with one fault injected, for the kill and preemption tests.

Launched in place of llava/train/train.py (same flags), with LLAVA_TEST_FAULT="POINT:STEP:RANK":
at that point of the save of checkpoint-STEP (or of the final save), process RANK kills
itself with SIGKILL, a real kill -9 with nothing flushed or cleaned up:

    before_write     the save begins: no rank has written anything
    mid_write        the model files are written, the optimizer state is not
    before_commit    every rank wrote its part; the marker is not written yet
    during_rotation  committed; an older checkpoint is renamed out of view but not removed
    final_save       the final files are staged; one of them is moved into place
    preempt          not a kill: at the start of step STEP, SIGTERM to the whole process group
                     (launcher included), as SLURM does on preemption

Test code only: it wraps the project's own save functions in this process.
"""

from __future__ import annotations

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transformers import TrainerCallback  # noqa: E402

import llava.train.commit as commit  # noqa: E402
import llava.train.trainer as trainer_module  # noqa: E402
from llava.train.train import main  # noqa: E402

POINTS = ("before_write", "mid_write", "before_commit", "during_rotation", "final_save", "preempt")


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


class PreemptAtStep(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step and rank() == 0:
            os.killpg(os.getpgid(0), signal.SIGTERM)


def inject(point: str, step: int, victim: int) -> None:
    mixin = trainer_module.LlavaTrainerMixin
    here = rank() == victim

    def at_step(trainer) -> bool:
        return here and trainer.state.global_step == step

    if point == "before_write":
        save = mixin._save_checkpoint

        def _save_checkpoint(self, model, trial):
            if at_step(self):
                die()
            return save(self, model, trial)

        mixin._save_checkpoint = _save_checkpoint
    elif point == "mid_write":
        save_optimizer = mixin._save_optimizer_and_scheduler

        def _save_optimizer_and_scheduler(self, output_dir):
            if at_step(self):
                die()
            return save_optimizer(self, output_dir)

        mixin._save_optimizer_and_scheduler = _save_optimizer_and_scheduler
    elif point == "before_commit":

        def commit_checkpoint(folder, *args):
            if here and folder.endswith(f"checkpoint-{step}"):
                die()
            return commit.commit_checkpoint(folder, *args)

        trainer_module.commit_checkpoint = commit_checkpoint
    elif point == "during_rotation":
        discard = commit.discard

        def discard_after_commit_of_step(folder):
            parent, name = os.path.split(folder)
            if here and commit.is_complete(os.path.join(parent, f"checkpoint-{step}")):
                os.replace(folder, os.path.join(parent, commit.DELETING_PREFIX + name))
                die()
            return discard(folder)

        commit.discard = discard_after_commit_of_step
    elif point == "final_save":

        def publish(staging, output_dir):
            if here:
                first = sorted(os.listdir(staging))[0]
                os.replace(os.path.join(staging, first), os.path.join(output_dir, first))
                die()
            return commit.publish(staging, output_dir)

        trainer_module.publish = publish
    elif point == "preempt":
        build = trainer_module.LlavaTrainerMixin.__init__

        def __init__(self, *args, **kwargs):
            build(self, *args, **kwargs)
            self.add_callback(PreemptAtStep(step))

        trainer_module.LlavaTrainerMixin.__init__ = __init__
    else:
        raise ValueError(f"unknown fault point {point!r}: one of {', '.join(POINTS)}")


if __name__ == "__main__":
    fault = os.environ.get("LLAVA_TEST_FAULT")
    if fault:
        point, step, victim = fault.split(":")
        inject(point, int(step), int(victim))
    main()
