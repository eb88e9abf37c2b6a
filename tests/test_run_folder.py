"""The run folder's guarantees, piece by piece: lock, commit, rotation, completeness, flags, start."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

from llava.train.arguments import parse_arguments
from llava.train.commit import (
    COMPLETE_MARKER,
    IncompleteCheckpointError,
    commit_checkpoint,
    latest_complete_checkpoint,
    remove_leftovers,
    rotate,
    verify_checkpoint,
)
from llava.train.resume import FINISHED, FRESH, PUBLISH, RESUME, plan_start, prepare_output_dir
from llava.train.run_folder import (
    CheckpointFlagsError,
    OutputDirBusyError,
    check_resume_flags,
    lock_output_dir,
    write_run_complete,
    write_run_flags,
)
from llava.train.stages import plan_stage

PROJECTOR_PLAN = plan_stage(True, False, False, False, False)
LORA_PLAN = plan_stage(False, True, False, False, False)


def write_checkpoint(run_dir, step: int, commit: bool = True, max_steps: int = 10, flags=None):
    """A stage-1 checkpoint as the trainer writes it (tiny real torch files)."""
    folder = os.path.join(run_dir, f"checkpoint-{step}")
    os.makedirs(folder)
    torch.save({"state": {}, "param_groups": []}, os.path.join(folder, "optimizer.pt"))
    torch.save({"last_epoch": step}, os.path.join(folder, "scheduler.pt"))
    torch.save({"python": 1}, os.path.join(folder, "rng_state.pth"))
    torch.save(
        {"model.mm_projector.weight": torch.ones(4, 4)}, os.path.join(folder, "mm_projector.bin")
    )
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model_type": "llava"}, f)
    with open(os.path.join(folder, "trainer_state.json"), "w") as f:
        json.dump({"global_step": step, "max_steps": max_steps, "log_history": []}, f)
    write_run_flags(folder, flags or {})
    if commit:
        commit_checkpoint(folder)
    return folder


# -- lock -------------------------------------------------------------------------------------------
HOLD_LOCK = """
import sys, time
from llava.train.run_folder import lock_output_dir
lock = lock_output_dir(sys.argv[1])
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_run_is_refused_while_the_first_lives_and_not_after_kill_9(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputDirBusyError) as refused:
            lock_output_dir(str(tmp_path))
        message = str(refused.value)
        assert str(tmp_path) in message
        assert f"pid {holder.pid}" in message and socket.gethostname() in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = lock_output_dir(str(tmp_path))  # the kernel released it: nothing to clean up
    assert f"pid {os.getpid()}" in open(os.path.join(tmp_path, "run.lock")).read()
    lock.release()


# -- commit and rotation ----------------------------------------------------------------------------
def test_the_marker_lists_every_file_with_its_size(tmp_path):
    folder = write_checkpoint(tmp_path, 2)
    with open(os.path.join(folder, COMPLETE_MARKER)) as f:
        files = json.load(f)["files"]
    expected = {
        "config.json",
        "mm_projector.bin",
        "optimizer.pt",
        "rng_state.pth",
        "run_flags.json",
        "scheduler.pt",
        "trainer_state.json",
    }
    assert set(files) == expected
    assert all(files[name] == os.path.getsize(os.path.join(folder, name)) for name in files)


def test_rotation_keeps_the_newest_complete_and_the_best_and_removes_leftovers(tmp_path):
    for step in (1, 2, 3, 4):
        write_checkpoint(tmp_path, step)
    write_checkpoint(tmp_path, 5, commit=False)  # killed before its commit
    os.makedirs(tmp_path / ".deleting-checkpoint-0")  # killed during an earlier rotation
    removed = rotate(str(tmp_path), 2, keep=str(tmp_path / "checkpoint-1"))
    assert sorted(removed) == [".deleting-checkpoint-0", "checkpoint-2", "checkpoint-5"]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1", "checkpoint-3", "checkpoint-4"]


