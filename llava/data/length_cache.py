"""Start-up at scale: a JSON or JSONL file's rows kept as byte ranges, and a cache of what
building found.

`JsonRecords` reads a LLaVA .json list once, streaming, for the byte range of each row (nothing
of a row is kept); `JsonlRecords` does the same for a .jsonl file, a row per non-blank line
(newlines found in large binary reads). A row is read again (`os.pread`) and parsed into a
`Record` only when a sample is loaded, so no rank or loader worker holds a Python object tree
per record. Either gives the same records and bad-record errors as formats' whole-file readers.
Tar shards (llava.data.shards.ShardRecords) and local Hugging Face datasets
(llava.data.hf_rows.HfRecords, memory-mapped) are `RowReader`s too.

`LengthCache` stores what building the dataset found per record (its length and images kept,
or why it was dropped or bad) and the rows' byte ranges (a Hugging Face dataset's: one range of
row numbers), in one `.npz` file next to the data (`<data>.lengths-<key>.npz`, beside a
dataset's folder; elsewhere when that folder is read-only). Its key hashes everything the
result depends on: the data files (path, size, modification time, inode; every shard, every
Arrow or parquet file of a Hugging Face dataset), the reader's options, the tokenizer (its
whole serialized state), the template, the image tokens, model_max_length and the image mode;
for an AnyRes dataset (llava.data.anyres_data) also every AnyRes setting, for a transformers
processor's (llava.data.processor_media) the processor (`processor_fingerprint`), and for both
max_image_pixels, so a start from the cache reads no image header either. A changed input gives another key, so a stale cache is never read; the key
is also stored inside and compared. Image files are not part of the key: after fixing a missing
or broken image (or, with AnyRes or a processor, replacing one by an image of another size),
delete the cache (or touch the data file).

With several ranks (torch.distributed initialized), rank 0 builds and writes the cache while the
others wait at a barrier and then read it; one that cannot see the file (no shared disk) builds
its own, forking its share of its machine's CPUs (the machine's ranks, LOCAL_WORLD_SIZE or
LOCAL_SIZE, all build at once). LLAVA_LENGTH_CACHE=0 turns the cache off; LLAVA_LENGTH_CACHE_DIR
puts it elsewhere.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import os
import re
import zipfile
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from llava.data.formats import (
    JSONL_LINE_ERRORS,
    BadRecordError,
    Columns,
    DataFileError,
    Record,
    bad_jsonl_line,
    detect_columns,
    json_row_record,
    jsonl_value,
    read_json_list,
)

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
WINDOW_BYTES = 64 << 20  # a JSON or JSONL file is scanned this many bytes at a time
NEWLINE = ord("\n")
WHITESPACE = re.compile(r"[ \t\n\r]*")
T = TypeVar("T")


# -- a JSON list as byte ranges -------------------------------------------------------------------
class RowScan:
    """What one pass over a JSON list finds: each row's byte range and the keys the rows use."""

    def __init__(self):
        self.starts, self.ends = array("q"), array("q")
        self.keys: set[str] = set()
        self.first: dict | None = None  # the first object row
        self.sample: dict | None = None  # the first one with text to detect the layout from

    def add(self, row: Any, start: int, end: int, text_field: str | None) -> None:
        self.starts.append(start)
        self.ends.append(end)
        if isinstance(row, dict):
            self.keys.update(row)
            self.first = self.first if self.first is not None else row
            if self.sample is None and (row.get(text_field or "") or row.get("messages")):
                self.sample = row

    def ranges(self) -> tuple[np.ndarray, np.ndarray]:
        return np.frombuffer(self.starts, np.int64), np.frombuffer(self.ends, np.int64)

    def columns(self, path: str, text_field: str | None, image_field: str | None) -> Columns | None:
        """The rows' layout as formats.json_columns finds it from the whole file (None when no
        row is an object); one it cannot tell is formats' DataFileError."""
        if self.first is None:
            return None
        try:
            return detect_columns(self.keys, self.sample or self.first, text_field, image_field)
        except ValueError as error:
            raise DataFileError(path, str(error)) from None


