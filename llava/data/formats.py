"""Readers for LLaVA JSON/JSONL, OpenAI-style messages and local Hugging Face datasets (and,
through llava.data.shards, webdataset-style tar shards).

Every reader yields the same `Record`: turns with roles (system, user, assistant) whose text
holds one `<image>` tag per image, and the record's images in tag order. Images stay
undecoded (a path, or a reference into a dataset's column) until the dataset loads a sample.
A record that cannot be trained on raises `BadRecordError`, which names the file and the
record's index and id; `load_records(..., skip_bad_records=True)` skips and counts them instead.
A data file that cannot be read as records at all (truncated, empty, not UTF-8, not a list of
records) raises `DataFileError`, which names the file.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from llava.constants import IMAGE_TOKEN, VIDEO_TOKEN
from llava.conversation import ASSISTANT, SYSTEM, USER, Turn
from llava.data.video import Video

# Role names of the supported formats, mapped to the internal ones.
ROLE_NAMES = {
    "human": USER,
    "user": USER,
    "gpt": ASSISTANT,
    "assistant": ASSISTANT,
    "model": ASSISTANT,
    "system": SYSTEM,
}
# Column names found automatically when no --dataset_text_field / --dataset_image_field is given.
CONVERSATION_COLUMNS = ("conversations", "messages")
CAPTION_COLUMNS = ("caption",)
QUESTION_COLUMNS = ("question", "query")
ANSWER_COLUMNS = ("answer", "label")
IMAGE_COLUMNS = ("images", "image")
VIDEO_COLUMNS = ("videos", "video")
MEDIA_TAG = re.compile(f"({re.escape(IMAGE_TOKEN)}|{re.escape(VIDEO_TOKEN)})")


class DataFileError(ValueError):
    """A data file that cannot be read as records; the message names the file."""

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"{path}: {reason}")


class BadRecordError(ValueError):
    """A record that cannot be trained on; the message names its file, index and id."""

    def __init__(self, source: str, index: int, reason: str, record_id: Any = None):
        self.source, self.index, self.reason, self.record_id = source, index, reason, record_id
        where = f"{source} record {index}" + (f" (id {record_id})" if record_id is not None else "")
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True)
class DatasetImage:
    """An image stored in a Hugging Face dataset column, read only when a sample is loaded."""

    dataset: Any  # datasets.Dataset; pickles by file reference for loader workers
    column: str
    row: int
    position: int | None  # index inside a list-of-images cell, None for a single image

    def fetch(self) -> Any:
        """The stored cell: a {"bytes", "path"} dict, bytes or a path."""
        value = self.dataset.data.column(self.column)[self.row].as_py()
        return value if self.position is None else value[self.position]


@dataclass(frozen=True)
class Record:
    """One training conversation and its media (in the order of its <image> tags): images, and
    videos (`llava.data.video.Video`) where the data wrote a <video> tag."""

    turns: tuple[Turn, ...]
    images: tuple[Any, ...]  # str path | bytes | dict | PIL image | DatasetImage | Video
    source: str
    index: int
    id: Any = None


@dataclass(frozen=True)
class Columns:
    """Where the text and images of a row are.

    kind: conversations (LLaVA `from`/`value`), messages (OpenAI `role`/`content`),
    caption (a stage-1 pair) or qa (`text` is the question, `answer` the answer).
    """

    kind: str
    text: str
    image: str | None = None
    answer: str | None = None


@dataclass
class LoadedRecords:
    """The records read from one data path and the bad ones skipped."""

    records: list[Record]
    source: str
    skipped: list[BadRecordError] = field(default_factory=list)


# -- turns ------------------------------------------------------------------------------------
def role_of(name: Any) -> str:
    if not isinstance(name, str) or name.lower() not in ROLE_NAMES:
        raise ValueError(f"unknown role {name!r} (known: {', '.join(ROLE_NAMES)})")
    return ROLE_NAMES[name.lower()]


def text_of(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"turn text must be a string, not {type(value).__name__}")
    return value


def llava_turns(conversation: Any) -> list[Turn]:
    """LLaVA `conversations`: [{"from": "human"|"gpt"|"system", "value": str}, ...]."""
    if not isinstance(conversation, list):
        raise ValueError("conversations must be a list of turns")
    for position, turn in enumerate(conversation):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {position} must be an object with 'from' and 'value'")
    return [Turn(role_of(t.get("from")), text_of(t.get("value"))) for t in conversation]


def inline_image(part: dict[str, Any]) -> Any:
    """The image an OpenAI content part carries itself, or None when it names none."""
    value = part.get("image", part.get("image_url", part.get("path", part.get("url"))))
    if isinstance(value, dict):
        value = value.get("url", value.get("path"))
    if isinstance(value, str) and value.startswith(("http://", "https://")):
        raise ValueError(f"remote image {value!r}: download it and give a local path")
    if isinstance(value, str) and value.startswith("file://"):
        value = value[len("file://") :]
    return value


def message_text(content: Any, inline_images: list[Any]) -> str:
    """Content as text: a string, or parts joined by newlines with <image> for image parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError("message content must be a string or a list of parts")
    pieces = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            pieces.append(text_of(part.get("text")))
        elif kind in ("image", "image_url"):
            pieces.append(IMAGE_TOKEN)
            image = inline_image(part)
            if image is not None:
                inline_images.append(image)
        else:
            raise ValueError(f"unknown content part {part!r}")
    return "\n".join(pieces)


