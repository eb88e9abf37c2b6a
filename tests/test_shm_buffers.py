"""The suite's clean-up of DeepSpeed's /dev/shm buffers never removes one a live process maps
(a peer rank of a run still starting would wait for it forever)."""

import mmap
import os

from tests.conftest import DEEPSPEED_SHM_BUFFERS, remove_new_shm_buffers


def test_a_mapped_buffer_stays_and_goes_once_unmapped():
    path = DEEPSPEED_SHM_BUFFERS.removesuffix("*") + f"test_{os.getpid()}_0"
    with open(path, "wb") as f:
        f.write(b"\0" * 4096)
    try:
        with open(path, "r+b") as f, mmap.mmap(f.fileno(), 4096):
            remove_new_shm_buffers(set())
            assert os.path.exists(path)  # mapped: another run's rank may still be starting
        remove_new_shm_buffers(set())
        assert not os.path.exists(path)
    finally:
        if os.path.exists(path):
            os.remove(path)
