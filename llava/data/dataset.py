"""The lazy supervised dataset: exact lengths and modalities up front, images decoded per sample.

At construction every record is rendered and tokenized once (text only, fast) to learn its
true length with image placeholders, whether truncation shortens or drops it, and whether any
supervised token is left; nothing is kept but the record and its length (of a LLaVA .json or
.jsonl file, tar shards (llava.data.shards) or a local Hugging Face dataset (llava.data.hf_rows),
only the row's number: the row is parsed again when loaded), and what was found is cached next
to the data so that a second start, on any rank, tokenizes nothing (llava.data.length_cache).
Images are decoded only in `__getitem__`. Bad records raise `BadRecordError` naming file, index and id. With
`skip_bad_records`, those a cheap check finds (format, roles, tags against images, missing image
files, text the template rejects) are dropped here and counted in the summary line; those found
only when an image is decoded (unreadable, over --max_image_pixels) are replaced by the next
sample of the same modality, the same one on every rank and on resume. Every skipped record is
listed through `llava.data.skipped` when a `skip_log_dir` is given.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import random
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from llava.conversation import ChatTemplate, get_template
from llava.data.collator import SupervisedCollator, pad_token_id_of
from llava.data.forked import available_cpus, contiguous_shares, map_forked
from llava.data.formats import BadRecordError, Record, is_saved_dataset, load_records, parquet_files
from llava.data.hf_rows import HfRecords, hf_identity
from llava.data.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    check_aspect_ratio,
    load_image,
    process_images,
    read_size,
)
from llava.data.length_cache import (
    CACHE_VERSION,
    CachedBuild,
    JsonlRecords,
    JsonRecords,
    LengthCache,
    RowReader,
    builders_at_once,
    built_once,
    data_file_identity,
    processor_fingerprint,
    tokenizer_fingerprint,
)
from llava.data.media import is_anyres
from llava.data.shards import ShardRecords, ShardSet, is_shard_path
from llava.data.skipped import DECODE, LOAD, SkipLog
from llava.data.tokenize import (
    NO_SUPERVISION,
    SHORTENED,
    TOO_LONG,
    ConversationTokenizer,
    TokenizedSample,
    fit,
)

logger = logging.getLogger(__name__)

IMAGE, TEXT = "image", "text"
ENCODE_BLOCK = 512  # records tokenized per batched tokenizer call at construction
SHARE_BLOCKS = 8  # RowRecords of fewer blocks per build worker are built in one process
COUNTED = (
    "shortened",
    "dropped_too_long",
    "dropped_no_supervision",
    "image_samples",
    "text_samples",
)


@dataclass
class DataSummary:
    """What happened to the records of one data path while the dataset was built.

    Exact and the same on every rank. Bad records found later, when a sample's images are
    decoded, are counted per process in `replaced_when_decoding`; their exact total over ranks,
    loader workers and epochs is `collect_skipped_records`'s.
    """

    source: str
    records: int = 0
    skipped_bad: int = 0
    shortened: int = 0
    dropped_too_long: int = 0
    dropped_no_supervision: int = 0
    image_samples: int = 0
    text_samples: int = 0
    replaced_when_decoding: int = 0  # distinct bad records this process met in __getitem__
    reasons: list[str] = field(default_factory=list)  # the first few bad-record messages

    @property
    def kept(self) -> int:
        return self.image_samples + self.text_samples

    def line(self) -> str:
        return (
            f"data {self.source}: {self.records} records -> {self.kept} samples "
            f"({self.image_samples} with images, {self.text_samples} text-only); "
            f"skipped {self.skipped_bad} bad records; "
            f"dropped {self.dropped_too_long} longer than model_max_length at the first answer "
            f"and {self.dropped_no_supervision} with no supervised token; "
            f"shortened {self.shortened} at a turn boundary"
        )


@dataclass
class RowsFound:
    """What building a share of RowRecords' rows found (see build_in_children)."""

    rows: np.ndarray
    lengths: np.ndarray
    num_images: np.ndarray
    counts: dict[str, int]
    reader_bad: list[tuple[int, str, Any]]
    other_bad: list[tuple[int, str, Any]]