def message_turns(messages: Any) -> tuple[list[Turn], list[Any]]:
    """OpenAI messages: [{"role", "content": str | [{"type": "text"|"image", ...}]}, ...]."""
    if not isinstance(messages, list):
        raise ValueError("messages must be a list")
    inline_images: list[Any] = []
    turns = [
        Turn(role_of(m.get("role")), message_text(m.get("content"), inline_images))
        for m in messages
    ]
    return turns, inline_images


def answer_text(value: Any) -> str:
    if isinstance(value, list) and value:  # VQA-style lists of reference answers
        value = value[0]
    return text_of(value if isinstance(value, str) else None if value is None else str(value))


# -- checks and LLaVA's normalisation ------------------------------------------------------------
def check_roles(turns: list[Turn]) -> list[Turn]:
    """An optional system turn, then user and assistant alternating, starting with the user.

    A leading assistant turn is dropped, as LLaVA does.
    """
    if not turns:
        raise ValueError("empty conversation")
    system = [turns[0]] if turns[0].role == SYSTEM else []
    dialog = turns[len(system) :]
    if dialog and dialog[0].role == ASSISTANT:
        dialog = dialog[1:]
    if not dialog:
        raise ValueError("empty conversation (no user turn)")
    for position, turn in enumerate(dialog):
        expected = USER if position % 2 == 0 else ASSISTANT
        if turn.role == SYSTEM:
            raise ValueError("a system turn may only come first")
        if turn.role != expected:
            raise ValueError(f"turn {position} is {turn.role} but {expected} was expected")
    return system + dialog


