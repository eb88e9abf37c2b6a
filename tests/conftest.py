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


def mapped_shm_buffers() -> set[str]:
    """The buffers some live process maps. A rank maps its own buffer when it creates it and
    then waits for its peers' files: removing a mapped one (another test session's, or a
    training run's on the same machine) leaves a peer waiting for it forever."""
    mapped = set()
    prefix = DEEPSPEED_SHM_BUFFERS.removesuffix("*")
    for maps in glob.glob("/proc/[0-9]*/maps"):
        with contextlib.suppress(OSError):  # the process ended, or is not ours to read
            with open(maps) as f:
                mapped.update(line.split()[-1] for line in f if prefix in line)
    return mapped


def remove_new_shm_buffers(before: set[str]) -> None:
    """Buffers made since `before` that no live process maps (their runs have ended)."""
    new = set(glob.glob(DEEPSPEED_SHM_BUFFERS)) - before
    for path in new - mapped_shm_buffers() if new else ():
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