class TextWindow:
    """A UTF-8 file's text, decoded `WINDOW_BYTES` at a time, and the byte offset of a position."""

    def __init__(self, file: Any):
        self.file = file
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        head = file.read(3)
        bom = head == codecs.BOM_UTF8
        self.text, self.at_end = "" if bom else self.decoder.decode(head), False
        self.cursor = (0, 3 if bom else 0)  # (position, its byte offset); positions only grow
        self.ascii = True

    def byte(self, pos: int) -> int:
        at, offset = self.cursor
        offset += pos - at if self.ascii else len(self.text[at:pos].encode("utf-8"))
        self.cursor = (pos, offset)
        return offset

    def refill(self, pos: int) -> bool:
        """Drop the text before `pos` and read on; False at the end of the file."""
        if self.at_end:
            return False
        offset = self.byte(pos)
        chunk = self.file.read(WINDOW_BYTES)
        self.at_end = not chunk
        self.text = self.text[pos:] + self.decoder.decode(chunk, final=self.at_end)
        self.cursor, self.ascii = (0, offset), self.text.isascii()
        return True

    def skip(self, pos: int) -> tuple[int, bool]:
        """(position of the next non-blank character from `pos`, whether there is one)."""
        while True:
            pos = WHITESPACE.match(self.text, pos).end()
            if pos < len(self.text):
                return pos, True
            if not self.refill(pos):
                return pos, False
            pos = 0

    def value(self, decoder: json.JSONDecoder, pos: int) -> tuple[Any, int, int] | None:
        """(value, start, end) of the JSON value at `pos`, reading on while the window's end cuts
        it; None when it is invalid."""
        while True:
            try:
                value, end = decoder.raw_decode(self.text, pos)
                after = WHITESPACE.match(self.text, end).end()
                # a delimiter must follow in the window: a number may go on after its end
                if self.at_end or (after < len(self.text) and self.text[after] in ",]"):
                    return value, pos, end
            except json.JSONDecodeError:
                if self.at_end:
                    return None
            if self.refill(pos):
                pos = 0


def scan_json_list(path: str, text_field: str | None) -> RowScan | None:
    """The rows of a JSON list, read a window at a time; None when the file is not a non-empty
    list of JSON values (formats.read_json_list then says what is wrong)."""
    scan, decoder = RowScan(), json.JSONDecoder()
    try:
        with open(path, "rb") as f:
            window = TextWindow(f)
            pos, found = window.skip(0)
            if not found or window.text[pos] != "[":
                return None
            pos, found = window.skip(pos + 1)
            if not found or window.text[pos] == "]":
                return None  # truncated, or an empty list
            while True:
                decoded = window.value(decoder, pos)
                if decoded is None:
                    return None
                row, start, end = decoded
                start_byte = window.byte(start)
                scan.add(row, start_byte, window.byte(end), text_field)
                pos, found = window.skip(end)
                if not found or window.text[pos] not in ",]":
                    return None
                if window.text[pos] == "]":
                    break
                pos, found = window.skip(pos + 1)
                if not found:
                    return None
            _, trailing = window.skip(pos + 1)
            return None if trailing else scan
    except UnicodeDecodeError:
        return None


class RowReader:
    """Records read one row at a time: `item(row)` gives a Record or the reader's
    BadRecordError; subclasses say how (JsonRecords and JsonlRecords here,
    llava.data.shards.ShardRecords, llava.data.hf_rows.HfRecords)."""

    def __len__(self) -> int:
        raise NotImplementedError

    def item(self, row: int) -> Record | BadRecordError:
        raise NotImplementedError

    def record(self, row: int) -> Record:
        item = self.item(row)
        if isinstance(item, BadRecordError):
            raise item
        return item

    def __iter__(self) -> Iterator[Record | BadRecordError]:
        return (self.item(row) for row in range(len(self)))


