"""Never lose a run: real kill -9 at every point of a save, and SIGTERM preemption, under
DeepSpeed ZeRO-3 with 2 processes, for stage 1, LoRA and full stage 2.

Full stage 2 (ZeRO-3 partitions of every weight and the optimizer, through torchrun: the
largest save) runs a chain of launches on one output folder (checkpoints every step, at most one
kept), each killed at another point of the commit protocol by tests/faults.py:

    launch 1  killed as the save of checkpoint-1 begins           -> nothing complete: fresh
    launch 2  rank 1 killed mid-write of checkpoint-2              -> resumes from checkpoint-1
    launch 3  killed after every rank wrote checkpoint-3, before its commit -> from checkpoint-2
    launch 4  killed after checkpoint-4's commit, during rotation  -> from checkpoint-4
    launch 5  killed during the final save (one file moved)        -> checkpoint-6 published
    launch 6  finishes the run without training; launch 7 finds it finished and changes nothing

Stage 1 and LoRA, whose saves hold other files through the same protocol, run the points where
those files matter: rank 1 killed mid-write of checkpoint-2 (resume from checkpoint-1, their
optimizer and sampler state), then killed during the final save (their published files), then
the launch that finishes. The losses every finished run records for steps 1-6 equal an
uninterrupted run's. Then a
preemption: SIGTERM to the launcher and both ranks during step 3 writes checkpoint-3, the run
exits non-zero saying how to resume, and the rerun resumes there with the same losses.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time

import pytest

from tests.fixtures.script_runs import STAGE_SCRIPTS, STEPS, common_flags, script_env
from tests.fixtures.training import REPO, dry_run_arguments, free_port, logged_losses

pytestmark = pytest.mark.slow

CHAIN = [  # (fault, the checkpoint the next launch must start from)
    ("before_write:1:0", None),
    ("mid_write:2:1", "checkpoint-1"),
    ("before_commit:3:0", "checkpoint-2"),
    ("during_rotation:4:0", "checkpoint-4"),
    ("final_save:6:0", "checkpoint-6"),
]
SHORT_CHAIN = [CHAIN[1], CHAIN[4]]
CHAINS = {"pretrain": SHORT_CHAIN, "lora": SHORT_CHAIN, "full": CHAIN}


def launch(command: list[str], log: str, fault: str | None) -> int:
    """Run the training command in its own process group, on a port of its own (a killed
    launch's port may linger); wait for every process of the group."""
    command = list(command)
    command[command.index("--master_port") + 1] = str(free_port())
    env = {**os.environ, "LLAVA_TEST_FAULT": fault or ""}
    with open(log, "a") as out:
        out.write(f"\n===== fault {fault}\n")
        out.flush()
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        returncode = process.wait(timeout=600)
    deadline = time.time() + 120
    while time.time() < deadline:  # a launcher left behind by a kill finishes its cleanup
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return returncode
        time.sleep(0.2)
    raise AssertionError(f"processes of {command[0]} still alive after 2 minutes")


def chain_command(assets, stage: str, output_dir: str, projector: str, *extra: str) -> list[str]:
    """The stage script's command (its dry run) under ZeRO-3, with a checkpoint at every step
    (one kept) and tests/faults.py as the training entry."""
    env = {**script_env(assets, stage, output_dir, projector), "MASTER_PORT": "0"}
    env["DEEPSPEED_CONFIG"] = "scripts/zero3.json"
    command = dry_run_arguments(STAGE_SCRIPTS[stage][0], env)
    entry = command.index("llava/train/train.py")
    flags = [*common_flags(stage), "--save_steps", "1", "--save_total_limit", "1", *extra]
    return [*command[:entry], "tests/faults.py", *command[entry + 1 :], *flags]


def tail(log: str) -> str:
    with open(log) as f:
        return f.read()[-5000:]


def digests(folder: str) -> dict[str, str]:
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            if name != "run.lock":
                path = os.path.join(root, name)
                with open(path, "rb") as f:
                    found[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return found


@pytest.fixture
def reference(request, stage_one_runs) -> tuple[str, str]:
    """(the uninterrupted run of the stage, the stage-1 projector stage 2 starts from)."""
    stage = request.node.callspec.params["stage"]
    name = "stage_one_zero3_run" if stage == "pretrain" else f"{stage}_run"
    run = request.getfixturevalue(name)
    return run, ("" if stage == "pretrain" else os.path.join(stage_one_runs[0], "mm_projector.bin"))


def launch_and_read(command, log, fault) -> tuple[int, str]:
    """Launch; (exit code, what this launch logged)."""
    offset = os.path.getsize(log) if os.path.exists(log) else 0
    returncode = launch(command, log, fault)
    with open(log) as f:
        f.seek(offset)
        return returncode, f.read()


def start_line(output: str, start: str | None) -> str:
    if start is None:
        return f"Run: starting afresh: no complete checkpoint in {output}"
    return f"Run: resuming from {os.path.join(output, start)}"


@pytest.mark.parametrize("stage", list(STAGE_SCRIPTS))
def test_kill_9_at_every_point_of_a_save_loses_nothing(stage, training_assets, reference, tmp_path):
    expected = logged_losses(reference[0])
    assert sorted(expected) == list(range(1, STEPS + 1))
    output = str(tmp_path / "run")
    log = output + ".log"
    command = chain_command(training_assets, stage, output, reference[1])
    start = None
    for fault, next_start in CHAINS[stage]:
        returncode, logged = launch_and_read(command, log, fault)
        assert returncode != 0, f"{fault} did not end the run:\n{tail(log)}"
        assert start_line(output, start) in logged, (fault, tail(log))
        start = next_start
    returncode, logged = launch_and_read(command, log, None)
    assert returncode == 0, tail(log)
    assert f"Run: {os.path.join(output, start)} is the run's last step" in logged, tail(log)
    assert "'loss':" not in logged  # the final save needed no training
    losses = logged_losses(output)
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step, loss in expected.items():
        assert losses[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), (step, losses, expected)
    names = set(os.listdir(output))
    assert {"checkpoint-6", "run_complete.json", "run.lock", "trainer_state.json"} <= names
    assert not {n for n in names if n.startswith(".") or n.startswith("checkpoint-")} - {
        "checkpoint-6"
    }
    if stage != "full":
        return
    before = digests(output)
    returncode, logged = launch_and_read(command, log, None)
    assert returncode == 0 and "nothing to do" in logged, tail(log)
    assert digests(output) == before


@pytest.mark.parametrize("stage", ["lora", "full"])  # deepspeed launcher, torchrun
def test_sigterm_to_the_launcher_and_ranks_checkpoints_the_step_and_resumes(
    stage, training_assets, reference, tmp_path
):
    expected = logged_losses(reference[0])
    output = str(tmp_path / "run")
    log = output + ".log"
    # Only the preemption saves.
    command = chain_command(training_assets, stage, output, reference[1], "--save_steps", "100")
    returncode, logged = launch_and_read(command, log, "preempt:3:0")
    assert returncode != 0, tail(log)
    assert f"checkpoint-3 was written in {output}. Run the same command again" in logged
    assert sorted(n for n in os.listdir(output) if n.startswith("checkpoint-")) == ["checkpoint-3"]
    assert not os.path.exists(os.path.join(output, "run_complete.json"))
    returncode, logged = launch_and_read(command, log, None)
    assert returncode == 0, tail(log)
    assert start_line(output, "checkpoint-3") in logged
    losses = logged_losses(output)
    for step, loss in expected.items():
        assert losses[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), (step, losses, expected)