def place_image_tags(
    turns: list[Turn], num_images: int, move_single_tag: bool, tags_required: bool
) -> list[Turn]:
    """Check tags against images; with `tags_required` off, tag untagged images at the start of
    the first user turn (question/answer columns have no place for a tag).

    Where the text is written with tags (LLaVA conversations, messages), an image without one is
    an error: it would otherwise be trained on at a place the data never said. With one image
    and `move_single_tag` (LLaVA data), the tag moves to the front of its turn followed by a
    newline, exactly as LLaVA-1.5's preprocessing does.
    """
    num_tags = sum(turn.text.count(IMAGE_TOKEN) for turn in turns)
    if num_tags > num_images:
        raise ValueError(f"{num_tags} {IMAGE_TOKEN} tags but {num_images} images")
    if 0 < num_tags < num_images:
        raise ValueError(f"{num_images} images but only {num_tags} {IMAGE_TOKEN} tags")
    if num_tags == 0 and num_images > 0 and tags_required:
        raise ValueError(f"{num_images} images but no {IMAGE_TOKEN} tag in the text")
    first_user = next(i for i, turn in enumerate(turns) if turn.role == USER)
    turns = list(turns)
    if num_tags == 0 and num_images > 0:
        text = (IMAGE_TOKEN + "\n") * num_images + turns[first_user].text
        turns[first_user] = Turn(USER, text)
    elif num_images == 1 and move_single_tag:
        at = next(i for i, turn in enumerate(turns) if IMAGE_TOKEN in turn.text)
        text = turns[at].text.replace(IMAGE_TOKEN, "").strip()
        turns[at] = Turn(turns[at].role, IMAGE_TOKEN + "\n" + text)
    return turns


def interleave_videos(
    turns: list[Turn], images: list[Any], videos: list[Video]
) -> tuple[list[Turn], list[Any]]:
    """A record's videos join its media where their <video> tags are: each tag becomes an
    <image> tag and the media follow the text's tag order. In LLaVA-Video's records a video is
    tagged <image> (no <video> tag, no images): those tags then stand for the videos."""
    num_video_tags = sum(turn.text.count(VIDEO_TOKEN) for turn in turns)
    if num_video_tags != len(videos) and (num_video_tags or images):
        raise ValueError(f"{num_video_tags} {VIDEO_TOKEN} tags but {len(videos)} videos")
    if not videos:
        return turns, images
    if not num_video_tags:
        return turns, list(videos)
    num_image_tags = sum(turn.text.count(IMAGE_TOKEN) for turn in turns)
    if num_image_tags != len(images):  # (untagged images too: there is no order to put them in)
        raise ValueError(f"{num_image_tags} {IMAGE_TOKEN} tags but {len(images)} images")
    image_queue, video_queue = iter(images), iter(videos)
    media = [
        next(video_queue if tag == VIDEO_TOKEN else image_queue)
        for turn in turns
        for tag in MEDIA_TAG.findall(turn.text)
    ]
    turns = [Turn(turn.role, turn.text.replace(VIDEO_TOKEN, IMAGE_TOKEN)) for turn in turns]
    return turns, media


# -- rows -> records ------------------------------------------------------------------------
def row_images(row: dict[str, Any], column: str | None) -> list[Any]:
    value = row.get(column) if column else None
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def row_videos(row: dict[str, Any]) -> list[str]:
    """The video paths of a row (a `video` or `videos` field: one path or a list)."""
    for name in VIDEO_COLUMNS:
        if row.get(name) is not None:
            value = row[name]
            paths = list(value) if isinstance(value, (list, tuple)) else [value]
            if not all(isinstance(path, str) for path in paths):
                raise ValueError(f"{name} must be a video file path or a list of them")
            return paths
    return []


def resolve_image(image: Any, base_folder: str | None) -> Any:
    """Relative paths are taken from the image folder (or the data file's folder)."""
    if isinstance(image, str) and base_folder and not os.path.isabs(image):
        return os.path.join(base_folder, image)
    return image


def row_turns(row: dict[str, Any], columns: Columns, images: list[Any]) -> list[Turn]:
    """The turns of one row; inline message images are appended to `images`."""
    if columns.kind == "conversations":
        return llava_turns(row.get(columns.text))
    if columns.kind == "messages":
        turns, inline = message_turns(row.get(columns.text))
        if inline and images:
            raise ValueError("images both inside the messages and in the images column")
        images.extend(inline)
        return turns
    if columns.kind == "caption":
        return [
            Turn(USER, IMAGE_TOKEN * len(images)),
            Turn(ASSISTANT, answer_text(row.get(columns.text))),
        ]
    question = text_of(row.get(columns.text))
    return [Turn(USER, question), Turn(ASSISTANT, answer_text(row.get(columns.answer)))]