class JsonRecords(RowReader):
    """The rows of a LLaVA .json list as byte ranges; `record(row)` reads and parses one.

    Pickles without its open file (loader workers started by spawn reopen it)."""

    def __init__(
        self,
        path: str,
        starts: np.ndarray,
        ends: np.ndarray,
        columns: Columns | None,
        base_folder: str,
    ):
        self.path, self.columns, self.base_folder = path, columns, base_folder
        self.starts = np.asarray(starts, dtype=np.int64)
        self.ends = np.asarray(ends, dtype=np.int64)
        self.fd: int | None = None
        self.fd_pid: int | None = None

    @classmethod
    def read(
        cls,
        path: str,
        image_folder: str | None = None,
        text_field: str | None = None,
        image_field: str | None = None,
    ) -> JsonRecords:
        """Scan a .json list; a file that is no list of records raises formats' DataFileError."""
        scan = scan_json_list(path, text_field)
        if scan is None:
            read_json_list(path)  # raises the reader's own error, naming the file
            raise DataFileError(path, "cannot be read as a JSON list of records")
        return cls(path, *scan.ranges(), scan.columns(path, text_field, image_field),
                   image_folder or os.path.dirname(os.path.abspath(path)))  # fmt: skip

    def __len__(self) -> int:
        return len(self.starts)

    def raw(self, row: int) -> bytes:
        if self.fd is None or self.fd_pid != os.getpid():
            self.fd, self.fd_pid = os.open(self.path, os.O_RDONLY), os.getpid()
        start, end = int(self.starts[row]), int(self.ends[row])
        return os.pread(self.fd, end - start, start)

    def item(self, row: int) -> Record | BadRecordError:
        """Row `row` as a Record, or the BadRecordError the reader gives it."""
        value = json.loads(self.raw(row))
        return json_row_record(value, row, self.columns, self.path, self.base_folder)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "fd": None, "fd_pid": None}

    def __del__(self):
        if self.fd is not None and self.fd_pid == os.getpid():
            os.close(self.fd)


# -- a JSONL file as byte ranges ------------------------------------------------------------------
def file_lines(path: str) -> Iterator[tuple[int, int, bytes]]:
    """(number from 1, byte offset, bytes) of each line of a file, its newline included, as
    Python iterates a binary file; the newlines are found in reads of WINDOW_BYTES."""
    number, offset, rest = 0, 0, b""  # rest: the start of a line the last read cut
    with open(path, "rb") as f:
        while True:
            chunk = f.read(WINDOW_BYTES)
            data = rest + chunk
            cuts = (np.flatnonzero(np.frombuffer(data, np.uint8) == NEWLINE) + 1).tolist()
            if not chunk and (cuts[-1] if cuts else 0) < len(data):
                cuts.append(len(data))  # the last line, without a newline
            start = 0
            for end in cuts:
                number += 1
                yield number, offset + start, data[start:end]
                start = end
            if not chunk:
                return
            rest, offset = data[start:], offset + start


def scan_jsonl(path: str, text_field: str | None) -> tuple[RowScan, array]:
    """(the rows, each row's line number) of a JSONL file: a row per non-blank line (as
    formats.read_jsonl_rows counts them), the keys from those that parse as objects."""
    scan, numbers = RowScan(), array("q")
    for number, offset, line in file_lines(path):
        if not line.strip():
            continue
        try:
            row = jsonl_value(line)
        except JSONL_LINE_ERRORS:
            row = None  # a bad record, named when the row is read
        scan.add(row, offset, offset + len(line), text_field)
        numbers.append(number)
    return scan, numbers


class JsonlRecords(JsonRecords):
    """The non-blank lines of a .jsonl file as byte ranges (each with its newline, as the
    whole-file reader reads it); `record(row)` reads and parses one, a line that is no UTF-8
    JSON is the BadRecordError formats.read_jsonl_rows gives it (same message, same line).

    `numbers`: each row's line number, known from the scan; a reader reopened from the length
    cache has none and counts newlines for the rare bad line it reads (a warm start reads none:
    its bad records come from the cache)."""

    def __init__(
        self,
        path: str,
        starts: np.ndarray,
        ends: np.ndarray,
        columns: Columns | None,
        base_folder: str,
        numbers: np.ndarray | None = None,
    ):
        super().__init__(path, starts, ends, columns, base_folder)
        self.numbers = None if numbers is None else np.asarray(numbers, dtype=np.int64)

    @classmethod
    def read(
        cls,
        path: str,
        image_folder: str | None = None,
        text_field: str | None = None,
        image_field: str | None = None,
    ) -> JsonlRecords:
        """Scan a .jsonl file; one without a non-blank line raises formats' DataFileError."""
        scan, numbers = scan_jsonl(path, text_field)
        if not scan.starts:
            raise DataFileError(path, "no records (the file is empty)")
        return cls(path, *scan.ranges(), scan.columns(path, text_field, image_field),
                   image_folder or os.path.dirname(os.path.abspath(path)),
                   np.frombuffer(numbers, np.int64))  # fmt: skip

    def line_number(self, row: int) -> int:
        """Row `row`'s line number, from 1 (the file is open: `raw` read the row)."""
        if self.numbers is not None:
            return int(self.numbers[row])
        before, offset, end = 0, 0, int(self.starts[row])
        while offset < end:
            chunk = os.pread(self.fd, min(WINDOW_BYTES, end - offset), offset)
            if not chunk:
                break  # the file shrank: the cache key would have changed
            before, offset = before + chunk.count(b"\n"), offset + len(chunk)
        return before + 1

    def item(self, row: int) -> Record | BadRecordError:
        """Row `row` as a Record, or the BadRecordError the whole-file reader gives it."""
        line = self.raw(row)
        try:
            value = jsonl_value(line)
        except JSONL_LINE_ERRORS as error:
            return bad_jsonl_line(self.path, row, self.line_number(row), error)
        return json_row_record(value, row, self.columns, self.path, self.base_folder)


