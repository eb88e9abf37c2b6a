"""Webdataset-style tar shards as training data: `--data_path 'shards/{000..099}.tar'`.

The data path is brace-expanded as bash and webdataset do (`{000..099}`: a numeric range,
zero-padded when an end has a leading zero; `{a,b}`: a list; several and nested braces), or is
one plain `.tar` path. Each shard is an uncompressed tar on any mounted filesystem (local disk,
NFS, Lustre, a FUSE mount of a bucket); http/s3 pipe streams (`pipe:curl ...`) are not
supported, because samples are read by byte offset.

Layout (the webdataset convention): a member's key is its name up to the first dot of its base
name (`train/000042.0.png` -> key `train/000042`, extension `0.png`); a sample is the run of
consecutive members sharing a key:

    KEY.json             the LLaVA record: {"id", "conversations", "image"/"images"?} (or any
                         record the JSON readers take: messages, caption, question/answer)
    KEY.jpg              its one image (or .jpeg .png .webp .bmp .gif .tif .tiff), or
    KEY.0.png KEY.1.png  its several images, numbered from 0 in <image> tag order

A sample with KEY.json alone is text-only. The json's `image`/`images` field is not read as a
path: when present it must name as many images as the sample has image members (a record that
names an image the shard lacks is bad); a json without an `id` takes the key. Other members (KEY.txt, KEY.cls, ...), directories and
names without a dot are ignored. `--image_folder` does not apply.

Start-up reads only the tar headers (member name, data offset, size), one thread per shard up
to SCAN_THREADS, and keeps each sample as the byte range of its members; `ShardRecords` has
`JsonRecords`' interface, so the dataset keeps only row numbers, a sample's JSON is read
(`os.pread`) and parsed when it is loaded, its images are decoded only in `__getitem__` (the
loader workers), and the length cache keys on every shard's path, size and mtime: a second
start reads no tar at all. The order is the seeded, resumable sampler's over these rows.

A shard that is missing, unreadable, truncated or corrupt raises `DataFileError` naming it (and
the member where it breaks); a sample without KEY.json, with a JSON that is no record, with an
image it names but lacks, or with more <image> tags than images is a `BadRecordError` whose
reason names the shard and member (skipped and listed with --skip_bad_records).
"""

from __future__ import annotations

import json
import mmap
import os
import re
import tarfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llava.data.formats import (
    IMAGE_COLUMNS,
    VIDEO_COLUMNS,
    BadRecordError,
    Columns,
    DataFileError,
    Record,
    detect_columns,
    parse_row,
    row_images,
)
from llava.data.length_cache import RowReader, data_file_identity

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
NUMBERED_IMAGE = re.compile(rf"(\d+)\.({'|'.join(IMAGE_EXTENSIONS)})")
# webdataset's split of a member name into (key, extension); names it does not match are ignored
MEMBER_NAME = re.compile(r"^((?:.*/|)[^./][^./]*)\.([^/]*)$")
COMPRESSED = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")
BLOCK = tarfile.BLOCKSIZE
MAX_EXPANSION = 1_000_000  # names one pattern may expand to
MAX_OPEN_SHARDS = 64  # file descriptors a process keeps open at once
SCAN_THREADS = 8


# -- the data path --------------------------------------------------------------------------------
def is_shard_path(data_path: str) -> bool:
    """Whether --data_path names tar shards: a .tar path, or a brace pattern that is no file."""
    if data_path.endswith((".tar", *COMPRESSED)):
        return True
    return "{" in data_path and not os.path.exists(data_path)


def closing_brace(pattern: str, opening: int) -> int:
    depth = 0
    for position in range(opening, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[position], 0)
        if depth == 0:
            return position
    raise ValueError(f"unclosed '{{' at character {opening} of {pattern!r}")


def top_level_commas(body: str) -> list[int]:
    depth, commas = 0, []
    for position, character in enumerate(body):
        depth += {"{": 1, "}": -1}.get(character, 0)
        if character == "," and depth == 0:
            commas.append(position)
    return commas


