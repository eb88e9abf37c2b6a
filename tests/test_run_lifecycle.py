"""A run's life in one process: finished reruns change nothing, a longer run continues, a
preemption signal ends the run with a checkpoint at that step, a resume with other flags is
refused. (The same under DeepSpeed with kills at every point of a save: test_kill_resume.py.)"""

from __future__ import annotations

import hashlib
import json
import os
import signal

import pytest
from transformers import TrainerCallback

import llava.train.train as entry
from llava.train.arguments import parse_arguments
from llava.train.run_folder import CheckpointFlagsError
from llava.train.train import Preempted, build_trainer, train
from tests.fixtures.training import training_flags


def stage_one_flags(assets, output_dir, *extra: str) -> list[str]:
    return training_flags(
        assets,
        output_dir,
        "--version", "plain",
        "--data_path", assets["pretrain"],
        "--tune_mm_mlp_adapter", "True",
        "--save_strategy", "steps",
        "--save_steps", "2",
        "--save_total_limit", "1",
        "--lr_scheduler_type", "constant",
        *extra,
    )  # fmt: skip


def losses(trainer) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}


def snapshot(folder) -> dict[str, str]:
    """Every file's digest, but the lock's (it names the process holding it)."""
    digests = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            if name != "run.lock":
                with open(path, "rb") as f:
                    digests[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return digests


def test_a_finished_run_rerun_changes_nothing_and_a_longer_one_continues(
    training_assets, tmp_path, caplog
):
    output = tmp_path / "run"
    flags = stage_one_flags(training_assets, output)
    first = train(*parse_arguments(flags))
    assert sorted(losses(first)) == [1, 2, 3]
    before = snapshot(output)
    assert {"checkpoint-3/checkpoint_complete", "run_complete.json"} <= set(before)
    assert not any(name.startswith("checkpoint-2/") for name in before)  # rotated (limit 1)
    with caplog.at_level("WARNING"):
        assert train(*parse_arguments(flags)) is None
    assert "finished at step 3" in caplog.text and "nothing to do" in caplog.text
    assert snapshot(output) == before

    longer = train(*parse_arguments([*flags, "--max_steps", "5"]))
    uninterrupted = train(
        *parse_arguments(stage_one_flags(training_assets, tmp_path / "u", "--max_steps", "5"))
    )
    assert sorted(losses(longer)) == [1, 2, 3, 4, 5]
    for step in (4, 5):
        assert losses(longer)[step] == pytest.approx(losses(uninterrupted)[step], rel=1e-5)


def test_a_resume_with_another_projector_is_refused_with_the_difference(training_assets, tmp_path):
    flags = stage_one_flags(training_assets, tmp_path, "--max_steps", "2")
    train(*parse_arguments(flags))
    changed = [*flags, "--max_steps", "4", "--mm_projector_type", "linear"]
    with pytest.raises(CheckpointFlagsError, match="--mm_projector_type: 'mlp2x_gelu' -> 'linear'"):
        train(*parse_arguments(changed))


class SignalAtStep(TrainerCallback):
    """Sends this process a signal in the middle of a step (after its forward and backward)."""

    def __init__(self, step: int, signum: int):
        self.step, self.signum = step, signum

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_preemption_signal_checkpoints_that_step_and_the_rerun_resumes_exactly(
    training_assets, tmp_path, monkeypatch, signum
):
    reference_flags = stage_one_flags(training_assets, tmp_path / "ref", "--max_steps", "5")
    reference = train(*parse_arguments(reference_flags))
    output = tmp_path / "run"
    flags = stage_one_flags(training_assets, output, "--max_steps", "5", "--save_steps", "100")
    handler_before = signal.getsignal(signum)

    def build_with_signal(*args, **kwargs):  # the signal arrives during step 3
        kwargs["callbacks"] = [*kwargs["callbacks"], SignalAtStep(3, signum)]
        return build_trainer(*args, **kwargs)

    monkeypatch.setattr(entry, "build_trainer", build_with_signal)
    with pytest.raises(Preempted, match=f"checkpoint-3 was written in {output}"):
        train(*parse_arguments(flags))
    assert sorted(os.listdir(output)) == ["checkpoint-3", "run.lock"]
    assert signal.getsignal(signum) is handler_before
    monkeypatch.undo()
    resumed = train(*parse_arguments(flags))
    assert sorted(losses(resumed)) == [1, 2, 3, 4, 5]
    for step in (1, 2, 3, 4, 5):
        assert losses(resumed)[step] == pytest.approx(losses(reference)[step], rel=1e-5)


def test_skipped_records_are_listed_once_and_totalled_at_the_end(training_assets, tmp_path, caplog):
    with open(training_assets["finetune"]) as f:
        records = json.load(f)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    records[1]["image"] = "missing.png"  # found while the dataset is built
    records[2]["image"] = str(broken)  # found only when its image is decoded
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    output = tmp_path / "run"
    flags = training_flags(
        training_assets,
        output,
        "--version", "v1",
        "--data_path", str(data),
        "--skip_bad_records", "True",
        "--num_train_epochs", "2",
        "--max_steps", "-1",
        "--dataloader_num_workers", "1",
    )  # fmt: skip
    with caplog.at_level("WARNING"):
        train(*parse_arguments(flags))
    with open(output / "skipped_records.jsonl") as f:
        skipped = [json.loads(line) for line in f]
    assert [(s["index"], s["id"], s["found"]) for s in skipped] == [
        (1, "conv1", "load"),
        (2, "conv2", "decode"),
    ]
    assert all(s["data_file"] == str(data) for s in skipped)
    assert "missing.png" in skipped[0]["reason"] and str(broken) in skipped[1]["reason"]
    assert f"skipped 2 bad records in all (every rank, loader worker and epoch): {output}" in (
        caplog.text
    )
    assert not os.path.exists(output / "skipped_records.parts")
