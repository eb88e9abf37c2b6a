"""Shared pytest fixtures: tiny tokenizers and tiny checkpoints saved to temporary folders."""

import contextlib
import glob
import os

import pytest

from tests.fixtures.models import *  # noqa: F403
from tests.fixtures.script_runs import *  # noqa: F403
from tests.fixtures.tiny_vlms import *  # noqa: F403
from tests.fixtures.tokenizers import *  # noqa: F403
from tests.fixtures.training import *  # noqa: F403

# DeepSpeed's CPU all-reduce maps a shared-memory buffer per rank and port (64 MiB) and no
# process removes it: each deepspeed run of the suite would keep 128 MiB of RAM in /dev/shm.
DEEPSPEED_SHM_BUFFERS = "/dev/shm/deepspeed_allreduce_buffer_*"


def remove_new_shm_buffers(before: set[str]) -> None:
    for path in set(glob.glob(DEEPSPEED_SHM_BUFFERS)) - before:
        with contextlib.suppress(OSError):
            os.remove(path)


@pytest.fixture(scope="session", autouse=True)
def shm_buffers_of_the_session():
    """Those made by session fixtures' runs go at the end."""
    before = set(glob.glob(DEEPSPEED_SHM_BUFFERS))
    yield
    remove_new_shm_buffers(before)


@pytest.fixture(autouse=True)
def shm_buffers_of_each_test():
    """Those a test's own runs made go when it ends (their processes have exited)."""
    before = set(glob.glob(DEEPSPEED_SHM_BUFFERS))
    yield
    remove_new_shm_buffers(before)