def brace_choices(body: str, pattern: str) -> list[str]:
    """The words one brace stands for: `a,b` (each expanded again) or `N..M` (zero-padded to
    the wider end when one starts with 0, descending when N > M)."""
    commas = top_level_commas(body)
    if commas:
        bounds = zip([-1, *commas], [*commas, len(body)])
        return [word for a, b in bounds for word in expand_braces(body[a + 1 : b])]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric is None:
        raise ValueError(
            f"{{{body}}} in {pattern!r} is neither a list {{a,b}} nor a numeric range {{000..099}}"
        )
    first, last = numeric.groups()
    padded = any(len(end) > 1 and end.startswith("0") for end in (first, last))
    width = max(len(first), len(last)) if padded else 0
    step = 1 if int(last) >= int(first) else -1
    if abs(int(last) - int(first)) >= MAX_EXPANSION:
        raise ValueError(f"{{{body}}} in {pattern!r} names more than {MAX_EXPANSION} shards")
    return [str(n).zfill(width) for n in range(int(first), int(last) + step, step)]


def expand_braces(pattern: str) -> list[str]:
    """Every name a brace pattern stands for, in order, as bash writes them:
    `s/{000..002}.tar` -> s/000.tar s/001.tar s/002.tar; `{a,b}{1..2}` -> a1 a2 b1 b2."""
    opening, closing = pattern.find("{"), pattern.find("}")
    if opening < 0 or 0 <= closing < opening:
        if closing >= 0:
            raise ValueError(f"unmatched '}}' at character {closing} of {pattern!r}")
        return [pattern]
    closing = closing_brace(pattern, opening)
    head, body, tail = pattern[:opening], pattern[opening + 1 : closing], pattern[closing + 1 :]
    rests = expand_braces(tail)
    names = [head + word + rest for word in brace_choices(body, pattern) for rest in rests]
    if len(names) > MAX_EXPANSION:
        raise ValueError(f"{pattern!r} names more than {MAX_EXPANSION} shards")
    return names


@dataclass(frozen=True)
class ShardSet:
    """The shards a data path names, in its order, with what identifies each for the cache."""

    pattern: str
    paths: tuple[str, ...]
    sizes: tuple[int, ...]
    identity: tuple[dict[str, Any], ...]  # path, size, mtime, inode of each shard

    @classmethod
    def find(cls, pattern: str) -> ShardSet:
        """The shards of `pattern`; a bad pattern, a missing, compressed or empty shard raises
        DataFileError naming it."""
        try:
            paths = expand_braces(pattern)
        except ValueError as error:
            raise DataFileError(pattern, f"bad shard pattern: {error}") from None
        for path in paths:
            if path.endswith(COMPRESSED):
                raise DataFileError(path, "compressed shards cannot be read by offset: use .tar")
            if not path.endswith(".tar"):
                raise DataFileError(path, "shards must be uncompressed .tar files")
        repeated = sorted({path for path in paths if paths.count(path) > 1})
        if repeated:
            raise DataFileError(pattern, f"names shard {repeated[0]} more than once")
        missing = [path for path in paths if not os.path.isfile(path)]
        if len(missing) == len(paths):
            raise DataFileError(
                pattern, f"no shard found: none of its {len(paths)} files exists ({paths[0]}...)"
            )
        if missing:
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise DataFileError(pattern, f"{len(missing)} of {len(paths)} shards missing: {shown}")
        identity = tuple(data_file_identity(path) for path in paths)
        for path, status in zip(paths, identity):
            if status["size"] == 0:
                raise DataFileError(path, "empty file (not a tar shard)")
        return cls(pattern, tuple(paths), tuple(s["size"] for s in identity), identity)

    @property
    def cache_path(self) -> str:
        """The path the length cache is named after: the pattern's name in the first shard's
        folder (`shards/{000..099}.tar.lengths-<key>.npz`)."""
        return os.path.join(os.path.dirname(self.paths[0]), os.path.basename(self.pattern))


