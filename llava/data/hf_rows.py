"""A local Hugging Face dataset (a save_to_disk folder or parquet files) read a row at a time, for
the length cache (llava.data.length_cache) as JSON files and tar shards are.

`HfRecords` keeps the opened dataset, memory-mapped Arrow, and builds a row's `Record` only
when it is asked for: nothing per row is held in Python, on any rank or loader worker. Its
records and bad-record errors are formats.hf_records' (the whole-dataset reader), row for row.
"""

from __future__ import annotations

import fnmatch
import os
from typing import Any

import numpy as np

from llava.data.formats import (
    BadRecordError,
    Columns,
    Record,
    hf_base_folder,
    hf_columns,
    image_cell_kind,
    is_saved_dataset,
    opened_hf_dataset,
    parquet_files,
    parse_row,
    row_columns,
    row_image_cells,
)
from llava.data.length_cache import RowReader, data_file_identity

# the files of a save_to_disk folder (and of each split of a saved DatasetDict) its rows are in
SAVED_DATASET_FILES = ("data-*.arrow", "dataset_info.json", "state.json", "dataset_dict.json")


def hf_data_files(path: str) -> list[str]:
    """Every file a dataset's rows come from: a save_to_disk folder's Arrow shards and the
    json files that describe them, or the parquet files; what the length cache keys on."""
    if not is_saved_dataset(path):
        return parquet_files(path)
    found = [
        os.path.join(folder, name)
        for folder, _, names in os.walk(path)
        for name in names
        if any(fnmatch.fnmatch(name, pattern) for pattern in SAVED_DATASET_FILES)
    ]
    return sorted(found)


def hf_identity(path: str) -> list[dict[str, Any]]:
    """The path, size, modification time and inode of each of the dataset's files."""
    return [data_file_identity(file) for file in hf_data_files(path)]


class HfRecords(RowReader):
    """The rows of a local Hugging Face dataset; `record(row)` reads that row's cells and parses
    them as formats.hf_records does.

    For the length cache (`CachedBuild`), the rows are one range, `starts` [0] and `ends`
    [number of rows]: a row's number is all that finds it. Pickles without the dataset (loader
    workers started by spawn reopen it by path when they first read a row); a forked child
    reads the parent's memory map."""

    def __init__(
        self,
        path: str,
        num_rows: int,
        columns: Columns,
        base_folder: str,
        dataset: Any = None,
    ):
        """`dataset`: the opened dataset, when it is at hand; else opened at the first row read."""
        self.path, self.num_rows = path, num_rows
        self.columns, self.base_folder = columns, base_folder
        self.opened: Any = None
        self.image_kind: str | None = None  # image_cell_kind's, known once the dataset is open
        if dataset is not None:
            self.use(dataset)

    @classmethod
    def read(
        cls,
        path: str,
        image_folder: str | None = None,
        text_field: str | None = None,
        image_field: str | None = None,
    ) -> HfRecords:
        """Open the dataset and tell its columns; formats' DataFileError when it has no rows or
        its columns cannot be told."""
        dataset = opened_hf_dataset(path)
        columns = hf_columns(path, dataset, text_field, image_field)
        return cls(path, len(dataset), columns, hf_base_folder(path, image_folder), dataset)

    @classmethod
    def reopen(
        cls, path: str, starts: np.ndarray, ends: np.ndarray, columns: Columns, base_folder: str
    ) -> HfRecords:
        """The reader a cached build describes (rows, columns and folder from the cache, none
        told again); the dataset is opened when a row is first read, so a warm start reads none
        of it."""
        return cls(path, int(ends[-1] - starts[0]), columns, base_folder)

    def use(self, dataset: Any) -> Any:
        """Read rows from `dataset` (this reader's, opened) from now on."""
        self.opened = dataset
        self.image_kind = image_cell_kind(dataset, self.columns.image)
        return dataset

    @property
    def dataset(self) -> Any:
        return self.opened if self.opened is not None else self.use(opened_hf_dataset(self.path))

    @property
    def starts(self) -> np.ndarray:
        return np.zeros(1, dtype=np.int64)

    @property
    def ends(self) -> np.ndarray:
        return np.full(1, self.num_rows, dtype=np.int64)

    def __len__(self) -> int:
        return self.num_rows

    def item(self, row: int) -> Record | BadRecordError:
        """Row `row` as a Record, or the BadRecordError hf_records gives it."""
        dataset = self.dataset
        read = row_columns(self.columns, dataset.column_names)
        cells = {c: dataset.data.column(c)[row].as_py() for c in read}
        images = row_image_cells(dataset, self.columns.image, self.image_kind, row)
        try:
            return parse_row(cells, self.columns, images, self.path, row, self.base_folder)
        except BadRecordError as error:
            return error

    def __getstate__(self) -> dict:
        return {**self.__dict__, "opened": None}
