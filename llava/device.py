"""Which device to run on (cuda, hpu or cpu), found without importing a vendor stack at import time.

The Habana stack (`habana_frameworks`) registers the `hpu` device when imported; it is imported
here only inside the functions that need it, and only when it is installed.
"""

from __future__ import annotations

import importlib.util

import torch

DEVICE_TYPES = ("cuda", "hpu", "cpu")


def habana_stack_installed() -> bool:
    """True when the Habana PyTorch bridge is installed (not imported)."""
    return importlib.util.find_spec("habana_frameworks") is not None


def optimum_habana_installed() -> bool:
    """True when the `habana` extra (optimum-habana) is installed (not imported)."""
    # find_spec of a submodule imports its parent package, and raises when that is missing.
    return (
        importlib.util.find_spec("optimum") is not None
        and importlib.util.find_spec("optimum.habana") is not None
    )


def hpu_available() -> bool:
    if not habana_stack_installed():
        return False
    import habana_frameworks.torch.hpu as hthpu

    return hthpu.is_available()


def default_device() -> str:
    """cuda when a CUDA GPU is there, else hpu when a Gaudi card is, else cpu."""
    if torch.cuda.is_available():
        return "cuda"
    if hpu_available():
        return "hpu"
    return "cpu"


def resolve_device(name: str) -> str:
    """A --device value: auto (the default device) or one of cuda, hpu, cpu (with an index)."""
    if name == "auto":
        return default_device()
    if name.split(":")[0] not in DEVICE_TYPES:
        raise ValueError(f"--device must be auto, {', '.join(DEVICE_TYPES)}; not {name!r}")
    return name


def mark_step(device: torch.device | str) -> None:
    """End a lazy-mode graph on HPU (runs what was queued); nothing elsewhere."""
    if torch.device(device).type == "hpu":
        import habana_frameworks.torch.core as htcore

        htcore.mark_step()


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (for timings)."""
    kind = torch.device(device).type
    if kind == "cuda":
        torch.cuda.synchronize(device)
    elif kind == "hpu":
        import habana_frameworks.torch.hpu as hthpu

        hthpu.synchronize()