def test_a_limit_of_one_never_leaves_zero_checkpoints(tmp_path):
    write_checkpoint(tmp_path, 1)
    write_checkpoint(tmp_path, 2, commit=False)  # the new one is not committed yet
    rotate(str(tmp_path), 1)
    assert os.listdir(tmp_path) == ["checkpoint-1"]
    assert latest_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-1")


def test_leftovers_go_and_complete_checkpoints_stay(tmp_path):
    write_checkpoint(tmp_path, 3)
    write_checkpoint(tmp_path, 6, commit=False)
    os.makedirs(tmp_path / ".final-staging")
    assert remove_leftovers(str(tmp_path)) == [".final-staging", "checkpoint-6"]
    assert os.listdir(tmp_path) == ["checkpoint-3"]


# -- completeness -----------------------------------------------------------------------------------
def test_a_complete_checkpoint_verifies(tmp_path):
    verify_checkpoint(write_checkpoint(tmp_path, 2), PROJECTOR_PLAN.weight_files)


def test_an_uncommitted_checkpoint_is_refused_naming_it(tmp_path):
    folder = write_checkpoint(tmp_path, 2, commit=False)
    with pytest.raises(IncompleteCheckpointError, match=f"{folder} has no checkpoint_complete"):
        verify_checkpoint(folder, PROJECTOR_PLAN.weight_files)


def test_a_missing_optimizer_is_refused_naming_the_file(tmp_path):
    folder = write_checkpoint(tmp_path, 2, commit=False)
    os.remove(os.path.join(folder, "optimizer.pt"))
    commit_checkpoint(folder)  # committed without it (another tool's checkpoint)
    with pytest.raises(IncompleteCheckpointError, match=f"{folder}/optimizer.pt is missing"):
        verify_checkpoint(folder, PROJECTOR_PLAN.weight_files)