# -- the cache ------------------------------------------------------------------------------------
def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything of the tokenizer that its ids depend on."""
    digest = hashlib.sha256(type(tokenizer).__qualname__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        model = getattr(tokenizer, "sp_model", None)
        if model is not None:
            digest.update(model.serialized_model_proto())
        digest.update(repr(getattr(tokenizer, "legacy", None)).encode())
    specials = {
        "map": tokenizer.special_tokens_map,
        "added": sorted(getattr(tokenizer, "added_tokens_encoder", {}).items()),
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    digest.update(json.dumps(specials, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def processor_fingerprint(processor: Any) -> dict[str, Any]:
    """Everything of a transformers processor (besides its tokenizer, `tokenizer_fingerprint`'s)
    that a processor dataset's ids and lengths depend on (llava.data.processor_media): its
    class, the chat template `--version auto` renders with, its own serialized settings
    (`image_seq_len`, ...), its image processor's whole serialized settings (size, max_pixels,
    patch and merge size, tiling, ...) and its plain attributes (image tokens, 4.x's
    `image_seq_length`, ...), which its serialization leaves out on some lines."""
    image_processor = getattr(processor, "image_processor", None)
    attributes = {
        name: value
        for name, value in sorted(vars(processor).items())
        if isinstance(value, (str, int, float, bool, type(None)))
    }
    chat_template = getattr(processor, "chat_template", None)
    return {
        "class": type(processor).__qualname__,
        "chat_template": chat_template or getattr(processor.tokenizer, "chat_template", None),
        "settings": json.loads(processor.to_json_string()),
        "image_processor": {
            "class": type(image_processor).__qualname__,
            "settings": json.loads(image_processor.to_json_string()) if image_processor else None,
        },
        "attributes": attributes,
    }


def data_file_identity(path: str) -> dict[str, Any]:
    status = os.stat(path)
    return {
        "path": os.path.abspath(path),
        "size": status.st_size,
        "mtime_ns": status.st_mtime_ns,
        "inode": status.st_ino,
    }


def cache_folder(data_path: str, fallback: str | None) -> str:
    """Next to the data when that folder is writable; else LLAVA_LENGTH_CACHE_DIR, `fallback`
    (the run's output_dir) or ~/.cache/llava/lengths."""
    if os.environ.get("LLAVA_LENGTH_CACHE_DIR"):
        return os.environ["LLAVA_LENGTH_CACHE_DIR"]
    folder = os.path.dirname(os.path.abspath(data_path))
    if os.access(folder, os.W_OK):
        return folder
    home = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    return fallback or os.path.join(home, "llava", "lengths")


@dataclass
class CachedBuild:
    """What building a dataset found, per record of its source, and the source's byte ranges
    (llava.data.hf_rows.HfRecords': starts [0], ends [number of rows]).

    rows, lengths, num_images: per kept sample. counts: the DataSummary counters.
    bad: (index, reason, id) of each bad record in the order they were reported.
    """

    rows: np.ndarray
    lengths: np.ndarray
    num_images: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    columns: Columns | None
    base_folder: str
    counts: dict[str, int]
    bad: list[tuple[int, str, Any]]


class LengthCache:
    """One cache file for one key (see the module's docstring)."""

    def __init__(self, key: dict[str, Any], data_path: str, fallback_folder: str | None = None):
        self.key = key
        self.key_text = json.dumps(key, sort_keys=True, default=str)
        digest = hashlib.sha256(self.key_text.encode()).hexdigest()[:16]
        name = f"{os.path.basename(data_path)}.lengths-{digest}.npz"
        self.path = os.path.join(cache_folder(data_path, fallback_folder), name)

    @staticmethod
    def enabled() -> bool:
        return os.environ.get("LLAVA_LENGTH_CACHE", "1") != "0"

    def load(self) -> CachedBuild | None:
        """The cached build, or None when there is none for this key (or it cannot be read)."""
        if not os.path.isfile(self.path):
            return None
        try:
            with np.load(self.path, allow_pickle=False) as arrays:
                meta = json.loads(arrays["meta"].tobytes())
                if meta["key"] != self.key_text:
                    logger.warning("length cache %s has another key; rebuilding", self.path)
                    return None
                columns = Columns(**meta["columns"]) if meta["columns"] else None
                return CachedBuild(
                    *(arrays[name] for name in ("rows", "lengths", "num_images", "starts", "ends")),
                    columns=columns,
                    base_folder=meta["base_folder"],
                    counts=meta["counts"],
                    bad=[tuple(item) for item in meta["bad"]],
                )
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            logger.warning("length cache %s unreadable (%s); rebuilding", self.path, error)
            return None

    def save(self, build: CachedBuild) -> None:
        """Written whole to a temporary name, then renamed: a reader never sees half a file."""
        meta = {
            "key": self.key_text,
            "columns": build.columns.__dict__ if build.columns else None,
            "base_folder": build.base_folder,
            "counts": build.counts,
            "bad": [list(item) for item in build.bad],
        }
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        temporary = f"{self.path}.{os.getpid()}.tmp"
        try:
            with open(temporary, "wb") as f:
                np.savez(
                    f,
                    meta=np.frombuffer(json.dumps(meta, default=str).encode(), np.uint8),
                    rows=build.rows,
                    lengths=build.lengths,
                    num_images=build.num_images,
                    starts=build.starts,
                    ends=build.ends,
                )
            os.replace(temporary, self.path)
        except OSError as error:
            logger.warning("could not write the length cache %s: %s", self.path, error)
            if os.path.exists(temporary):
                os.remove(temporary)
            return
        logger.info("length cache written: %s", self.path)


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) of an initialized torch.distributed group, else (0, 1)."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def ranks_on_this_machine() -> int:
    """How many ranks the launcher started on this machine: torchrun's LOCAL_WORLD_SIZE,
    DeepSpeed's LOCAL_SIZE; 1 when neither says."""
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if os.environ.get(name, "").isdigit():
            return max(1, int(os.environ[name]))
    return 1