# -- reading shards -------------------------------------------------------------------------------
def member_key(name: str) -> tuple[str, str] | None:
    """(key, lower-case extension) of a member name, None for a name webdataset ignores."""
    match = MEMBER_NAME.match(name)
    return None if match is None else (match.group(1), match.group(2).lower())


def padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


class ShardFiles:
    """Read-only descriptors of the shards this process reads (at most MAX_OPEN_SHARDS at once),
    for `os.pread`. Thread-safe; pickles without them (loader workers open their own)."""

    def __init__(self):
        self.fds: dict[str, int] = {}  # least recently used first
        self.lock = threading.Lock()

    def read(self, path: str, offset: int, size: int) -> bytes:
        with self.lock:
            fd = self.fds.pop(path, None)
            if fd is None:
                if len(self.fds) >= MAX_OPEN_SHARDS:
                    os.close(self.fds.pop(next(iter(self.fds))))
                fd = os.open(path, os.O_RDONLY)
            self.fds[path] = fd
            data = os.pread(fd, size, offset)
        if len(data) != size:
            raise OSError(f"{size} bytes expected at byte {offset}, the file ends (it changed?)")
        return data

    def close(self) -> None:
        with self.lock:
            for fd in self.fds.values():
                os.close(fd)
            self.fds = {}

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def __del__(self):
        self.close()


class SpanFile:
    """The bytes [start, end) of a shard as a seekable file, read with pread: tarfile reads the
    headers of one sample's members through it and seeks over their data."""

    def __init__(self, files: ShardFiles, path: str, start: int, end: int):
        self.files, self.path, self.start, self.end = files, path, start, end
        self.position = 0

    def read(self, size: int = -1) -> bytes:
        available = self.end - self.start - self.position
        size = available if size < 0 else max(0, min(size, available))
        data = self.files.read(self.path, self.start + self.position, size) if size else b""
        self.position += len(data)
        return data

    def seek(self, position: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.position, 2: self.end - self.start}[whence]
        self.position = base + position
        return self.position

    def tell(self) -> int:
        return self.position

    def rewound(self) -> SpanFile:
        self.position = 0
        return self


