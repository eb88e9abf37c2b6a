"""One run per output folder: its lock, the flags it was started with, and its finish record.

- The lock is an advisory `flock` on `output_dir/run.lock`, taken by the process that writes
  (global rank 0, or each node's first process with --save_on_each_node) for the whole run. The
  kernel releases it when the process ends, however it ends, so a kill -9 leaves nothing to
  clean up; the file itself stays and only names the last owner.
- Ranks on several machines must see one output folder (a shared file system): at the start
  every rank reads the owner line the writing process put in `run.lock`, and a rank that reads
  another (its machine's own disk) stops the run on every rank (check_output_dir_shared).
- `run_flags.json` (in every checkpoint) records the flags a run was started with, so a resume
  with flags that change the model or the data is refused with the differences listed.
- `run_complete.json` (at the top of output_dir) is written last, after the final model files:
  it says that the run finished, at which step and with which flags.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any

from llava.files import read_json_object

LOCK_FILE = "run.lock"
RUN_FLAGS_FILE = "run_flags.json"
RUN_COMPLETE_FILE = "run_complete.json"

# Flags that decide what a checkpoint's weights mean: resuming with another value could not
# load them, or would silently train something else. --ignore_checkpoint_flags cannot waive them.
MODEL_FLAGS = (
    "model_name_or_path",
    "vision_tower",
    "mm_projector_type",
    "mm_vision_select_feature",
    "mm_use_im_start_end",
    "tune_mm_mlp_adapter",
    "freeze_backbone",
    "tune_vision_tower",
    "freeze_mm_mlp_adapter",
    "lora_enable",
    "lora_r",
    "lora_target_modules",
    "lora_bias",
    "bits",
)
# Flags that change the data or the optimisation a resumed run continues with: refused when they
# differ, unless named in --ignore_checkpoint_flags (a moved data folder, more GPUs, ...).
DATA_FLAGS = (
    "data_path",
    "image_folder",
    "image_aspect_ratio",
    "dataset_text_field",
    "dataset_image_field",
    "validation_split_percentage",
    "skip_bad_records",
    "max_image_pixels",
    "version",
    "model_max_length",
    "mm_vision_select_layer",
    "lora_alpha",
    "lora_dropout",
    "seed",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "world_size",
    "packing",
)
# How long to train: changing them continues a finished run (see finished_run_action).
LENGTH_FLAGS = ("max_steps", "num_train_epochs")
RECORDED_FLAGS = MODEL_FLAGS + DATA_FLAGS + LENGTH_FLAGS


class OutputDirBusyError(RuntimeError):
    """Another live process holds the output folder."""


class CheckpointFlagsError(ValueError):
    """A resume with flags that change the model or the data."""


@dataclass
class OutputDirLock:
    """An open, locked `run.lock`; the lock lasts as long as this object's file stays open."""

    path: str
    file: Any

    def release(self) -> None:
        self.file.close()


def owner_line() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
    }


def lock_output_dir(output_dir: str) -> OutputDirLock:
    """Take `output_dir/run.lock` or fail at once, naming the folder and its owner."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LOCK_FILE)
    lock_file = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (held for the run)
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
            raise
        lock_file.seek(0)
        owner = lock_file.read().strip() or "an unknown process"
        lock_file.close()
        raise OutputDirBusyError(
            f"{output_dir} is in use by another run ({owner}); wait for it to end, stop it, or "
            "choose another --output_dir"
        ) from None
    owner = owner_line()
    lock_file.seek(0)
    lock_file.truncate()
    lock_file.write(f"host {owner['host']}, pid {owner['pid']}, since {owner['started']}\n")
    lock_file.flush()
    os.fsync(lock_file.fileno())  # other machines read the owner line (check_output_dir_shared)
    return OutputDirLock(path, lock_file)


class OutputDirNotSharedError(RuntimeError):
    """Processes of one run see different output folders (each machine its own disk)."""


def check_output_dir_shared(output_dir: str) -> None:
    """Every rank of a distributed run reads the owner line of `output_dir/run.lock` that global
    rank 0 wrote; where a rank reads another line, or none, its machine has a folder of its own,
    and every rank raises OutputDirNotSharedError naming the ranks and hosts. Called by every
    rank after rank 0 took the lock (without --save_on_each_node)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    try:
        with open(os.path.join(output_dir, LOCK_FILE), encoding="utf-8") as f:
            seen = f.read().strip()
    except OSError:
        seen = ""
    group = dist.new_group(backend="gloo")  # a CPU exchange of short strings
    views: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(views, (socket.gethostname(), seen), group=group)
    dist.destroy_process_group(group)
    owner = views[0][1]
    others = [
        f"rank {rank} on {host} reads {line or 'no run.lock'!r}"
        for rank, (host, line) in enumerate(views)
        if line != owner
    ]
    if others:
        raise OutputDirNotSharedError(
            f"{output_dir} is not one folder for every process of the run: rank 0 on "
            f"{views[0][0]} took its lock ({owner}), but {'; '.join(others)}. Put --output_dir "
            "on a file system every machine mounts (NFS, Lustre, GPFS, ...), or pass "
            "--save_on_each_node to keep a copy on each machine's disk; see docs/reliability.md"
        )