def parse_row(
    row: dict[str, Any],
    columns: Columns,
    images: list[Any],
    source: str,
    index: int,
    base_folder: str | None = None,
    check_files: bool = True,
) -> Record:
    """One row as a Record, or BadRecordError naming `source` and `index`."""
    record_id = row.get("id") if isinstance(row, dict) else None
    try:
        images = list(images)
        turns = check_roles(row_turns(row, columns, images))
        videos = [Video(resolve_image(path, base_folder)) for path in row_videos(row)]
        turns, images = interleave_videos(turns, images, videos)
        turns = place_image_tags(
            turns,
            len(images),
            move_single_tag=columns.kind == "conversations",
            tags_required=columns.kind in ("conversations", "messages"),
        )
        images = [resolve_image(image, base_folder) for image in images]
        for image in images:
            if check_files and isinstance(image, str) and not os.path.isfile(image):
                raise ValueError(f"image file {image!r} not found")
            if check_files and isinstance(image, Video) and not os.path.isfile(image.path):
                raise ValueError(f"video file {image.path!r} not found")
    except (ValueError, AttributeError, TypeError) as error:
        raise BadRecordError(source, index, str(error), record_id) from None
    return Record(tuple(turns), tuple(images), source, index, record_id)


# -- column layout ----------------------------------------------------------------------------
def kind_of_text(value: Any) -> str:
    """conversations, messages or caption, from a sample value of the text column."""
    if isinstance(value, str):
        return "caption"
    first = value[0] if isinstance(value, list) and value else {}
    return "messages" if isinstance(first, dict) and "role" in first else "conversations"


def first_present(names: tuple[str, ...], available: set[str]) -> str | None:
    return next((name for name in names if name in available), None)


def detect_columns(
    available: set[str],
    sample: dict[str, Any] | None,
    text_field: str | None = None,
    image_field: str | None = None,
) -> Columns:
    """The column layout: the flags when given, else the common names."""
    for name in (text_field, image_field):
        if name and name not in available:
            raise ValueError(f"column {name!r} not found; columns: {sorted(available)}")
    image = image_field or first_present(IMAGE_COLUMNS, available)
    if text_field:
        value = (sample or {}).get(text_field)
        return Columns(kind_of_text(value), text_field, image)
    conversation = first_present(CONVERSATION_COLUMNS, available)
    if conversation:
        kind = "messages" if conversation == "messages" else "conversations"
        if sample is not None and sample.get(conversation):
            kind = kind_of_text(sample[conversation])
        return Columns(kind, conversation, image)
    caption = first_present(CAPTION_COLUMNS, available)
    if caption:
        return Columns("caption", caption, image)
    question = first_present(QUESTION_COLUMNS, available)
    answer = first_present(ANSWER_COLUMNS, available)
    if question and answer:
        return Columns("qa", question, image, answer)
    raise ValueError(
        f"cannot tell the text columns among {sorted(available)}; "
        "give --dataset_text_field (and --dataset_image_field)"
    )


# -- JSON / JSONL -------------------------------------------------------------------------------
# what jsonl_value raises for a line that is not UTF-8 JSON
JSONL_LINE_ERRORS = (UnicodeDecodeError, json.JSONDecodeError)


def jsonl_value(line: bytes) -> Any:
    """The JSON value of one line of a .jsonl file (a BOM before it ignored), or one of
    JSONL_LINE_ERRORS. The whole-file reader and llava.data.length_cache.JsonlRecords both
    read lines through it and name bad ones with bad_jsonl_line, so the two agree."""
    return json.loads(line.decode("utf-8-sig"))


def bad_jsonl_line(path: str, index: int, number: int, error: ValueError) -> BadRecordError:
    """The BadRecordError of row `index` (line `number`, from 1) that jsonl_value could not read."""
    if isinstance(error, UnicodeDecodeError):
        return BadRecordError(path, index, f"line {number} is not UTF-8 text: {error}")
    reason = f"invalid JSON on line {number}: {error.msg} (column {error.colno})"
    return BadRecordError(path, index, reason)


