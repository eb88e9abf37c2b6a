"""Preemption: on SIGTERM or SIGUSR1, finish the current step, checkpoint it, and stop.

SLURM and Kubernetes preempt with SIGTERM (SLURM's `--signal=USR1@90` warns with SIGUSR1);
the deepspeed launcher and torchrun forward SIGTERM to every rank and kill what is still alive
30 s later. The handler only records the signal. At the end of each optimizer step every rank
learns whether any rank was signalled (an all-reduce of one flag over a CPU group, so no device
sync), so all stop after the same step: the trainer then writes a complete checkpoint there and
`train` exits with PREEMPTED_EXIT_CODE and a message saying how to resume.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: try again (the rerun resumes)


class PreemptionCallback(TrainerCallback):
    """Catches the preemption signals for the run and turns one into a save-and-stop."""

    def __init__(self) -> None:
        self.received: int | None = None  # the signal number, once one arrived on this rank
        self.preempted_at: int | None = None  # the step every rank stopped after
        self.group: Any = None
        self.previous_handlers: dict[int, Any] = {}

    def install(self) -> None:
        for signum in PREEMPTION_SIGNALS:
            self.previous_handlers[signum] = signal.signal(signum, self.on_signal)

    def uninstall(self) -> None:
        for signum, handler in self.previous_handlers.items():
            signal.signal(signum, handler)
        self.previous_handlers.clear()

    def on_signal(self, signum: int, frame: Any) -> None:
        if self.received is None:
            logger.warning(
                "%s received: finishing this step, then saving a checkpoint",
                signal.Signals(signum).name,
            )
        self.received = signum

    def any_rank_signalled(self) -> bool:
        """Whether this rank or any other got a signal (the same answer on every rank)."""
        flag = torch.tensor([int(self.received is not None)], dtype=torch.int32)
        if self.group is not None:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return bool(flag.item())

    def on_train_begin(self, args, state, control, **kwargs):
        # A CPU group for the flag, so it never waits on the accelerator (every rank calls this).
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self.group = torch.distributed.new_group(backend="gloo")

    def on_step_end(self, args, state, control, **kwargs):
        if self.preempted_at is None and self.any_rank_signalled():
            self.preempted_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control

    def resume_message(self, output_dir: str) -> str:
        name = signal.Signals(self.received).name if self.received else "a signal"
        return (
            f"Preempted ({name} on some rank): checkpoint-{self.preempted_at} was written in "
            f"{output_dir}. Run the same command again to resume from it."
        )