def plain_header(block: bytes) -> tuple[str, int] | None:
    """(name, data size) of a regular file's ustar or GNU header with a valid checksum and an
    ASCII name; None for any other header (tarfile reads those)."""
    if len(block) != BLOCK or block[257:262] != b"ustar" or block[156:157] not in (b"0", b"\0"):
        return None
    try:
        checksum = int(block[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
        size = int(block[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        return None
    if checksum != sum(block[:148]) + 8 * ord(" ") + sum(block[156:]):
        return None
    name = block[:100].split(b"\0", 1)[0]
    prefix = block[345:500].split(b"\0", 1)[0] if block[257:263] == b"ustar\0" else b""
    name = prefix + b"/" + name if prefix else name
    if not name.isascii() or name.endswith(b"/"):
        return None
    return name.decode("ascii"), size


def plain_members(span: SpanFile) -> list[tarfile.TarInfo] | None:
    """A sample's members (offsets from the span's start) as tarfile gives them, read from its
    headers alone without tarfile's machinery (the cold build reads every row's), or None when
    one header is not plain (see plain_header)."""
    members, position, length = [], 0, span.end - span.start
    while position < length:
        span.seek(position)
        header = plain_header(span.read(BLOCK))
        if header is None:
            return None
        name, size = header
        if member_key(name) is not None:
            member = tarfile.TarInfo(name)
            member.size, member.offset, member.offset_data = size, position, position + BLOCK
            members.append(member)
        position += BLOCK + padded(size)
    return members


@dataclass(frozen=True)
class ShardMember:
    """An image member of a shard, read (os.pread) only when a sample is loaded."""

    files: ShardFiles = field(repr=False, compare=False)
    path: str
    name: str
    offset: int  # of its data in the shard
    size: int

    def fetch(self) -> bytes:
        """The member's bytes (what llava.data.images decodes)."""
        try:
            return self.files.read(self.path, self.offset, self.size)
        except OSError as error:
            raise ValueError(f"{self.path} member {self.name}: {error}") from None


def plain_scan(path: str, size: int) -> tuple[list[int], list[int]] | None:
    """scan_shard's result read from plain headers alone (see plain_header), through a memory
    map: a cold build reads every header of every shard before it forks, so tarfile's
    machinery there is minutes at 665K samples. None when a header is not plain, a member runs
    past the file's end or the end-of-archive marker is missing: tarfile reads that shard
    (and names what is wrong with it)."""
    starts: list[int] = []
    ends: list[int] = []
    last_key, position, end_marker = None, 0, bytes(BLOCK)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            while (block := data[position : position + BLOCK]) != end_marker:
                header = plain_header(block)
                if header is None:
                    return None
                name, member_size = header
                end = position + BLOCK + padded(member_size)
                if end > size:
                    return None
                key = member_key(name)
                if key is not None and key[0] == last_key:
                    ends[-1] = end
                elif key is not None:
                    starts.append(position)
                    ends.append(end)
                last_key, position = (key[0] if key else None), end
    except (OSError, ValueError):  # unreadable, or empty (mmap refuses those)
        return None
    return starts, ends


def scan_shard(path: str, size: int) -> tuple[list[int], list[int]]:
    """(starts, ends): the byte range of each sample's members (headers included), from the
    tar headers alone. A shard that cannot be read to its end-of-archive marker raises
    DataFileError naming it and the last member read."""
    plain = plain_scan(path, size)
    if plain is not None:
        return plain
    starts: list[int] = []
    ends: list[int] = []
    last_key, last_name = None, None
    try:
        with tarfile.open(path, mode="r:") as tar:
            while (member := tar.next()) is not None:
                tar.members.clear()  # tarfile keeps every header otherwise
                end = member.offset_data + padded(member.size)
                if end > size:
                    raise DataFileError(
                        path,
                        f"truncated: member {member.name} needs bytes up to {end}, "
                        f"the file ends at {size}",
                    )
                key = member_key(member.name) if member.isfile() else None
                if key is not None and key[0] == last_key:
                    ends[-1] = end
                elif key is not None:
                    starts.append(member.offset)
                    ends.append(end)
                last_key, last_name = (key[0] if key else None), member.name
            stop = tar.offset
    except tarfile.TarError as error:
        where = f"after member {last_name}" if last_name else "at its start"
        raise DataFileError(path, f"not a readable tar file ({where}): {error}") from None
    with open(path, "rb") as f:
        marker = os.pread(f.fileno(), BLOCK, stop)
    where = f"after member {last_name}" if last_name else "at its start"
    if not marker:
        raise DataFileError(path, f"truncated {where}: no end-of-archive marker")
    if marker != bytes(BLOCK):
        state = "truncated" if len(marker) < BLOCK else "corrupt"
        raise DataFileError(path, f"{state}: no valid tar header at byte {stop} ({where})")
    return starts, ends


class SampleError(ValueError):
    """What is wrong with one sample, and the member it concerns."""

    def __init__(self, member: str, reason: str):
        self.member = member
        super().__init__(reason)


def sample_parts(names: list[str]) -> tuple[str, int | None, list[int]]:
    """(key, position of KEY.json or None, positions of the images in tag order) among a
    sample's member names; SampleError for images that are not one KEY.jpg or KEY.0.jpg, ..."""
    parts = [member_key(name) for name in names]
    key = parts[0][0]
    for position, name in enumerate(names):
        if name in names[:position]:
            raise SampleError(name, f"member {name} appears twice")
    jsons = [k for k, (_, extension) in enumerate(parts) if extension == "json"]
    singles = [k for k, (_, extension) in enumerate(parts) if extension in IMAGE_EXTENSIONS]
    numbered = sorted(
        (int(match.group(1)), k)
        for k, (_, extension) in enumerate(parts)
        if (match := NUMBERED_IMAGE.fullmatch(extension))
    )
    if len(singles) > 1 or (singles and numbered):
        shown = ", ".join(names[k] for k in singles + [k for _, k in numbered])
        raise SampleError(
            names[singles[0]],
            f"several images ({shown}): name them {key}.0.jpg, {key}.1.jpg, ... in tag order",
        )
    if [number for number, _ in numbered] != list(range(len(numbered))):
        shown = ", ".join(names[k] for _, k in numbered)
        reason = f"image members {shown} must be numbered 0, 1, 2, ... once each"
        raise SampleError(names[numbered[0][1]], reason)
    images = singles or [k for _, k in numbered]
    return key, (jsons[0] if jsons else None), images


class ShardRecords(RowReader):
    """The samples of a shard set as byte ranges; `record(row)` reads and parses one.

    Same interface as llava.data.length_cache.JsonRecords (`read`, `record`, `item`, iteration,
    `starts`/`ends`/`columns`/`base_folder` for the length cache): row numbers count the samples
    over the shards in order, and a row's range is global (its shard's offset in the shards'
    concatenation plus its offset in the shard). Pickles without open files."""

    def __init__(
        self, shards: ShardSet, starts: np.ndarray, ends: np.ndarray, columns: Columns | None
    ):
        self.shards, self.columns = shards, columns
        self.path = shards.pattern  # the records' source, as for a JSON file
        self.base_folder = ""  # (the length cache's field: images are members, not paths)
        self.starts = np.asarray(starts, dtype=np.int64)
        self.ends = np.asarray(ends, dtype=np.int64)
        self.bases = np.cumsum([0, *shards.sizes[:-1]], dtype=np.int64)
        self.files = ShardFiles()

    @classmethod
    def read(
        cls, shards: str | ShardSet, text_field: str | None = None, image_field: str | None = None
    ) -> ShardRecords:
        """Index every shard by its headers and detect the record layout from the first JSON."""
        shards = ShardSet.find(shards) if isinstance(shards, str) else shards
        with ThreadPoolExecutor(min(SCAN_THREADS, len(shards.paths))) as pool:
            scans = list(pool.map(scan_shard, shards.paths, shards.sizes))
        bases = np.cumsum([0, *shards.sizes[:-1]])
        starts = [base + start for base, (found, _) in zip(bases, scans) for start in found]
        ends = [base + end for base, (_, found) in zip(bases, scans) for end in found]
        if not starts:
            raise DataFileError(
                shards.pattern,
                f"no samples: its {len(shards.paths)} shard(s) hold no member named KEY.EXT",
            )
        records = cls(shards, np.array(starts), np.array(ends), None)
        records.columns = records.detect_columns(text_field, image_field)
        return records

    def detect_columns(self, text_field: str | None, image_field: str | None) -> Columns | None:
        """The layout of the first sample whose JSON is an object (None when none is)."""
        for row in range(len(self)):
            try:
                path, members = self.members(row)
                value, member = self.json_value(path, members)
            except (SampleError, BadRecordError, OSError):
                continue
            if isinstance(value, dict):
                try:
                    return detect_columns(set(value), value, text_field, image_field)
                except ValueError as error:
                    raise DataFileError(path, f"member {member.name}: {error}") from None
        return None

    def __len__(self) -> int:
        return len(self.starts)

    def members(self, row: int) -> tuple[str, list[tarfile.TarInfo]]:
        """(shard path, the sample's regular members with offsets in the shard)."""
        shard = int(np.searchsorted(self.bases, self.starts[row], side="right")) - 1
        path, base = self.shards.paths[shard], int(self.bases[shard])
        start, end = int(self.starts[row]) - base, int(self.ends[row]) - base
        span = SpanFile(self.files, path, start, end)
        try:
            found = plain_members(span)
            if found is None:  # a header tarfile must read (pax, long names, ...), or a bad one
                with tarfile.open(fileobj=span.rewound(), mode="r:") as tar:
                    found = [m for m in tar if m.isfile() and member_key(m.name) is not None]
        except (tarfile.TarError, OSError) as error:
            reason = f"{path} bytes {start}-{end}: not the sample indexed there (changed?): {error}"
            raise BadRecordError(self.path, row, reason) from None
        if not found:
            reason = f"{path} bytes {start}-{end}: no sample there (the shard changed?)"
            raise BadRecordError(self.path, row, reason)
        for member in found:
            member.offset_data += start
        return path, found

    def json_value(self, path: str, members: list[tarfile.TarInfo]) -> tuple[Any, tarfile.TarInfo]:
        """(parsed KEY.json, its member); SampleError when it is missing or no JSON."""
        key, json_at, _ = sample_parts([m.name for m in members])
        if json_at is None:
            shown = ", ".join(m.name for m in members)
            raise SampleError(shown.split(", ")[0], f"{shown} without {key}.json")
        member = members[json_at]
        raw = self.files.read(path, member.offset_data, member.size)
        try:
            return json.loads(raw.decode("utf-8-sig")), member
        except UnicodeDecodeError as error:
            raise SampleError(member.name, f"not UTF-8 text: {error}") from None
        except json.JSONDecodeError as error:
            reason = f"invalid JSON: {error.msg} (line {error.lineno} column {error.colno})"
            raise SampleError(member.name, reason) from None

    def item(self, row: int) -> Record | BadRecordError:
        """Row `row` as a Record, or the BadRecordError that names its shard and member."""
        try:
            path, members = self.members(row)
        except BadRecordError as error:
            return error
        value: Any = None
        try:
            value, member = self.json_value(path, members)
            return self.parse(row, path, members, value, member)
        except SampleError as error:
            record_id = value.get("id") if isinstance(value, dict) else None
            reason = f"{path} member {error.member}: {error}"
            return BadRecordError(self.path, row, reason, record_id)
        except OSError as error:
            return BadRecordError(self.path, row, f"{path}: {error}")

    def parse(
        self,
        row: int,
        path: str,
        members: list[tarfile.TarInfo],
        value: Any,
        member: tarfile.TarInfo,
    ) -> Record:
        """A sample's parsed JSON and image members as a Record (SampleError when bad)."""
        if not isinstance(value, dict):
            kind = type(value).__name__
            raise SampleError(member.name, f"a record must be a JSON object, not {kind}")
        key, _, image_at = sample_parts([m.name for m in members])
        if any(value.get(name) is not None for name in VIDEO_COLUMNS):
            raise SampleError(member.name, "videos are not read from shards")
        images = [
            ShardMember(self.files, path, members[k].name, members[k].offset_data, members[k].size)
            for k in image_at
        ]
        fields = (self.columns.image if self.columns else None, *IMAGE_COLUMNS)
        named = row_images(value, next((name for name in fields if name in value), None))
        if named and len(named) != len(images):
            expected = (
                f"{key}.jpg (.png, ...)" if len(named) == 1 else f"{key}.0.jpg, {key}.1.jpg, ..."
            )
            held = ", ".join(image.name for image in images) or "none"
            raise SampleError(
                member.name,
                f"names {len(named)} image(s) {named!r} but the shard holds {len(images)} image "
                f"member(s) of the sample (expected {expected}; found: {held})",
            )
        value = value if "id" in value else {**value, "id": key}
        try:
            return parse_row(value, self.columns, images, self.path, row, None, check_files=False)
        except BadRecordError as error:
            raise SampleError(member.name, error.reason) from None