def read_jsonl_rows(path: str) -> Iterator[tuple[int, Any]]:
    """(index, row) per non-blank line; a line that is not UTF-8 JSON comes as a BadRecordError."""
    with open(path, "rb") as f:
        lines = [(number, line) for number, line in enumerate(f, start=1) if line.strip()]
    if not lines:
        raise DataFileError(path, "no records (the file is empty)")
    for index, (number, line) in enumerate(lines):
        try:
            yield index, jsonl_value(line)
        except JSONL_LINE_ERRORS as error:
            yield index, bad_jsonl_line(path, index, number, error)


def read_json_list(path: str) -> list[Any]:
    """The top-level list of a JSON file; anything else is a DataFileError naming the file."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            rows = json.load(f)
    except UnicodeDecodeError as error:
        raise DataFileError(path, f"not UTF-8 text: {error}") from None
    except json.JSONDecodeError as error:
        if not error.doc.strip():
            raise DataFileError(path, "no records (the file is empty)") from None
        where = f"line {error.lineno} column {error.colno}"
        raise DataFileError(path, f"invalid JSON (truncated?): {error.msg} at {where}") from None
    if not isinstance(rows, list):
        raise DataFileError(
            path, f"expected a JSON list of records at the top level, not a {type(rows).__name__}"
        )
    if not rows:
        raise DataFileError(path, "no records (an empty list)")
    return rows


def read_json_rows(path: str) -> Iterator[tuple[int, Any]]:
    """(index, row) pairs of a .json list or a .jsonl file."""
    if path.endswith(".jsonl"):
        return read_jsonl_rows(path)
    return enumerate(read_json_list(path))


def json_columns(
    path: str, rows: list[tuple[int, Any]], text_field: str | None, image_field: str | None
) -> Columns | None:
    """The column layout of the object rows; None when there is none (every row is then bad)."""
    dicts = [row for _, row in rows if isinstance(row, dict)]
    if not dicts:
        return None
    available = set().union(*(row.keys() for row in dicts))
    sample = next((row for row in dicts if row.get(text_field or "") or row.get("messages")), None)
    try:
        return detect_columns(available, sample or dicts[0], text_field, image_field)
    except ValueError as error:
        raise DataFileError(path, str(error)) from None


def json_records(
    path: str, image_folder: str | None, text_field: str | None, image_field: str | None
) -> Iterator[Record | BadRecordError]:
    rows = list(read_json_rows(path))
    columns = json_columns(path, rows, text_field, image_field)
    base_folder = image_folder or os.path.dirname(os.path.abspath(path))
    for index, row in rows:
        if isinstance(row, BadRecordError):
            yield row
        else:
            yield json_row_record(row, index, columns, path, base_folder)


def json_row_record(
    row: Any, index: int, columns: Columns | None, path: str, base_folder: str
) -> Record | BadRecordError:
    """One parsed JSON row as a Record, or the BadRecordError that names it (`columns` is None
    only when no row of the file is an object)."""
    if not isinstance(row, dict):
        kind = type(row).__name__
        return BadRecordError(path, index, f"a record must be a JSON object, found {kind}")
    try:
        return parse_row(row, columns, row_images(row, columns.image), path, index, base_folder)
    except BadRecordError as error:
        return error


# -- Hugging Face datasets (save_to_disk folders, parquet) --------------------------------------
def is_saved_dataset(path: str) -> bool:
    names = ("dataset_info.json", "state.json", "dataset_dict.json")
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, n)) for n in names)


def parquet_files(path: str) -> list[str]:
    if os.path.isfile(path) and path.endswith(".parquet"):
        return [path]
    return sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))


def check_parquet_files(path: str) -> None:
    """Each parquet file's footer readable and some rows in all, or a DataFileError naming it."""
    import pyarrow.parquet as pq

    num_rows = 0
    for file in parquet_files(path):
        try:
            num_rows += pq.ParquetFile(file).metadata.num_rows
        except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
            raise DataFileError(file, f"cannot read the parquet file: {error}") from None
    if num_rows == 0:
        raise DataFileError(path, "no records (the parquet files have no rows)")


