"""Checkpoints cross the transformers lines: written under one, read under the other.

A full model, a stage-1 projector, a LoRA output and an export, written with this interpreter's
transformers, load with the other line's and give the same logits, and the other way round
(tests/cross_line.py does the writing and the reading). The other line's interpreter comes from
LLAVA_OTHER_LINE_PYTHON (.ci/run points it at its Gaudi environment, transformers 4.55); the
tests skip without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from llava.compat import transformers_line

OTHER_LINE_PYTHON = os.environ.get("LLAVA_OTHER_LINE_PYTHON", "")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_PREFIX = "RESULT "

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not OTHER_LINE_PYTHON,
        reason="set LLAVA_OTHER_LINE_PYTHON to a python with the other transformers line",
    ),
]


def run_harness(python: str, action: str, folder: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [python, "-m", "tests.cross_line", action, folder],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


def line_of(python: str) -> str:
    code = "from llava.compat import transformers_line; print(transformers_line())"
    done = subprocess.run([python, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, f"{python} cannot import llava:\n{done.stderr[-2000:]}"
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def other_python() -> str:
    here, there = transformers_line(), line_of(OTHER_LINE_PYTHON)
    assert here.split(" (")[1] != there.split(" (")[1], (
        f"LLAVA_OTHER_LINE_PYTHON runs {there}, the same line as this one ({here})"
    )
    return OTHER_LINE_PYTHON


@pytest.mark.parametrize("direction", ["written here", "written there"])
def test_checkpoints_give_the_same_outputs_on_the_other_line(direction, other_python, tmp_path):
    writer, reader = (sys.executable, other_python)
    if direction == "written there":
        writer, reader = reader, writer
    written = run_harness(writer, "write", str(tmp_path))
    assert written.returncode == 0, written.stderr[-4000:]
    read = run_harness(reader, "read", str(tmp_path))
    results = [line for line in read.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    assert results, f"the reader gave no result:\n{read.stderr[-4000:]}"
    summary = json.loads(results[-1][len(RESULT_PREFIX) :])
    assert summary["written"] != summary["read"]
    assert summary["differences"] == []
    assert read.returncode == 0
