"""Cheap checks and careful reads of model, adapter and checkpoint files; errors name the file.

Truncation is found from the files' own bookkeeping, without reading their tensors: a
safetensors header states where the last tensor ends, and a torch.save zip archive keeps its
directory at the very end, which is the first thing a cut file loses.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from typing import Any

import torch

# Suffixes checked by their format; any other file only has to exist and be non-empty.
JSON_SUFFIXES = (".json",)
SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6
PICKLE_PROTOCOL_OPCODE = b"\x80"  # the legacy torch.save format starts with a pickle
ZIP_LOCAL_HEADER_SIZE = 30  # fixed part of a zip member's local header
SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library's own limit


class UnreadableFileError(ValueError):
    """A file that is missing, empty, truncated or not in the format its name promises."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class MissingFileError(UnreadableFileError, FileNotFoundError):
    """An expected file (or folder) that is not there; caught as either parent."""


def file_size(path: str | os.PathLike) -> int:
    """The size of a non-empty regular file; missing, folder or empty -> UnreadableFileError."""
    if os.path.isdir(path):
        raise UnreadableFileError(path, "is a folder, expected a file")
    if not os.path.exists(path):
        raise MissingFileError(path, "no such file")
    size = os.path.getsize(path)
    if size == 0:
        raise UnreadableFileError(path, "empty file")
    return size


def describe(error: Exception) -> str:
    """An exception in words, for those (EOFError) that come without any."""
    return str(error) or type(error).__name__


# -- JSON -------------------------------------------------------------------------------------------
def read_json_file(path: str | os.PathLike) -> Any:
    """The parsed contents of a JSON file; missing, empty, not UTF-8 or invalid -> an error."""
    file_size(path)
    with open(path, "rb") as f:
        data = f.read()
    return parse_json(path, data)


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """read_json_file for files that must hold one object (config.json, adapter_config.json)."""
    value = read_json_file(path)
    if not isinstance(value, dict):
        raise UnreadableFileError(path, f"expected a JSON object, found a {type(value).__name__}")
    return value


def parse_json(path: str | os.PathLike, data: bytes) -> Any:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UnreadableFileError(path, f"not UTF-8 text (byte {error.start})") from error
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        where = f"line {error.lineno} column {error.colno}"
        reason = f"invalid JSON at {where}: {error.msg}"
        # The files read here hold an object or a list; one cut short ends before it closes.
        if not text.rstrip().endswith(("}", "]")):
            reason = f"truncated JSON: the file ends before its document closes ({reason})"
        raise UnreadableFileError(path, reason) from error


# -- safetensors ------------------------------------------------------------------------------------
def safetensors_header(path: str | os.PathLike) -> tuple[int, dict[str, Any]]:
    """(header length, header) of a safetensors file, reading only those bytes."""
    size = file_size(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise UnreadableFileError(path, f"truncated safetensors file ({size} bytes)")
        (header_length,) = struct.unpack("<Q", prefix)
        if header_length > SAFETENSORS_MAX_HEADER:
            raise UnreadableFileError(
                path,
                f"not a safetensors file (its first 8 bytes give a {header_length}-byte header)",
            )
        if 8 + header_length > size:
            raise UnreadableFileError(
                path,
                f"truncated safetensors file (header says {header_length} bytes of header, "
                f"file has {size - 8})",
            )
        header = parse_json(path, f.read(header_length))
    if not isinstance(header, dict):
        raise UnreadableFileError(path, "not a safetensors file (its header is not a JSON object)")
    return header_length, header


def tensors_end(path: str | os.PathLike, header: dict[str, Any]) -> int:
    """Where the last tensor's bytes end, counted from the end of the header."""
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(offset, int) for offset in offsets)
        ):
            raise UnreadableFileError(path, f"invalid safetensors header: tensor {name!r}")
        end = max(end, int(offsets[1]))
    return end


def check_safetensors_file(path: str | os.PathLike) -> None:
    """Header readable and file size = 8 + header + tensors, exactly; no tensor is read."""
    header_length, header = safetensors_header(path)
    expected = tensors_end(path, header)
    available = os.path.getsize(path) - 8 - header_length
    if available < expected:
        raise UnreadableFileError(
            path,
            f"truncated safetensors file (header says {expected} bytes of tensors, "
            f"file has {available})",
        )
    if available > expected:
        raise UnreadableFileError(
            path,
            f"corrupt safetensors file ({available - expected} bytes after its last tensor)",
        )


def load_safetensors_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """check_safetensors_file, then the tensors (on the CPU)."""
    from safetensors.torch import load_file

    check_safetensors_file(path)
    try:
        return load_file(os.fspath(path))
    except Exception as error:
        raise UnreadableFileError(
            path, f"safetensors could not load it: {describe(error)}"
        ) from error