def saved_without_data(path: str) -> bool:
    """Whether a save_to_disk folder of one dataset holds no data file (it was saved empty)."""
    try:
        with open(os.path.join(path, "state.json"), encoding="utf-8") as f:
            return not json.load(f).get("_data_files")
    except (OSError, ValueError, AttributeError):  # not one dataset's state: datasets will tell
        return False


def open_hf_dataset(path: str) -> Any:
    """A `datasets.Dataset` from a save_to_disk folder or parquet files (train split)."""
    import datasets

    if is_saved_dataset(path):
        loaded = datasets.load_from_disk(path)
        if isinstance(loaded, datasets.DatasetDict):
            loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
    else:
        loaded = datasets.Dataset.from_parquet(parquet_files(path))
    return loaded.flatten_indices() if loaded._indices is not None else loaded


# how image_cell_kind classes an image column
IMAGE_PATHS, IMAGE_LISTS, SINGLE_IMAGES = "paths", "lists", "single"


def image_cell_kind(dataset: Any, column: str | None) -> str | None:
    """How a row's images are read from the column: IMAGE_PATHS (a path or a list of them, read
    as they are), IMAGE_LISTS (a list of stored images), SINGLE_IMAGES (one stored image or
    none); None without an image column. The whole-file and row readers both ask it, so they
    agree on every type."""
    if column is None:
        return None
    import pyarrow as pa

    cells = dataset.data.column(column)
    value_type = cells.type.value_type if pa.types.is_list(cells.type) else cells.type
    if pa.types.is_string(value_type) or pa.types.is_large_string(value_type):
        return IMAGE_PATHS
    if pa.types.is_list(cells.type) or pa.types.is_large_list(cells.type):
        return IMAGE_LISTS
    return SINGLE_IMAGES


def image_cells(dataset: Any, column: str | None, base_folder: str) -> list[list[Any]]:
    """Per row, its images: paths read now, stored images as lazy DatasetImage references."""
    kind = image_cell_kind(dataset, column)
    if kind is None:
        return [[] for _ in range(len(dataset))]
    import pyarrow.compute as pc

    cells = dataset.data.column(column)
    if kind == IMAGE_PATHS:
        return [row_images({"v": value}, "v") for value in cells.to_pylist()]
    if kind == IMAGE_LISTS:
        counts = pc.fill_null(pc.list_value_length(cells), 0).to_pylist()
        return [
            [DatasetImage(dataset, column, row, k) for k in range(n)]
            for row, n in enumerate(counts)
        ]
    valid = pc.is_valid(cells).to_pylist()
    return [
        [DatasetImage(dataset, column, row, None)] if ok else [] for row, ok in enumerate(valid)
    ]


def row_image_cells(dataset: Any, column: str | None, kind: str | None, row: int) -> list[Any]:
    """One row's images, as image_cells gives them (`kind`: image_cell_kind's), reading only
    that row's cell."""
    if kind is None:
        return []
    cell = dataset.data.column(column)[row]
    if kind == IMAGE_PATHS:
        return row_images({"v": cell.as_py()}, "v")
    if kind == IMAGE_LISTS:
        count = len(cell.values) if cell.is_valid else 0
        return [DatasetImage(dataset, column, row, k) for k in range(count)]
    return [DatasetImage(dataset, column, row, None)] if cell.is_valid else []


