"""The list of bad records a --skip_bad_records run skipped: written by every process, merged once.

Each process (every rank and every loader worker) appends what it skips to its own part file,
`<output_dir>/skipped_records.parts/<host>-<pid>.jsonl`, one complete line per write, so no two
writers share a file and a killed run leaves whole lines. At the end rank 0 calls
`collect_skipped_records`, which merges the parts (and the list of an earlier, resumed run) into
`<output_dir>/skipped_records.jsonl`, one line per record: data file, index, id, reason and
where it was found ("load": by a check while building the dataset, same on every rank;
"decode": when its sample was loaded).
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import socket
from typing import Any

from llava.data.formats import BadRecordError

logger = logging.getLogger(__name__)

SKIPPED_RECORDS = "skipped_records.jsonl"
PARTS_FOLDER = "skipped_records.parts"
LOAD, DECODE = "load", "decode"


def skipped_entry(error: BadRecordError, found: str) -> dict[str, Any]:
    return {
        "data_file": error.source,
        "index": error.index,
        "id": error.record_id,
        "reason": error.reason,
        "found": found,
    }


class SkipLog:
    """Records this process skipped; appended to its part file when `folder` is given.

    `add` tells whether a record is new to this process, so a bad sample met again (another
    epoch, a replacement chain) is written and reported once per process; duplicates across
    processes are removed by `collect_skipped_records`.
    """

    def __init__(self, folder: str | None = None):
        self.folder = folder
        self.seen: set[tuple[str, int]] = set()

    def part_path(self) -> str:
        # The pid is read at write time: loader workers are processes of their own.
        name = f"{socket.gethostname()}-{os.getpid()}.jsonl"
        return os.path.join(self.folder, PARTS_FOLDER, name)

    def add(self, error: BadRecordError, found: str) -> bool:
        key = (error.source, error.index)
        if key in self.seen:
            return False
        self.seen.add(key)
        if self.folder is not None:
            path = self.part_path()
            os.makedirs(os.path.dirname(path), exist_ok=True)
            line = json.dumps(skipped_entry(error, found), ensure_ascii=False) + "\n"
            with open(path, "a", encoding="utf-8") as f:  # one write of one whole line
                f.write(line)
        return True


def read_entries(path: str) -> list[dict[str, Any]]:
    """The entries of a part or list file; a cut-off line (a killed writer) is reported, not kept."""
    entries = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("%s line %d is cut off (a killed process?); ignored", path, number)
    return entries


def collect_skipped_records(output_dir: str) -> int:
    """Merge every part file and any earlier list into `<output_dir>/skipped_records.jsonl`.

    Records are deduplicated by (data file, index) and sorted; the file is replaced atomically
    and the parts removed. Call it on one process (rank 0) once every process has stopped
    reading data (after a barrier). Returns the number of records skipped in all.
    """
    final = os.path.join(output_dir, SKIPPED_RECORDS)
    parts = sorted(glob.glob(os.path.join(output_dir, PARTS_FOLDER, "*.jsonl")))
    entries: dict[tuple[str, int], dict[str, Any]] = {}
    for path in ([final] if os.path.exists(final) else []) + parts:
        for entry in read_entries(path):
            entries.setdefault((entry["data_file"], entry["index"]), entry)
    os.makedirs(output_dir, exist_ok=True)
    temporary = f"{final}.tmp-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as f:
        for key in sorted(entries):
            f.write(json.dumps(entries[key], ensure_ascii=False) + "\n")
    os.replace(temporary, final)
    for path in parts:
        os.remove(path)
    with contextlib.suppress(OSError):  # absent, or holding something that is not ours
        os.rmdir(os.path.join(output_dir, PARTS_FOLDER))
    return len(entries)


def skipped_records_line(total: int, output_dir: str) -> str:
    """The run's closing line about skipped records."""
    listed = os.path.join(output_dir, SKIPPED_RECORDS)
    return f"skipped {total} bad records in all (every rank, loader worker and epoch): {listed}"