def builders_at_once() -> int:
    """How many ranks of this machine may build at once when each builds its own (no cache
    shared between them): they share its CPUs."""
    return ranks_on_this_machine() if distributed_rank()[1] > 1 else 1


def built_once(cache: LengthCache, build: Callable[[int], T], use: Callable[[CachedBuild], T]) -> T:
    """`use(cached)` when the cache holds this key, else `build(builders)` (which saves the
    cache; `builders`: the ranks of this machine building at the same time, which share its
    CPUs). With several ranks every rank takes the same steps, whatever it finds: rank 0 uses
    or builds (alone: 1) while the others wait at one barrier, then they use the cache (ranks
    that still find none, having no shared disk or because rank 0 failed, build on their own,
    all of this machine's at once: `builders_at_once`). A rank deciding alone whether to wait
    could skip the barrier rank 0 waits in (the cache written in between) and leave the
    group's collectives out of step."""
    rank, world_size = distributed_rank()
    if world_size == 1:
        return cached_or_built(cache, lambda: build(1), use)
    import torch

    if rank == 0:
        try:
            return cached_or_built(cache, lambda: build(1), use)
        finally:
            torch.distributed.barrier()  # the others wait for the cache, or for rank 0's failure
    torch.distributed.barrier()
    return cached_or_built(cache, lambda: build(ranks_on_this_machine()), use)


def cached_or_built(
    cache: LengthCache, build: Callable[[], T], use: Callable[[CachedBuild], T]
) -> T:
    cached = cache.load()
    if cached is None:
        return build()
    logger.warning("lengths from the cache %s", cache.path)
    return use(cached)