def opened_hf_dataset(path: str) -> Any:
    """open_hf_dataset's dataset, or a DataFileError naming `path` when there are no rows or
    it cannot be read."""
    if not is_saved_dataset(path):
        check_parquet_files(path)
    elif saved_without_data(path):  # datasets fails on these with an IndexError
        raise DataFileError(path, "no records (the dataset has no rows)")
    try:
        dataset = open_hf_dataset(path)
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise DataFileError(path, f"cannot read the dataset: {error}") from None
    if len(dataset) == 0:
        raise DataFileError(path, "no records (the dataset has no rows)")
    return dataset


def hf_columns(path: str, dataset: Any, text_field: str | None, image_field: str | None) -> Columns:
    """The dataset's column layout, told from the first row's text cell."""
    available = set(dataset.column_names)
    try:
        probe = detect_columns(available, None, text_field, image_field)
        sample = dataset.data.column(probe.text)[0].as_py()
        return detect_columns(available, {probe.text: sample}, text_field, image_field)
    except ValueError as error:
        raise DataFileError(path, str(error)) from None


def hf_base_folder(path: str, image_folder: str | None) -> str:
    """Where a dataset's relative image paths are taken from."""
    return image_folder or (path if os.path.isdir(path) else os.path.dirname(path))


def text_columns(columns: Columns) -> list[str]:
    """The columns parse_row reads a dataset row's text from."""
    return [c for c in (columns.text, columns.answer) if c]


def row_columns(columns: Columns, available: list[str]) -> list[str]:
    """The columns parse_row reads a dataset row from: its text, and its `id` where the dataset
    has one (a bad record's error names it, as a JSON record's does)."""
    read = text_columns(columns)
    return read + ["id"] if "id" in available and "id" not in read else read


def hf_records(
    path: str, image_folder: str | None, text_field: str | None, image_field: str | None
) -> Iterator[Record | BadRecordError]:
    """Every row of a dataset, its text columns read whole (llava.data.hf_rows.HfRecords reads
    the same records a row at a time)."""
    dataset = opened_hf_dataset(path)
    columns = hf_columns(path, dataset, text_field, image_field)
    values = {
        c: dataset.data.column(c).to_pylist() for c in row_columns(columns, dataset.column_names)
    }
    base_folder = hf_base_folder(path, image_folder)
    images = image_cells(dataset, columns.image, base_folder)
    for index in range(len(dataset)):
        row = {c: values[c][index] for c in values}
        try:
            yield parse_row(row, columns, images[index], path, index, base_folder)
        except BadRecordError as error:
            yield error


# -- entry --------------------------------------------------------------------------------------
def iter_records(
    data_path: str,
    image_folder: str | None = None,
    text_field: str | None = None,
    image_field: str | None = None,
) -> Iterator[Record | BadRecordError]:
    """Records of any supported format, bad ones as BadRecordError items (not raised)."""
    from llava.data import shards  # imported here: shards builds on this module

    if shards.is_shard_path(data_path):
        return iter(shards.ShardRecords.read(data_path, text_field, image_field))
    if not os.path.exists(data_path):
        raise FileNotFoundError(f"--data_path {data_path!r} does not exist")
    if os.path.isfile(data_path) and data_path.endswith((".json", ".jsonl")):
        return json_records(data_path, image_folder, text_field, image_field)
    if is_saved_dataset(data_path) or parquet_files(data_path):
        return hf_records(data_path, image_folder, text_field, image_field)
    raise DataFileError(
        data_path,
        "expected a .json/.jsonl file, a save_to_disk folder, parquet files, or .tar shards",
    )


def load_records(
    data_path: str,
    image_folder: str | None = None,
    text_field: str | None = None,
    image_field: str | None = None,
    skip_bad_records: bool = False,
) -> LoadedRecords:
    """All records of a data path; a bad one raises unless `skip_bad_records` (then counted)."""
    loaded = LoadedRecords(records=[], source=data_path)
    for item in iter_records(data_path, image_folder, text_field, image_field):
        if isinstance(item, BadRecordError):
            if not skip_bad_records:
                raise item
            loaded.skipped.append(item)
        else:
            loaded.records.append(item)
    return loaded
