"""The checkpoint commit: a checkpoint counts only once every rank wrote it and it is marked.

A save (`LlavaTrainerMixin._save_checkpoint`) goes:

1. every rank writes its part into `checkpoint-N` (transformers' save, its rotation held back);
2. a barrier: every rank has finished writing;
3. the writing process checks that every rank's own files are there (its `rng_state_R.pth`
   and its DeepSpeed ZeRO shards: ranks on other machines write them through a shared file
   system, whose view may lag by a few seconds), flushes every file of the folder to disk and
   writes the marker `checkpoint_complete` (the files and their sizes) atomically: from then
   on the checkpoint exists for resume, and not before;
4. only then rotation: complete checkpoints beyond --save_total_limit, oldest first, are
   renamed out of view (`.deleting-checkpoint-N`, one atomic step) and removed. The newest
   complete checkpoint and the best one are never removed.

Leftovers of interrupted saves (`checkpoint-N` without marker, `.deleting-*`) are removed at the
start of a run and at every rotation. The same order holds for the final save: the model files
are written into `.final-staging`, moved into place one by one (each rename atomic), and the run
is marked finished (`run_complete.json`) last.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from typing import Any

from llava.files import UnreadableFileError, check_readable, read_json_object
from llava.train.run_folder import OutputDirNotSharedError

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "checkpoint_complete"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
DELETING_PREFIX = ".deleting-"
FINAL_STAGING = ".final-staging"

TRAINER_STATE = "trainer_state.json"
OPTIMIZER = "optimizer.pt"
DEEPSPEED_LATEST = "latest"
# What only resuming needs: left out when a checkpoint's model files become the final ones.
RUN_STATE_PATTERN = re.compile(
    r"^(optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state(_\d+)?\.pth|latest|global_step\d+|"
    r"zero_to_fp32\.py|zero_to_torch\.py|run_flags\.json|checkpoint_complete|trainer_state\.json)$"
)


class IncompleteCheckpointError(ValueError):
    """A checkpoint that cannot resume a run: a file missing, truncated or unreadable."""


def checkpoint_step(name: str) -> int | None:
    match = CHECKPOINT_PATTERN.match(name)
    return int(match.group(1)) if match else None


def is_complete(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, COMPLETE_MARKER))


def checkpoints(run_dir: str, complete: bool) -> list[tuple[int, str]]:
    """(step, folder) of the checkpoints in run_dir that are (or are not) complete, by step."""
    if not os.path.isdir(run_dir):
        return []
    found = []
    for name in os.listdir(run_dir):
        step = checkpoint_step(name)
        folder = os.path.join(run_dir, name)
        if step is not None and os.path.isdir(folder) and is_complete(folder) == complete:
            found.append((step, folder))
    return sorted(found)


def latest_complete_checkpoint(run_dir: str) -> str | None:
    """The newest checkpoint-N in run_dir whose save was committed."""
    found = checkpoints(run_dir, complete=True)
    return found[-1][1] if found else None


# -- writing --------------------------------------------------------------------------------------
def relative_files(folder: str) -> list[str]:
    """Every file under folder, as paths relative to it, sorted."""
    files = []
    for root, _, names in os.walk(folder):
        files.extend(os.path.relpath(os.path.join(root, name), folder) for name in names)
    return sorted(files)


def sync_path(path: str) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# How long the writing process waits for other ranks' files to show in a shared output folder.
RANK_FILES_WAIT_SECONDS = 60.0
RANK_ZERO_SHARD = re.compile(r"(^|_)zero_pp_rank_0_")


def rank_files(folder: str, world_size: int) -> list[str]:
    """The files each of `world_size` ranks writes into a checkpoint by itself: its random state
    and, under DeepSpeed ZeRO, its shards (named as rank 0's, which the writing process wrote)."""
    if world_size <= 1:
        return []
    files = [f"rng_state_{rank}.pth" for rank in range(world_size)]
    tag_file = os.path.join(folder, DEEPSPEED_LATEST)
    if os.path.isfile(tag_file):
        with open(tag_file, encoding="utf-8") as f:
            tag = f.read().strip()
        tag_folder = os.path.join(folder, tag)
        shards = os.listdir(tag_folder) if tag and os.path.isdir(tag_folder) else []
        for name in sorted(n for n in shards if RANK_ZERO_SHARD.search(n)):
            files.extend(
                os.path.join(tag, RANK_ZERO_SHARD.sub(rf"\1zero_pp_rank_{rank}_", name))
                for rank in range(world_size)
            )
    return files


def wait_for_rank_files(folder: str, world_size: int, timeout: float | None = None) -> list[str]:
    """Every rank's own files of the checkpoint (rank_files), once all are visible here; an
    OutputDirNotSharedError naming the missing ones after `timeout` seconds. Each file is looked
    up by name, which a network file system answers from the server, not from a stale listing."""
    timeout = RANK_FILES_WAIT_SECONDS if timeout is None else timeout
    expected = rank_files(folder, world_size)
    deadline = time.monotonic() + timeout
    while True:
        missing = [name for name in expected if not os.path.exists(os.path.join(folder, name))]
        if not missing or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    if missing:
        raise OutputDirNotSharedError(
            f"{folder} lacks files that other ranks wrote before the commit "
            f"({', '.join(missing[:6])}{', ...' if len(missing) > 6 else ''}) after "
            f"{timeout:.0f} s: the output folder is not one folder that every process sees (each "
            "machine writes to its own disk?). Put --output_dir on a file system every machine "
            "mounts (NFS, Lustre, GPFS, ...); see docs/reliability.md"
        )
    return expected


def commit_checkpoint(folder: str, world_size: int = 1) -> None:
    """Step 3: check that every one of `world_size` ranks' own files is there, flush the
    folder's files, then write the marker listing them, atomically."""
    expected = wait_for_rank_files(folder, world_size)
    listed = set(relative_files(folder)) | set(expected)
    files = sorted(name for name in listed if name != COMPLETE_MARKER)
    for name in files:
        sync_path(os.path.join(folder, name))
    sizes = {name: os.path.getsize(os.path.join(folder, name)) for name in files}
    temporary = os.path.join(folder, f".{COMPLETE_MARKER}.tmp")
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump({"files": sizes}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, os.path.join(folder, COMPLETE_MARKER))
    sync_path(folder)


def discard(folder: str) -> None:
    """Take a folder out of view in one rename, then remove it."""
    parent, name = os.path.split(folder.rstrip(os.sep))
    doomed = os.path.join(parent, DELETING_PREFIX + name)
    os.replace(folder, doomed)
    shutil.rmtree(doomed)


def remove_leftovers(run_dir: str) -> list[str]:
    """Remove what interrupted saves and rotations left: unmarked checkpoints, `.deleting-*`
    folders and a final-save staging folder. Returns their names."""
    if not os.path.isdir(run_dir):
        return []
    removed = []
    for name in sorted(os.listdir(run_dir)):
        path = os.path.join(run_dir, name)
        if name.startswith(DELETING_PREFIX) or name == FINAL_STAGING:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(name)
    for _, folder in checkpoints(run_dir, complete=False):
        discard(folder)
        removed.append(os.path.basename(folder))
    return removed


def rotate(run_dir: str, save_total_limit: int | None, keep: str | None = None) -> list[str]:
    """Step 4: remove the oldest complete checkpoints beyond the limit (never the newest one,
    nor `keep`, the best model's), then any leftovers. Returns the removed names."""
    removed = remove_leftovers(run_dir)
    if not save_total_limit or save_total_limit <= 0:
        return removed
    complete = [folder for _, folder in checkpoints(run_dir, complete=True)]
    kept_newest = complete[-max(1, save_total_limit) :]
    for folder in complete[: -len(kept_newest)]:
        if keep is not None and os.path.abspath(folder) == os.path.abspath(keep):
            continue
        discard(folder)
        removed.append(os.path.basename(folder))
    return removed


# -- checking -------------------------------------------------------------------------------------
def marked_sizes(folder: str) -> dict[str, int] | None:
    """The files and sizes the marker lists (None for the plain markers of older saves)."""
    path = os.path.join(folder, COMPLETE_MARKER)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as error:
        raise IncompleteCheckpointError(f"{path} cannot be read: {error}") from None
    if not text.lstrip().startswith("{"):
        return None
    try:
        return dict(json.loads(text)["files"])
    except (ValueError, KeyError, TypeError) as error:
        raise IncompleteCheckpointError(f"{path} is damaged: {error}") from None


def deepspeed_state_files(folder: str) -> list[str]:
    """The engine's files a DeepSpeed checkpoint needs: `latest` and the folder it names."""
    tag_file = os.path.join(folder, DEEPSPEED_LATEST)
    with open(tag_file, encoding="utf-8") as f:
        tag = f.read().strip()
    tag_folder = os.path.join(folder, tag)
    if not tag or not os.path.isdir(tag_folder):
        raise IncompleteCheckpointError(f"{tag_file} names {tag!r}, which is not in {folder}")
    names = os.listdir(tag_folder)
    if not any(name.endswith("optim_states.pt") for name in names):
        raise IncompleteCheckpointError(f"{tag_folder} holds no optimizer state (*optim_states.pt)")
    return [os.path.join(tag, name) for name in sorted(names)]


def required_files(folder: str, weight_files: tuple[tuple[str, ...], ...]) -> list[str]:
    """What resuming reads: trainer state, optimizer state (transformers' or the DeepSpeed
    engine's) and the stage's weights (each entry: alternatives, one of which must exist)."""
    required = [TRAINER_STATE]
    if os.path.exists(os.path.join(folder, DEEPSPEED_LATEST)):
        required.append(DEEPSPEED_LATEST)
        required.extend(deepspeed_state_files(folder))
    else:
        required.append(OPTIMIZER)
    for alternatives in weight_files:
        present = [name for name in alternatives if os.path.exists(os.path.join(folder, name))]
        required.append(present[0] if present else alternatives[0])
    return required


def verify_checkpoint(folder: str, weight_files: tuple[tuple[str, ...], ...]) -> None:
    """A checkpoint fit to resume from, or IncompleteCheckpointError naming what is wrong:
    not committed, a required file missing, a file shorter than when it was committed, or a
    file that cannot be read (truncated safetensors, torch zip or JSON)."""
    if not os.path.isdir(folder):
        raise IncompleteCheckpointError(f"{folder} is not a folder")
    if not is_complete(folder):
        raise IncompleteCheckpointError(
            f"{folder} has no {COMPLETE_MARKER} marker: its save did not finish (a crash or kill "
            "while it was written), so it cannot be trusted"
        )
    sizes = marked_sizes(folder) or {}
    required = required_files(folder, weight_files)
    for name in sorted(set(required) | set(sizes)):
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            raise IncompleteCheckpointError(f"{path} is missing: the checkpoint cannot resume")
        if name in sizes and os.path.getsize(path) != sizes[name]:
            raise IncompleteCheckpointError(
                f"{path} has {os.path.getsize(path)} bytes, {sizes[name]} when it was saved"
            )
        try:
            check_readable(path)
        except UnreadableFileError as error:
            raise IncompleteCheckpointError(str(error)) from None
    rng_files = [name for name in os.listdir(folder) if name.startswith("rng_state")]
    if not rng_files:
        raise IncompleteCheckpointError(f"{folder} holds no random state (rng_state*.pth)")


def checkpoint_state(folder: str) -> dict[str, Any]:
    """The checkpoint's trainer_state.json (global_step, max_steps, log_history, ...)."""
    try:
        return read_json_object(os.path.join(folder, TRAINER_STATE))
    except UnreadableFileError as error:
        raise IncompleteCheckpointError(str(error)) from None


# -- the final save -------------------------------------------------------------------------------
def staging_folder(output_dir: str) -> str:
    return os.path.join(output_dir, FINAL_STAGING)


def publish(staging: str, output_dir: str) -> list[str]:
    """Move the staged final files into output_dir (each rename atomic); remove the staging."""
    names = sorted(os.listdir(staging))
    for name in names:
        path = os.path.join(staging, name)
        if os.path.isfile(path):
            sync_path(path)
    for name in names:
        target = os.path.join(output_dir, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        os.replace(os.path.join(staging, name), target)
    os.rmdir(staging)
    sync_path(output_dir)
    return names


def stage_model_files_of(checkpoint: str, staging: str) -> list[str]:
    """Copy a checkpoint's model files (not its resume state) into the staging folder."""
    os.makedirs(staging, exist_ok=True)
    copied = []
    for name in sorted(os.listdir(checkpoint)):
        if RUN_STATE_PATTERN.match(name):
            continue
        source = os.path.join(checkpoint, name)
        if os.path.isdir(source):
            shutil.copytree(source, os.path.join(staging, name))
        else:
            shutil.copy2(source, os.path.join(staging, name))
        copied.append(name)
    shutil.copy2(os.path.join(checkpoint, TRAINER_STATE), os.path.join(staging, TRAINER_STATE))
    return copied