def test_a_truncated_file_is_refused_naming_it(tmp_path):
    folder = write_checkpoint(tmp_path, 2)
    path = os.path.join(folder, "scheduler.pt")
    os.truncate(path, os.path.getsize(path) // 2)
    with pytest.raises(IncompleteCheckpointError, match=f"{path} has .* bytes"):
        verify_checkpoint(folder, PROJECTOR_PLAN.weight_files)


def test_a_truncated_file_of_an_older_plain_marker_is_refused_naming_it(tmp_path):
    folder = write_checkpoint(tmp_path, 2)
    with open(os.path.join(folder, COMPLETE_MARKER), "w") as f:
        f.write("ok\n")  # the marker of earlier versions, without sizes
    path = os.path.join(folder, "optimizer.pt")
    os.truncate(path, os.path.getsize(path) - 30)
    with pytest.raises(IncompleteCheckpointError, match=str(path)):
        verify_checkpoint(folder, PROJECTOR_PLAN.weight_files)


def test_a_lora_checkpoint_needs_its_adapter_files(tmp_path):
    folder = write_checkpoint(tmp_path, 2)
    with pytest.raises(IncompleteCheckpointError, match="adapter_config.json is missing"):
        verify_checkpoint(folder, LORA_PLAN.weight_files)


# -- flags ------------------------------------------------------------------------------------------
SAVED = {"mm_projector_type": "mlp2x_gelu", "lora_r": 8, "data_path": "a.json", "world_size": 2}


def test_changed_model_and_data_flags_are_listed():
    current = {**SAVED, "mm_projector_type": "linear", "data_path": "b.json"}
    with pytest.raises(CheckpointFlagsError) as refused:
        check_resume_flags("ckpt", SAVED, current, set())
    message = str(refused.value)
    assert "--mm_projector_type: 'mlp2x_gelu' -> 'linear'" in message
    assert "--data_path: 'a.json' -> 'b.json'" in message
    assert "--lora_r" not in message


def test_data_flags_may_be_waived_and_model_flags_may_not():
    check_resume_flags("ckpt", SAVED, {**SAVED, "world_size": 4}, {"world_size"})
    with pytest.raises(CheckpointFlagsError, match="--lora_r: 8 -> 16"):
        check_resume_flags("ckpt", SAVED, {**SAVED, "lora_r": 16}, {"data_path"})
    with pytest.raises(CheckpointFlagsError, match="only flags that may safely differ"):
        check_resume_flags("ckpt", SAVED, SAVED, {"lora_r"})


# -- how a run starts -------------------------------------------------------------------------------
def arguments(output_dir, *flags):
    base = ["--model_name_or_path", "m", "--output_dir", str(output_dir), "--report_to", "none"]
    return parse_arguments([*base, *flags])[2]


FLAGS = {"max_steps": 10, "num_train_epochs": 3.0, "data_path": "a.json"}


def test_start_fresh_resume_finished_and_publish(tmp_path):
    args = arguments(tmp_path, "--max_steps", "10")
    start = plan_start(args, FLAGS, PROJECTOR_PLAN)
    assert (start.action, start.reason) == (
        FRESH,
        f"starting afresh: no complete checkpoint in {tmp_path}",
    )
    write_checkpoint(tmp_path, 4, flags=FLAGS)
    start = plan_start(args, FLAGS, PROJECTOR_PLAN)
    assert (start.action, start.checkpoint, start.global_step) == (
        RESUME,
        str(tmp_path / "checkpoint-4"),
        4,
    )
    write_checkpoint(tmp_path, 10, flags=FLAGS)
    assert plan_start(args, FLAGS, PROJECTOR_PLAN).action == PUBLISH
    write_run_complete(str(tmp_path), 10, FLAGS)
    assert plan_start(args, FLAGS, PROJECTOR_PLAN).action == FINISHED
    longer = {**FLAGS, "max_steps": 20}
    start = plan_start(arguments(tmp_path, "--max_steps", "20"), longer, PROJECTOR_PLAN)
    assert (start.action, start.checkpoint) == (RESUME, str(tmp_path / "checkpoint-10"))
    prepare_output_dir(start, str(tmp_path))
    assert not os.path.exists(tmp_path / "run_complete.json")  # it trains on


def test_a_finished_run_with_other_data_is_refused(tmp_path):
    write_run_complete(str(tmp_path), 10, FLAGS)
    args = arguments(tmp_path, "--max_steps", "10")
    with pytest.raises(CheckpointFlagsError, match="--data_path: 'a.json' -> 'b.json'"):
        plan_start(args, {**FLAGS, "data_path": "b.json"}, PROJECTOR_PLAN)


def test_an_explicit_checkpoint_gets_the_same_checks(tmp_path):
    folder = write_checkpoint(tmp_path, 4, commit=False, flags=FLAGS)
    args = arguments(tmp_path, "--max_steps", "10", "--resume_from_checkpoint", folder)
    with pytest.raises(IncompleteCheckpointError, match="no checkpoint_complete"):
        plan_start(args, FLAGS, PROJECTOR_PLAN)
    args = arguments(tmp_path, "--max_steps", "10", "--resume_from_checkpoint", str(tmp_path / "x"))
    with pytest.raises(IncompleteCheckpointError, match="is not a folder"):
        plan_start(args, FLAGS, PROJECTOR_PLAN)


def test_a_checkpoint_past_max_steps_is_refused(tmp_path):
    write_checkpoint(tmp_path, 8, flags=FLAGS)
    with pytest.raises(ValueError, match="at step 8, past --max_steps 5"):
        plan_start(arguments(tmp_path, "--max_steps", "5"), FLAGS, PROJECTOR_PLAN)


def test_overwrite_discards_old_checkpoints(tmp_path):
    write_checkpoint(tmp_path, 8, flags=FLAGS)
    write_run_complete(str(tmp_path), 8, FLAGS)
    start = plan_start(arguments(tmp_path, "--overwrite_output_dir"), FLAGS, PROJECTOR_PLAN)
    assert start.action == FRESH
    assert sorted(prepare_output_dir(start, str(tmp_path))) == ["checkpoint-8", "run_complete.json"]
    assert os.listdir(tmp_path) == []