# Record sources read row by row (a row parsed when its sample is loaded): a LLaVA .json list,
# a .jsonl file (JsonlRecords, a JsonRecords), tar shards (llava.data.shards), a local Hugging
# Face dataset (llava.data.hf_rows).
RowRecords = JsonRecords | ShardRecords | HfRecords


class Samples(Sequence):
    """(record, number of its images kept) per sample, held compactly: the records stay in
    their source (a list, or RowRecords read row by row when a sample is loaded)."""

    def __init__(self, source: Sequence[Record] | RowRecords):
        self.store = source if isinstance(source, RowReader) else None
        self.keys: Any = array("q") if self.store is not None else []  # rows, or the records
        self.num_images = array("h")

    def append(self, record: Record, num_images: int) -> None:
        self.keys.append(record.index if self.store is not None else record)
        self.num_images.append(num_images)

    def __len__(self) -> int:
        return len(self.num_images)

    def __getitem__(self, i: int) -> tuple[Record, int]:
        key = self.keys[i]
        return (key if self.store is None else self.store.record(key)), self.num_images[i]

    def select(self, indices: Sequence[int]) -> Samples:
        subset = copy.copy(self)
        picked = [self.keys[i] for i in indices]
        subset.keys = array("q", picked) if self.store is not None else picked
        subset.num_images = array("h", [self.num_images[i] for i in indices])
        return subset