# -- flags ----------------------------------------------------------------------------------------
def jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return str(value)


def run_flags(*argument_groups: Any) -> dict[str, Any]:
    """The recorded flags' values from the parsed argument dataclasses (world_size included)."""
    flags: dict[str, Any] = {}
    for group in argument_groups:
        for f in dataclasses.fields(group):
            if f.name in RECORDED_FLAGS:
                flags[f.name] = jsonable(getattr(group, f.name))
        if hasattr(group, "world_size"):
            flags["world_size"] = group.world_size
    return flags


def flag_differences(
    saved: dict[str, Any], current: dict[str, Any], names: tuple[str, ...]
) -> list[str]:
    """'--flag: saved -> current' for each of `names` whose value changed (absent: unknown)."""
    return [
        f"--{name}: {saved[name]!r} -> {current.get(name)!r}"
        for name in names
        if name in saved and saved[name] != current.get(name)
    ]


def check_resume_flags(
    checkpoint: str, saved: dict[str, Any], current: dict[str, Any], ignored: set[str]
) -> None:
    """Refuse a resume whose flags change the model or (unless ignored) the data."""
    unknown = ignored - set(DATA_FLAGS)
    if unknown:
        raise CheckpointFlagsError(
            f"--ignore_checkpoint_flags {', '.join(sorted(unknown))}: only flags that may safely "
            f"differ can be ignored ({', '.join(DATA_FLAGS)}); a checkpoint's model flags "
            f"({', '.join(MODEL_FLAGS)}) must match it"
        )
    model = flag_differences(saved, current, MODEL_FLAGS)
    data = flag_differences(saved, current, tuple(n for n in DATA_FLAGS if n not in ignored))
    if not model and not data:
        return
    lines = "\n  ".join(model + data)
    hint = (
        "\nResume with the checkpoint's values, start afresh with --overwrite_output_dir (or "
        "another --output_dir)"
        + (", or name the data flags that may differ in --ignore_checkpoint_flags" if data else "")
    )
    raise CheckpointFlagsError(
        f"{checkpoint} was written with other flags than this run's:\n  {lines}{hint}"
    )


# -- records --------------------------------------------------------------------------------------
def write_json_atomically(path: str, value: Any) -> None:
    """Write to a temporary file beside `path`, flush it to disk, then rename it over `path`."""
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def read_json_record(path: str) -> dict[str, Any] | None:
    """A record this module wrote (None when absent); an unreadable one is an error naming it."""
    return read_json_object(path) if os.path.exists(path) else None


def write_run_flags(folder: str, flags: dict[str, Any]) -> None:
    write_json_atomically(os.path.join(folder, RUN_FLAGS_FILE), {"flags": flags})


def read_run_flags(folder: str) -> dict[str, Any] | None:
    record = read_json_record(os.path.join(folder, RUN_FLAGS_FILE))
    return None if record is None else record.get("flags", {})


def write_run_complete(output_dir: str, global_step: int, flags: dict[str, Any]) -> None:
    write_json_atomically(
        os.path.join(output_dir, RUN_COMPLETE_FILE),
        {
            "global_step": global_step,
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": sys.argv,
            "flags": flags,
        },
    )


def read_run_complete(output_dir: str) -> dict[str, Any] | None:
    return read_json_record(os.path.join(output_dir, RUN_COMPLETE_FILE))


def same_length(saved: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether --max_steps and --num_train_epochs are what the record says."""
    return all(saved.get(name) == current.get(name) for name in LENGTH_FLAGS)