# -- torch.save files -------------------------------------------------------------------------------
def torch_file_format(path: str | os.PathLike) -> str:
    """'zip' (torch.save since torch 1.6) or 'legacy' (a bare pickle stream)."""
    file_size(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == ZIP_MAGIC:
        return "zip"
    if magic.startswith(PICKLE_PROTOCOL_OPCODE):
        return "legacy"
    raise UnreadableFileError(path, "not a torch.save file (neither a zip archive nor a pickle)")


def check_torch_zip(path: str | os.PathLike) -> None:
    """The archive's directory is whole and every member's bytes lie inside the file."""
    size = os.path.getsize(path)
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        raise UnreadableFileError(
            path, f"truncated or corrupt torch file (no readable zip directory at its end: {error})"
        ) from error
    if not any(member.filename.endswith("data.pkl") for member in members):
        raise UnreadableFileError(path, "a zip archive, but not a torch.save file (no data.pkl)")
    for member in members:
        end = (
            member.header_offset
            + ZIP_LOCAL_HEADER_SIZE
            + len(member.filename.encode("utf-8"))
            + member.compress_size
        )
        if end > size:
            raise UnreadableFileError(
                path,
                f"truncated torch file ({member.filename} ends at byte {end}, file has {size})",
            )


def check_torch_file(path: str | os.PathLike) -> None:
    """Cheap for torch.save's zip format; a legacy pickle file is loaded in full to check it.

    The legacy load is `weights_only`, so a legacy file holding more than tensors and plain
    containers is reported as unreadable too.
    """
    if torch_file_format(path) == "zip":
        check_torch_zip(path)
    else:
        torch_load(path)


def torch_load(path: str | os.PathLike, **kwargs: Any) -> Any:
    kwargs = {"map_location": "cpu", "weights_only": True, **kwargs}
    try:
        return torch.load(path, **kwargs)
    except Exception as error:
        raise UnreadableFileError(path, f"torch.load failed: {describe(error)}") from error


def load_torch_file(path: str | os.PathLike, **kwargs: Any) -> Any:
    """torch.load (on the CPU, weights only, unless `kwargs` say otherwise), after a check."""
    if torch_file_format(path) == "zip":
        check_torch_zip(path)
    return torch_load(path, **kwargs)


# -- any file ---------------------------------------------------------------------------------------
def check_readable(path: str | os.PathLike) -> None:
    """Check a file by its suffix: JSON parses, safetensors and torch files are whole.

    Any other file only has to exist and be non-empty. Never reads a tensor of a safetensors
    or zip-format torch file, so it is cheap on multi-GB checkpoints.
    """
    name = os.fspath(path)
    if name.endswith(JSON_SUFFIXES):
        read_json_file(path)
    elif name.endswith(SAFETENSORS_SUFFIXES):
        check_safetensors_file(path)
    elif name.endswith(TORCH_SUFFIXES):
        check_torch_file(path)
    else:
        file_size(path)


# -- model folders in the transformers layout -------------------------------------------------------
CONFIG_FILE = "config.json"
# In the order from_pretrained prefers them: a single file, or the index of its shards.
MODEL_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

# Read by from_pretrained (or a tower's image processor) when present.
OPTIONAL_MODEL_FILES = ("generation_config.json", "preprocessor_config.json")


def model_weight_files(folder: str) -> list[str]:
    """The weight files from_pretrained would read in `folder` (shards listed by their index)."""
    for name in MODEL_WEIGHT_FILES:
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            continue
        if not name.endswith(".index.json"):
            return [path]
        weight_map = read_json_object(path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UnreadableFileError(path, "a weight index without a weight_map")
        return [os.path.join(folder, shard) for shard in sorted(set(weight_map.values()))]
    return []


def check_model_folder(folder: str) -> None:
    """A local model folder has a readable config.json and whole weight files.

    An empty folder, or one without config or weights, is named with what was expected in it.
    """
    expected = f"{CONFIG_FILE} and model weights ({', '.join(MODEL_WEIGHT_FILES)})"
    if os.path.isfile(folder):
        raise UnreadableFileError(folder, f"is a file, expected a model folder with {expected}")
    if not os.path.isdir(folder):
        raise MissingFileError(folder, f"no such folder (expected a model folder with {expected})")
    if not os.listdir(folder):
        raise UnreadableFileError(folder, f"empty folder (expected a model folder with {expected})")
    config = os.path.join(folder, CONFIG_FILE)
    if not os.path.exists(config):
        raise MissingFileError(config, f"no such file (a model folder needs {expected})")
    read_json_object(config)
    weights = model_weight_files(folder)
    if not weights:
        raise MissingFileError(
            folder, f"no model weights (expected one of {', '.join(MODEL_WEIGHT_FILES)})"
        )
    for path in weights:
        check_readable(path)
    check_files_present_in(folder, OPTIONAL_MODEL_FILES)


def check_files_present_in(folder: str, names: tuple[str, ...]) -> None:
    """check_readable each of `names` that `folder` holds (optional files, such as a tokenizer's)."""
    for name in names:
        path = os.path.join(folder, name)
        if os.path.exists(path):
            check_readable(path)