class SupervisedDataset(Dataset):
    """Records -> {"input_ids" (T,), "labels" (T,), "pixel_values" (N, 3, H, W) or None}.

    `lengths` (tokens, image placeholders included) and `modalities` ("image" / "text") are
    known without decoding any image; the grouped samplers read them. `records` is a list, or
    RowRecords (a JSON file, tar shards, a Hugging Face dataset) whose rows are parsed as they are needed (then samples
    keep only rows).
    """

    def __init__(
        self,
        records: Sequence[Record] | RowRecords,
        tokenizer: Any,
        template: ChatTemplate | str,
        model_max_length: int,
        image_processor: Any = None,
        num_image_tokens: int = 0,
        image_aspect_ratio: str = "square",
        mm_use_im_start_end: bool = False,
        skip_bad_records: bool = False,
        summary: DataSummary | None = None,
        skipped: Sequence[BadRecordError] = (),
        skip_log_dir: str | None = None,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        conversation_tokenizer: ConversationTokenizer | None = None,
        cached: CachedBuild | None = None,
        build_workers: int = 1,
    ):
        """`skipped`: bad records the reader already skipped (counted and listed here);
        `skip_log_dir`: where skipped records are listed (the run's output_dir);
        `conversation_tokenizer`: one built elsewhere (a processor's, see processor_media);
        `cached`: what an earlier build of the same records found (llava.data.length_cache):
        nothing is tokenized, the same samples, summary and bad records come back;
        `build_workers`: processes that share the tokenizing of large RowRecords (forked
        children, each a contiguous share of its rows; the result is the one-process build's)."""
        check_aspect_ratio(image_aspect_ratio)
        self.conversation_tokenizer = conversation_tokenizer or ConversationTokenizer(
            tokenizer, template, num_image_tokens, mm_use_im_start_end
        )
        self.model_max_length = model_max_length
        self.image_processor = image_processor
        self.image_aspect_ratio = image_aspect_ratio
        self.max_image_pixels = max_image_pixels
        self.skip_bad_records = skip_bad_records
        self.skip_log = SkipLog(skip_log_dir)
        self.summary = summary or DataSummary(source="records")
        self.summary.records = self.summary.records or len(records) + len(skipped)
        self.samples = Samples(records)  # (record, number of its images kept)
        self.lengths: list[int] = []
        self.modalities: list[str] = []
        self.bad_records: list[tuple[int, str, Any]] = []  # (index, reason, id), as reported
        self.deferred: list[BadRecordError] | None = None
        shares = self.build_shares(records, skipped, build_workers)
        if cached is None and shares > 1:
            self.build_in_children(records, shares)
        elif cached is None:
            self.build(records, skipped)
        else:
            self.replay(cached)
        logger.warning(self.summary.line())

    def build(self, records: Iterable[Record | BadRecordError], skipped: Sequence) -> None:
        """Tokenize every record, a block at a time.

        Bad records are reported as the reader reports them: those the reader finds (`skipped`,
        or in a JsonRecords file while it is read) first, then the others; without
        skip_bad_records, the first of them is raised (the rest of the file is then only read)."""
        reader_bad: list[BadRecordError] = []
        self.deferred = []
        try:
            for block in self.blocks(records, reader_bad):
                if not (self.deferred and not self.skip_bad_records):
                    self.add_block(block)
        finally:
            deferred, self.deferred = self.deferred, None
        for error in [*skipped, *reader_bad, *deferred]:
            self.bad(error)

    def blocks(
        self, records: Iterable[Record | BadRecordError], reader_bad: list[BadRecordError]
    ) -> Iterator[list[Record]]:
        """Records in blocks of ENCODE_BLOCK; a bad one is raised, or kept in `reader_bad`."""
        block = []
        for item in records:
            if isinstance(item, BadRecordError):
                if not self.skip_bad_records:
                    raise item
                reader_bad.append(item)
                continue
            block.append(item)
            if len(block) == ENCODE_BLOCK:
                yield block
                block = []
        if block:
            yield block

    @staticmethod
    def build_shares(records: Any, skipped: Sequence, workers: int) -> int:
        """How many processes build `records`: one but for large RowRecords."""
        if not isinstance(records, RowReader) or skipped:
            return 1
        return max(1, min(workers, len(records) // (SHARE_BLOCKS * ENCODE_BLOCK)))

    def build_in_children(self, records: RowRecords, shares: int) -> None:
        """Build as `build` does, the rows cut into `shares` contiguous shares, each tokenized in
        a forked child; the children's findings are joined in row order and replayed here, bad
        records in the order one process reports them (the reader's, then the others)."""
        found = map_forked(
            self.found_in_rows,
            [(records, rows) for rows in contiguous_shares(len(records), shares)],
        )
        self.replay(
            CachedBuild(
                rows=np.concatenate([share.rows for share in found]),
                lengths=np.concatenate([share.lengths for share in found]),
                num_images=np.concatenate([share.num_images for share in found]),
                starts=records.starts,
                ends=records.ends,
                columns=records.columns,
                base_folder=records.base_folder,
                counts={name: sum(share.counts[name] for share in found) for name in COUNTED},
                bad=[item for share in found for item in share.reader_bad]
                + [item for share in found for item in share.other_bad],
            )
        )

    def found_in_rows(self, work: tuple[RowRecords, range]) -> RowsFound:
        """In a forked child (this object is its own copy): build the given rows, every bad
        record kept (none raised, none listed: the parent does both)."""
        records, rows = work
        self.skip_bad_records, self.skip_log = True, SkipLog(None)
        reader_bad: list[BadRecordError] = []
        self.deferred = []
        for block in self.blocks((records.item(row) for row in rows), reader_bad):
            self.add_block(block)
        return RowsFound(
            rows=np.asarray(self.samples.keys, dtype=np.int64),
            lengths=np.asarray(self.lengths, dtype=np.int32),
            num_images=np.asarray(self.samples.num_images, dtype=np.int16),
            counts={name: getattr(self.summary, name) for name in COUNTED},
            reader_bad=[(e.index, e.reason, e.record_id) for e in reader_bad],
            other_bad=[(e.index, e.reason, e.record_id) for e in self.deferred],
        )

    def replay(self, cached: CachedBuild) -> None:
        """Samples, lengths, summary and bad records as the build that made `cached` found them."""
        self.samples.keys = array("q", cached.rows.astype(np.int64).tobytes())
        self.samples.num_images = array("h", cached.num_images.astype(np.int16).tobytes())
        self.lengths = cached.lengths.tolist()
        self.modalities = [IMAGE if n else TEXT for n in cached.num_images.tolist()]
        for name, count in cached.counts.items():
            setattr(self.summary, name, count)
        for index, reason, record_id in cached.bad:
            self.bad(BadRecordError(self.summary.source, index, reason, record_id))

    def cached_build(self) -> CachedBuild:
        """What this build found, for llava.data.length_cache (a RowRecords source's only)."""
        store = self.samples.store
        return CachedBuild(
            rows=np.asarray(self.samples.keys, dtype=np.int64),
            lengths=np.asarray(self.lengths, dtype=np.int32),
            num_images=np.asarray(self.samples.num_images, dtype=np.int16),
            starts=store.starts,
            ends=store.ends,
            columns=store.columns,
            base_folder=store.base_folder,
            counts={name: getattr(self.summary, name) for name in COUNTED},
            bad=list(self.bad_records),
        )

    def add_block(self, records: list[Record]) -> None:
        """Tokenize records (text only, one batched call) and keep those with something to learn."""
        for record in records:
            if record.images and self.image_processor is None:
                raise ValueError(
                    f"{record.source} record {record.index} has images but no image processor was given"
                )
        encoded = self.conversation_tokenizer.encode_many([list(r.turns) for r in records])
        for record, item in zip(records, encoded):
            if isinstance(item, ValueError):
                self.bad(BadRecordError(record.source, record.index, str(item), record.id))
            else:
                self.add(record, *fit(item, self.model_max_length))

    def add(self, record: Record, sample: TokenizedSample | None, outcome: str) -> None:
        if sample is None:
            if outcome == TOO_LONG:
                self.summary.dropped_too_long += 1
            elif outcome == NO_SUPERVISION:
                self.summary.dropped_no_supervision += 1
            return
        self.summary.shortened += int(outcome == SHORTENED)
        modality = IMAGE if sample.num_images else TEXT
        self.summary.image_samples += int(modality == IMAGE)
        self.summary.text_samples += int(modality == TEXT)
        self.samples.append(record, sample.num_images)
        self.lengths.append(len(sample.input_ids))
        self.modalities.append(modality)

    def bad(self, error: BadRecordError) -> None:
        """A bad record found while building: raised, or (skip_bad_records) counted and listed
        (while building, once the reader's own have been)."""
        if self.deferred is not None:
            self.deferred.append(error)
            return
        if not self.skip_bad_records:
            raise error
        self.bad_records.append((error.index, error.reason, error.record_id))
        self.summary.skipped_bad += 1
        self.skip_log.add(error, LOAD)
        if len(self.summary.reasons) < 10:
            self.summary.reasons.append(str(error))

    @property
    def modality_lengths(self) -> list[int]:
        """LLaVA's convention: positive lengths for image samples, negative for text-only."""
        return [n if m == IMAGE else -n for n, m in zip(self.lengths, self.modalities)]

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def max_images_per_sample(self) -> int:
        return max(self.samples.num_images, default=0)

    def sizes(self, record: Record, decoded: Sequence[Image.Image] = ()) -> list[tuple[int, int]]:
        """Each image's (width, height): the decoded ones', then the others' from their headers
        (no decoding), where an image's tokens depend on its size; an unreadable one makes the
        record bad."""
        sources = record.images[len(decoded) :]
        try:
            headers = [read_size(source, self.max_image_pixels) for source in sources]
        except ValueError as error:
            raise BadRecordError(record.source, record.index, str(error), record.id) from None
        return [image.size for image in decoded] + headers

    def pixel_values(self, record: Record, num_images: int) -> torch.Tensor | None:
        """(num_images, 3, H, W) for the images the sample keeps, None when it keeps none."""
        if num_images == 0:
            return None
        sources = record.images[:num_images]
        try:
            images = [load_image(source, self.max_image_pixels) for source in sources]
            return process_images(images, self.image_processor, self.image_aspect_ratio)
        except ValueError as error:
            raise BadRecordError(record.source, record.index, str(error), record.id) from None

    def load(self, i: int) -> dict[str, torch.Tensor | None]:
        record, num_images = self.samples[i]
        sample, _ = self.conversation_tokenizer(list(record.turns), self.model_max_length)
        return {
            "input_ids": torch.tensor(sample.input_ids, dtype=torch.long),  # (T,)
            "labels": torch.tensor(sample.labels, dtype=torch.long),  # (T,)
            "pixel_values": self.pixel_values(record, num_images),  # (N, 3, H, W) or None
        }

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | None]:
        """Load sample i; with skip_bad_records a bad one is replaced by the next good sample
        of the same modality (so grouped batches stay one modality).

        The replacement depends only on i and the data, so every rank, loader worker and
        resumed run picks the same one."""
        for j in self.same_modality_from(i):
            try:
                return self.load(j)
            except BadRecordError as error:
                if not self.skip_bad_records:
                    raise
                if self.skip_log.add(error, DECODE):
                    self.summary.replaced_when_decoding += 1
                    logger.warning("bad record replaced by the next of its modality: %s", error)
        raise RuntimeError(f"every {self.modalities[i]} sample of {self.summary.source} is bad")

    def select(self, indices: list[int]) -> SupervisedDataset:
        """A dataset of the given samples (same tokenizer, images and policy), in that order."""
        subset = copy.copy(self)
        subset.samples = self.samples.select(indices)
        subset.lengths = [self.lengths[i] for i in indices]
        subset.modalities = [self.modalities[i] for i in indices]
        return subset

    def same_modality_from(self, i: int) -> Iterator[int]:
        """i, then the following samples of its modality, wrapping around once."""
        for step in range(len(self)):
            j = (i + step) % len(self)
            if self.modalities[j] == self.modalities[i]:
                yield j


@dataclass(frozen=True)
class RowStore:
    """A data path read row by row, as the length cache needs it: what identifies the data in
    the cache key, the path the cache file is named after, how to read it (a scan), and how to
    reopen it from a cached build (no scan)."""

    identity: Any
    cache_path: str
    read: Callable[[], RowRecords]
    reopen: Callable[[CachedBuild], RowRecords]


def row_store(
    data_path: str, image_folder: str | None, text_field: str | None, image_field: str | None
) -> RowStore | None:
    """The RowStore of tar shards, a LLaVA .json list, a .jsonl file or a local Hugging Face
    dataset (a save_to_disk folder or parquet files, its cache file named after the folder or
    file, beside it); None for a path of none of these (load_records then says what is wrong)."""
    if is_shard_path(data_path):
        shards = ShardSet.find(data_path)
        return RowStore(
            identity={"shards": list(shards.identity)},
            cache_path=shards.cache_path,
            read=lambda: ShardRecords.read(shards, text_field, image_field),
            reopen=lambda cached: ShardRecords(shards, cached.starts, cached.ends, cached.columns),
        )
    if os.path.isfile(data_path) and data_path.endswith((".json", ".jsonl")):
        reader = JsonlRecords if data_path.endswith(".jsonl") else JsonRecords
        return RowStore(
            identity=data_file_identity(data_path),
            cache_path=data_path,
            read=lambda: reader.read(data_path, image_folder, text_field, image_field),
            reopen=lambda cached: reader(
                data_path, cached.starts, cached.ends, cached.columns, cached.base_folder
            ),
        )
    if is_saved_dataset(data_path) or parquet_files(data_path):
        return RowStore(
            identity={"hf": hf_identity(data_path)},
            cache_path=os.path.abspath(data_path),
            read=lambda: HfRecords.read(data_path, image_folder, text_field, image_field),
            reopen=lambda cached: HfRecords.reopen(
                data_path, cached.starts, cached.ends, cached.columns, cached.base_folder
            ),
        )
    return None


def length_cache_key(
    store: RowStore,
    dataset_class: type,
    tokenizer: Any,
    template: ChatTemplate,
    model_max_length: int,
    reader: list[Any],
    images: list[Any],
    anyres: Any,
    max_image_pixels: int,
    processor: Any = None,
) -> dict[str, Any]:
    """Everything a build's result depends on but the image files (llava.data.length_cache).

    `reader`: image folder, text and image fields; `images`: whether there is an image
    processor, num_image_tokens, mm_use_im_start_end, image_aspect_ratio. An AnyRes dataset's
    token counts also depend on the AnyRes (pinpoints, merge, cap, tile geometry, video
    sampling: every field of the dataclass), a processor dataset's (llava.data.processor_media)
    on the processor (`processor_fingerprint`: its class, chat template, image processor and
    own settings); both also on max_image_pixels (a larger image's header makes its record
    bad). Other datasets' keys leave these out, as before."""
    key = {
        "version": CACHE_VERSION,
        "dataset": dataset_class.__qualname__,
        "data": store.identity,
        "reader": reader,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "template": repr(template),
        "images": images,
        "model_max_length": model_max_length,
    }
    if anyres is not None:
        fields = dataclasses.asdict(anyres)
        key["anyres"] = {"class": type(anyres).__qualname__, **fields}
    if processor is not None:
        key["processor"] = processor_fingerprint(processor)
    if anyres is not None or processor is not None:
        key["max_image_pixels"] = max_image_pixels
    return key


# (records, **how) -> a dataset of them, `how` being `skipped=`, `build_workers=` or `cached=`
DatasetOf = Callable[..., SupervisedDataset]
# (the data's RowStore, the reader's options) -> the length cache key of a build
CacheKeyOf = Callable[[RowStore, list[Any]], dict[str, Any]]


def load_rows_once(
    data_path: str,
    image_folder: str | None,
    text_field: str | None,
    image_field: str | None,
    skip_bad_records: bool,
    skip_log_dir: str | None,
    build_workers: int,
    dataset: DatasetOf,
    cache_key: CacheKeyOf,
) -> SupervisedDataset:
    """`dataset` of a data path's records, built once for every start and rank where the data is
    read row by row (`row_store`: every format), else from load_records (which then names what
    is wrong with the path).

    Shared by load_supervised_dataset and the processor models' loader
    (llava.data.processor_media), so both get the same row-by-row reading, forked first build
    (`build_workers`) and length cache (llava.data.length_cache): the cache is keyed by
    `cache_key(store, reader options)`; a start that finds it tokenizes nothing and reads no
    image header."""
    store = row_store(data_path, image_folder, text_field, image_field)
    if store is None:
        loaded = load_records(data_path, image_folder, text_field, image_field, skip_bad_records)
        return dataset(loaded.records, skipped=loaded.skipped)
    reader = [image_folder and os.path.abspath(image_folder), text_field, image_field]
    cache = LengthCache(cache_key(store, reader), store.cache_path, skip_log_dir)

    def build(builders: int) -> SupervisedDataset:
        """`builders`: this machine's ranks building at once; they share its CPUs (a machine
        that cannot see rank 0's cache would otherwise fork every CPU per rank)."""
        built = dataset(store.read(), build_workers=max(1, build_workers // builders))
        if LengthCache.enabled():
            cache.save(built.cached_build())
        return built

    if not LengthCache.enabled():
        return build(builders_at_once())
    return built_once(cache, build, lambda cached: dataset(store.reopen(cached), cached=cached))


def load_supervised_dataset(
    data_path: str,
    tokenizer: Any,
    version: str,
    model_max_length: int,
    image_processor: Any = None,
    num_image_tokens: int = 0,
    image_folder: str | None = None,
    image_aspect_ratio: str = "square",
    dataset_text_field: str | None = None,
    dataset_image_field: str | None = None,
    skip_bad_records: bool = False,
    mm_use_im_start_end: bool = False,
    skip_log_dir: str | None = None,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    anyres: Any = None,
    build_workers: int = 1,
) -> SupervisedDataset:
    """Read a data path (any supported format) into a SupervisedDataset.

    `skip_log_dir` (the run's output_dir): with skip_bad_records, every skipped record is
    listed there (see llava.data.skipped). `max_image_pixels`: larger images are bad records.
    `anyres` (llava.data.media.AnyRes, the model's, with --image_aspect_ratio anyres): each
    image's tokens and tiles by its size (llava.data.anyres_data.AnyResDataset).
    `build_workers`: forked processes that share the tokenizing of a large row-read source.

    Every format, with or without anyres, is read row by row and never held as records: a
    LLaVA .json list, a .jsonl file, tar shards (`shards/{000..099}.tar`, llava.data.shards) and
    a local Hugging Face dataset (a save_to_disk folder or parquet files, memory-mapped:
    llava.data.hf_rows); what building found is cached next to them (llava.data.length_cache):
    a second start, on any rank, tokenizes nothing and (anyres) reads no image header
    (`load_rows_once`).
    """
    template = get_template(version)
    check_aspect_ratio(image_aspect_ratio)  # before any file is read
    if (anyres is not None) != is_anyres(image_aspect_ratio):
        raise ValueError(
            f"--image_aspect_ratio {image_aspect_ratio} and the model's "
            f"{'anyres' if anyres is not None else 'fixed-size'} images disagree"
        )
    if anyres is not None:
        from llava.data.anyres_data import AnyResDataset  # it builds on this module

        dataset_class, image_inputs = AnyResDataset, {"anyres": anyres}
    else:
        dataset_class, image_inputs = SupervisedDataset, {"num_image_tokens": num_image_tokens}

    def dataset(records: Any, **how: Any) -> SupervisedDataset:
        """`records` built (`how`: skipped, build_workers or cached) with this call's options."""
        return dataset_class(
            records, tokenizer, template, model_max_length, **image_inputs,
            image_processor=image_processor, image_aspect_ratio=image_aspect_ratio,
            mm_use_im_start_end=mm_use_im_start_end, skip_bad_records=skip_bad_records,
            skip_log_dir=skip_log_dir, max_image_pixels=max_image_pixels,
            summary=DataSummary(source=data_path), **how,
        )  # fmt: skip

    def cache_key(store: RowStore, reader: list[Any]) -> dict[str, Any]:
        return length_cache_key(
            store, dataset_class, tokenizer, template, model_max_length, reader,
            images=[image_processor is not None, num_image_tokens, mm_use_im_start_end,
                    image_aspect_ratio],
            anyres=anyres, max_image_pixels=max_image_pixels,
        )  # fmt: skip

    return load_rows_once(
        data_path, image_folder, dataset_text_field, dataset_image_field, skip_bad_records,
        skip_log_dir, build_workers, dataset, cache_key,
    )  # fmt: skip


def split_for_validation(
    dataset: SupervisedDataset, percentage: float, seed: int
) -> tuple[SupervisedDataset, SupervisedDataset]:
    """(train, validation): a seeded `percentage`% of the samples held out, at least one."""
    if not 0 < percentage < 100:
        raise ValueError(f"--validation_split_percentage must be in (0, 100), not {percentage}")
    if len(dataset) < 2:
        raise ValueError(f"cannot hold out a validation split from {len(dataset)} sample(s)")
    order = list(range(len(dataset)))
    random.Random(seed).shuffle(order)
    num_validation = max(1, math.floor(len(dataset) * percentage / 100))
    validation, train = sorted(order[:num_validation]), sorted(order[num_validation:])
    return dataset.select(train), dataset.select(validation)


def build_supervised_data(
    tokenizer: Any,
    image_processor: Any = None,
    num_image_tokens: int = 0,
    data_args: Any = None,
    version: str = "v1",
    model_max_length: int = 2048,
    mm_use_im_start_end: bool = False,
    padding_side: str = "right",
    skip_log_dir: str | None = None,
    processor: Any = None,
    anyres: Any = None,
) -> tuple[SupervisedDataset, Any]:
    """The training entry's one call: (train_dataset, data_collator) from LLaVA's flags.

    `data_args` carries data_path, image_folder, image_aspect_ratio, dataset_text_field,
    dataset_image_field, skip_bad_records and max_image_pixels (missing ones take their
    defaults). `skip_log_dir` (the run's output_dir) is where skipped records are listed; rank 0
    merges the list with `llava.data.skipped.collect_skipped_records` at the end.

    With `processor` (a transformers image-text-to-text model's), images become that
    processor's own inputs and `version` "auto" is its chat template; `tokenizer` is
    processor.tokenizer and `image_processor`, `num_image_tokens`, `mm_use_im_start_end` and
    `image_aspect_ratio` do not apply (see llava.data.processor_media).
    """
    if processor is not None:
        # imported here: processor_media builds on this module's dataset
        from llava.data.processor_media import build_processor_data

        return build_processor_data(
            processor, data_args, version, model_max_length, padding_side, skip_log_dir
        )
    dataset = load_supervised_dataset(
        data_path=data_args.data_path,
        tokenizer=tokenizer,
        version=version,
        model_max_length=model_max_length,
        image_processor=image_processor,
        num_image_tokens=num_image_tokens,
        image_folder=getattr(data_args, "image_folder", None),
        image_aspect_ratio=getattr(data_args, "image_aspect_ratio", "square"),
        dataset_text_field=getattr(data_args, "dataset_text_field", None),
        dataset_image_field=getattr(data_args, "dataset_image_field", None),
        skip_bad_records=getattr(data_args, "skip_bad_records", False),
        mm_use_im_start_end=mm_use_im_start_end,
        skip_log_dir=skip_log_dir,
        max_image_pixels=getattr(data_args, "max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS),
        anyres=anyres,
        build_workers=getattr(data_args, "preprocessing_num_workers", None) or available_cpus(),
    )
    if len(dataset) == 0:
        raise ValueError(f"no trainable sample in {data_args.data_path}: {dataset.summary.line()}")
    collator = SupervisedCollator(pad_token_id_of(tokenizer), padding_side=padding_side)
    return dataset, collator
