"""The row-by-row path and length cache for .jsonl files and AnyRes datasets: the same records,
samples, lengths, summary and bad-record errors as the whole-file path (load_records, what
load_supervised_dataset did before), and a start from the cache that tokenizes nothing and
reads no image header."""

import codecs
import contextlib
import dataclasses
import glob
import json
import os
import pickle
import re

import pytest
import torch
from transformers import CLIPImageProcessor

import llava.data.anyres_data as anyres_data
import llava.data.dataset as dataset_module
import llava.data.length_cache as length_cache
import tests.test_length_cache as length_cache_tests
from llava.conversation import get_template
from llava.data.anyres_data import AnyResDataset
from llava.data.dataset import (
    DataSummary,
    RowStore,
    SupervisedDataset,
    length_cache_key,
    load_supervised_dataset,
)
from llava.data.formats import BadRecordError, DataFileError, json_records, load_records
from llava.data.length_cache import JsonlRecords, LengthCache
from llava.data.media import ImageGeometry, VideoSampling, anyres_of
from llava.data.skipped import SKIPPED_RECORDS, collect_skipped_records
from llava.data.tokenize import ConversationTokenizer
from tests.fixtures.datasets import write_video
from tests.test_data_formats import llava_row, write_image
from tests.test_shards import write_shards

FAILING_TEMPLATE = length_cache_tests.FAILING_TEMPLATE
tokenizer = length_cache_tests.tokenizer  # the sentencepiece tokenizer fixture
processor = length_cache_tests.processor  # the 16 px CLIP processor fixture

NUM_IMAGE_TOKENS = 8
TILE = 32  # AnyRes tiles of 32 px, patches of 8: 16 tokens a tile
IMAGE_SIZES = {"a.png": (40, 30), "b.png": (20, 70), "c.png": (90, 33)}
LONG = " ".join(["word"] * 600)


@pytest.fixture
def tower_processor() -> CLIPImageProcessor:
    """The tower's processor an AnyRes dataset takes its normalisation from."""
    return CLIPImageProcessor(
        size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE}
    )


@pytest.fixture
def images(tmp_path) -> str:
    """A folder of images of three sizes, a broken one and a short video."""
    folder = tmp_path / "images"
    folder.mkdir()
    for name, size in IMAGE_SIZES.items():
        write_image(str(folder / name), size)
    (folder / "broken.png").write_bytes(b"this is not an image")
    write_video(str(folder / "v.mp4"), [0, 80, 160, 240])
    return str(folder)


def anyres_config(aspect: str = "anyres", video_frames: int | None = 3, **changes):
    """A tiny AnyRes (CLIP-like tile: 32 px, patch 8, a CLS token) with `changes` to its fields."""
    tile = ImageGeometry((TILE, TILE), 8, has_cls_token=True)
    anyres = anyres_of(aspect, "(1x1),...,(2x2)", "spatial_unpad", tile, video_frames)
    return dataclasses.replace(anyres, **changes)


def caches(path: str) -> list[str]:
    return glob.glob(glob.escape(path) + ".lengths-*.npz")


def described(items) -> list:
    """Records as they are, bad ones as their messages (what a user sees)."""
    return [str(item) if isinstance(item, BadRecordError) else item for item in items]


def whole_file_dataset(path, tokenizer, version, max_length, folder=None, anyres=None, **options):
    """The dataset as load_supervised_dataset built JSONL and AnyRes data before: every record
    read by load_records, then built from the list."""
    loaded = load_records(path, folder, None, None, options.get("skip_bad_records", False))
    if anyres is None:
        dataset_class, inputs = SupervisedDataset, {"num_image_tokens": NUM_IMAGE_TOKENS}
    else:
        dataset_class, inputs = AnyResDataset, {"anyres": anyres}
    return dataset_class(loaded.records, tokenizer, get_template(version), max_length, **inputs,
                         summary=DataSummary(source=path), skipped=loaded.skipped, **options)  # fmt: skip


def unaddressed(items: list) -> str:
    """Messages without object addresses (PIL names the BytesIO of an unreadable shard image)."""
    return re.sub(r" at 0x[0-9a-f]+", " at 0x...", repr(items))


def same_dataset(a, b) -> None:
    """The same samples (records and images kept), lengths, summary, bad records and items."""
    assert a.lengths == b.lengths and a.modalities == b.modalities
    assert a.summary.line() == b.summary.line()
    assert unaddressed(a.summary.reasons) == unaddressed(b.summary.reasons)
    assert unaddressed(a.bad_records) == unaddressed(b.bad_records)
    assert [a.samples[i] for i in range(len(a))] == [b.samples[i] for i in range(len(b))]
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert x.keys() == y.keys()
        for name, value in x.items():
            assert (value is None and y[name] is None) or torch.equal(value, y[name])


@contextlib.contextmanager
def nothing_tokenized():
    """Tokenizing a conversation inside fails the test."""

    def fail(*args, **kwargs):
        raise AssertionError("tokenized at a start from the length cache")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ConversationTokenizer, "encode_many", fail)
        yield


def skip_list(folder: str) -> str:
    collect_skipped_records(folder)
    with open(os.path.join(folder, SKIPPED_RECORDS)) as f:
        return f.read()


# -- JSONL -----------------------------------------------------------------------------------------
def jsonl_lines(count: int = 30) -> list[bytes]:
    """Good image and text records, blank lines and bad lines of every kind: broken JSON, not
    UTF-8, not an object, more <image> tags than images, a missing image, text the failing
    template rejects, one too long; a BOM before the first line and a CRLF ending."""
    lines = [codecs.BOM_UTF8 + json.dumps(llava_row(0, "a.png")).encode()]
    for i in range(1, count):
        kind = i % 10
        if kind == 1:
            lines.append(json.dumps(llava_row(i, "missing.png")).encode())
        elif kind == 2:
            lines += [b"", b"  \t\r", json.dumps(llava_row(i)).encode() + b"\r"]
        elif kind == 3:
            lines.append(b'{"id": "cut", "conversations": [{"fro')
        elif kind == 4:
            two = [("human", "<image> and <image>"), ("gpt", "Two.")]
            lines.append(json.dumps(llava_row(i, "a.png", two)).encode())
        elif kind == 5:
            lines.append(b'{"id": "caf\xe9"}')
        elif kind == 6:
            lines.append(json.dumps([i]).encode())
        elif kind == 7:
            lines.append(
                json.dumps(llava_row(i, None, [("human", "BOOM?"), ("gpt", "No.")])).encode()
            )
        elif kind == 8:
            lines.append(json.dumps(llava_row(i, None, [("human", "Hi?"), ("gpt", LONG)])).encode())
        else:
            lines.append(json.dumps(llava_row(i, "b.png" if i % 2 else None)).encode())
    return lines


def write_lines(path: str, lines: list[bytes], trailing_newline: bool = True) -> str:
    with open(path, "wb") as f:
        f.write(b"\n".join(lines) + (b"\n" if trailing_newline else b""))
    return path


@pytest.mark.parametrize("trailing_newline", [True, False])
def test_jsonl_rows_are_the_whole_file_readers(tmp_path, images, monkeypatch, trailing_newline):
    """Records and bad-record messages (line numbers included) equal read_jsonl_rows', whatever
    the read size, and from a reader reopened from the cache (no line numbers kept)."""
    path = write_lines(str(tmp_path / "d.jsonl"), jsonl_lines(), trailing_newline)
    expected = described(json_records(path, images, None, None))
    assert any("invalid JSON on line" in str(item) for item in expected)
    for window in (7, 64, 1 << 20):  # reads that cut lines
        monkeypatch.setattr(length_cache, "WINDOW_BYTES", window)
        rows = JsonlRecords.read(path, images)
        assert described(rows) == expected
        reopened = JsonlRecords(path, rows.starts, rows.ends, rows.columns, rows.base_folder)
        assert described(reopened) == expected
    copy = pickle.loads(pickle.dumps(rows))
    assert copy.fd is None and described(copy) == expected


@pytest.mark.parametrize(
    "text", [b"", b"\n  \n\r\n", b'{"text": "hi"}\n', b"[1]\n\n2\n", b"\xef\xbb\xbf\n{}\n"]
)
def test_a_jsonl_file_without_records_gets_the_readers_error(tmp_path, text):
    path = str(tmp_path / "d.jsonl")
    write_lines(path, [text], trailing_newline=False)
    try:
        expected = described(load_records(path, skip_bad_records=True).skipped)
    except DataFileError as error:
        with pytest.raises(DataFileError) as got:
            JsonlRecords.read(path)
        assert str(got.value) == str(error)
        return
    assert described(JsonlRecords.read(path)) == expected  # every row bad, named as before


def test_a_jsonl_dataset_is_the_whole_file_one_cold_and_warm(
    tmp_path, images, tokenizer, processor
):
    tokenizer.chat_template = FAILING_TEMPLATE
    path = write_lines(str(tmp_path / "d.jsonl"), jsonl_lines(40))
    logs = [str(tmp_path / f"out{k}") for k in range(3)]
    options = dict(skip_bad_records=True, image_processor=processor, image_aspect_ratio="pad")
    before = whole_file_dataset(path, tokenizer, "auto", 96, images, skip_log_dir=logs[0],
                                **options)  # fmt: skip

    def load(log):
        return load_supervised_dataset(path, tokenizer, "auto", 96, processor, NUM_IMAGE_TOKENS,
                                       images, "pad", skip_bad_records=True, skip_log_dir=log)  # fmt: skip

    cold = load(logs[1])
    assert isinstance(cold.samples.store, JsonlRecords) and len(caches(path)) == 1
    with nothing_tokenized():
        warm = load(logs[2])
    assert before.summary.skipped_bad == 24 and before.summary.dropped_too_long == 4
    same_dataset(before, cold)
    same_dataset(before, warm)
    assert skip_list(logs[0]) == skip_list(logs[1]) == skip_list(logs[2])


BAD_LINES = {
    "broken JSON": b'{"id": "cut", "conversations": [{"fro',
    "not UTF-8": b'{"id": "caf\xe9"}',
    "not an object": b"[1, 2]",
    "more tags than images": json.dumps(
        llava_row(2, "a.png", [("human", "<image> and <image>"), ("gpt", "Two.")])
    ).encode(),
    "missing image": json.dumps(llava_row(2, "missing.png")).encode(),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_the_first_jsonl_error_is_the_whole_file_ones(tmp_path, images, tokenizer, case):
    """Without skip_bad_records the reader's bad line is raised (before a record the template
    rejects earlier in the file), as before: built, and from a cache built with skipping."""
    tokenizer.chat_template = FAILING_TEMPLATE
    boom = llava_row(0, None, [("human", "BOOM?"), ("gpt", "No.")])
    lines = [json.dumps(boom).encode(), b"", json.dumps(llava_row(1)).encode(), BAD_LINES[case]]
    path = write_lines(str(tmp_path / "d.jsonl"), lines)
    with pytest.raises(BadRecordError) as expected:
        whole_file_dataset(path, tokenizer, "auto", 96, images)
    assert "record 2" in str(expected.value)

    def load(**options):
        return load_supervised_dataset(path, tokenizer, "auto", 96, image_folder=images, **options)

    with pytest.raises(BadRecordError) as cold:
        load()
    assert not caches(path)
    load(skip_bad_records=True)  # writes the cache
    with pytest.raises(BadRecordError) as warm:
        load()
    assert str(cold.value) == str(warm.value) == str(expected.value)


# -- AnyRes ----------------------------------------------------------------------------------------
def anyres_rows(count: int, shards: bool = False) -> list:
    """Records of one tiled image, two images, none, videos (with images in tag order, and
    LLaVA-Video's video tagged <image>), and bad ones: a broken image (its header unreadable),
    a missing image (not in shards, which cannot hold one), more tags than images, too long,
    text the failing template rejects."""
    rows = []
    for i in range(count):
        kind = i % 10
        if kind == 1:
            rows.append(llava_row(i, ["b.png", "c.png"], [("human", "<image> and <image>?"),
                                                          ("gpt", "Two.")]))  # fmt: skip
        elif kind == 2:
            rows.append(llava_row(i))
        elif kind == 3:
            rows.append(llava_row(i, "broken.png"))
        elif kind == 4:
            turns = [("human", "<image> then <video> then <image>?"), ("gpt", "Yes.")]
            rows.append({**llava_row(i, ["a.png", "b.png"], turns), "video": "v.mp4"})
        elif kind == 5:
            turns = [("human", "<image>\nWhat happens?"), ("gpt", "Nothing.")]
            rows.append({**llava_row(i, None, turns), "video": "v.mp4"})
        elif kind == 6:
            rows.append(llava_row(i, "a.png" if shards else "missing.png"))
        elif kind == 7:
            rows.append(llava_row(i, "c.png", [("human", "<image> and <image>"), ("gpt", "Two.")]))
        elif kind == 8:
            rows.append(llava_row(i, None, [("human", "Hi?"), ("gpt", LONG)]))
        elif kind == 9:
            rows.append(llava_row(i, None, [("human", "BOOM?"), ("gpt", "No.")]))
        else:
            rows.append(llava_row(i, ["a.png", "c.png", "b.png"][i % 3]))
    return rows


def write_anyres_data(folder: str, images: str, form: str, count: int) -> str:
    """The rows as a .json list, a .jsonl file or three tar shards; the data path."""
    rows = anyres_rows(count, shards=form == "shards")
    if form == "shards":
        return write_shards(os.path.join(folder, "shards"), rows, images)
    path = os.path.join(folder, f"data.{form}")
    with open(path, "w") as f:
        if form == "jsonl":
            f.writelines(json.dumps(row) + "\n" for row in rows)
        else:
            json.dump(rows, f)
    return path


@pytest.fixture
def header_reads(monkeypatch) -> list[int]:
    """How many image headers an AnyRes dataset read since the test began."""
    calls = [0]
    read_size = anyres_data.read_size

    def counting(*args, **kwargs):
        calls[0] += 1
        return read_size(*args, **kwargs)

    monkeypatch.setattr(anyres_data, "read_size", counting)
    return calls


def load_anyres(path, tokenizer, tower_processor, anyres, images, aspect="anyres", **options):
    return load_supervised_dataset(path, tokenizer, "auto", 512, tower_processor,
                                   image_folder=images, image_aspect_ratio=aspect, anyres=anyres,
                                   skip_bad_records=True, **options)  # fmt: skip


@pytest.mark.parametrize("aspect", ["anyres", "anyres_max_1"])
@pytest.mark.parametrize("form", ["json", "jsonl", "shards"])
def test_an_anyres_dataset_from_the_cache_reads_no_header_and_is_the_whole_file_one(
    tmp_path, images, tokenizer, tower_processor, header_reads, form, aspect
):
    tokenizer.chat_template = FAILING_TEMPLATE
    anyres = anyres_config(aspect)
    path = write_anyres_data(str(tmp_path), images, form, 20)
    folder = None if form == "shards" else images
    before = whole_file_dataset(path, tokenizer, "auto", 512, folder, anyres,
                                image_processor=tower_processor, image_aspect_ratio=aspect,
                                skip_bad_records=True)  # fmt: skip
    read_before = header_reads[0]
    assert read_before > 0
    cold = load_anyres(path, tokenizer, tower_processor, anyres, folder, aspect)
    assert isinstance(cold, AnyResDataset) and cold.samples.store is not None
    assert header_reads[0] == 2 * read_before  # the same headers as before, once
    cache_path = path if form != "shards" else os.path.join(tmp_path, "shards", "{000..002}.tar")
    assert len(caches(cache_path)) == 1
    with nothing_tokenized():
        warm = load_anyres(path, tokenizer, tower_processor, anyres, folder, aspect)
    assert header_reads[0] == 2 * read_before  # none read from the cache
    assert isinstance(warm, AnyResDataset)
    assert len(before) >= 6 and before.summary.skipped_bad >= 6
    assert {record.id for record, _ in (before.samples[i] for i in range(len(before)))} >= (
        {"r0", "r1", "r2"} | ({"r4", "r5"} if form != "shards" else set())
    )  # tiled, several and no images; videos, but in shards (a named bad record)
    same_dataset(before, cold)
    same_dataset(before, warm)


def test_every_anyres_setting_is_in_the_cache_key(tokenizer):
    """Two AnyRes configurations that differ in any field (or in max_image_pixels) give two
    keys; the same configuration made twice gives one; a dataset without AnyRes keeps the key
    it had before AnyRes joined the cache."""
    store = RowStore(identity={"path": "/d.json"}, cache_path="/d.json", read=None, reopen=None)
    template = get_template("v1")

    def path_of(anyres, max_image_pixels=1000, dataset_class=AnyResDataset):
        key = length_cache_key(store, dataset_class, tokenizer, template, 96, ["r"], ["i"],
                               anyres, max_image_pixels)  # fmt: skip
        return LengthCache(key, "/d.json").path

    tile = ImageGeometry((TILE, TILE), 8, has_cls_token=True)
    variants = [
        anyres_config(),
        anyres_config(pinpoints=((32, 32), (32, 64))),
        anyres_config(merge="flat"),
        anyres_config(max_tiles=4),
        anyres_config(several_images_whole=True),
        anyres_config(video=None),
        anyres_config(video=VideoSampling(4)),
        anyres_config(video=VideoSampling(3, pool_stride=1)),
        anyres_config(tile=dataclasses.replace(tile, patch_size=16)),
        anyres_config(tile=dataclasses.replace(tile, has_cls_token=False)),
        anyres_config(tile=ImageGeometry((16, 16), 8, True)),
    ]
    paths = [path_of(anyres) for anyres in variants]
    assert len(set(paths)) == len(variants)
    assert path_of(anyres_config()) == paths[0]
    assert path_of(anyres_config(), max_image_pixels=2000) != paths[0]
    plain = length_cache_key(store, SupervisedDataset, tokenizer, template, 96, ["r"], ["i"],
                             None, 1000)  # fmt: skip
    assert "anyres" not in plain and "max_image_pixels" not in plain


def test_another_anyres_config_rebuilds_and_never_reads_a_stale_cache(
    tmp_path, images, tokenizer, tower_processor, header_reads
):
    path = write_anyres_data(str(tmp_path), images, "json", 10)
    first = load_anyres(path, tokenizer, tower_processor, anyres_config(), images)
    other = anyres_config(pinpoints=((32, 32), (64, 64)))
    reads = header_reads[0]
    rebuilt = load_anyres(path, tokenizer, tower_processor, other, images)
    assert header_reads[0] > reads and len(caches(path)) == 2
    expected = whole_file_dataset(path, tokenizer, "auto", 512, images, other,
                                  image_processor=tower_processor, image_aspect_ratio="anyres",
                                  skip_bad_records=True)  # fmt: skip
    assert rebuilt.lengths == expected.lengths != first.lengths


@pytest.mark.parametrize("form", ["json", "jsonl"])
def test_an_anyres_build_shared_by_forked_children_is_the_one_process_build(
    tmp_path, images, tokenizer, tower_processor, monkeypatch, form
):
    """AnyResDataset's add_block runs in the children: the same samples, lengths, summary, bad
    records (in order, listed once) and first error as one process and as the whole file."""
    monkeypatch.setattr(dataset_module, "ENCODE_BLOCK", 4)
    monkeypatch.setattr(dataset_module, "SHARE_BLOCKS", 2)
    monkeypatch.setenv("LLAVA_LENGTH_CACHE", "0")
    tokenizer.chat_template = FAILING_TEMPLATE
    anyres = anyres_config()
    path = write_anyres_data(str(tmp_path), images, form, 40)
    logs = {workers: str(tmp_path / f"out{workers}") for workers in (1, 2)}
    built = {
        workers: load_anyres(path, tokenizer, tower_processor, anyres, images,
                             build_workers=workers, skip_log_dir=logs[workers])
        for workers in (1, 2)
    }  # fmt: skip
    assert SupervisedDataset.build_shares(built[2].samples.store, (), 2) == 2
    before = whole_file_dataset(path, tokenizer, "auto", 512, images, anyres,
                                image_processor=tower_processor, image_aspect_ratio="anyres",
                                skip_bad_records=True)  # fmt: skip
    same_dataset(before, built[1])
    same_dataset(before, built[2])
    assert len(before.bad_records) == 16  # broken, missing, tags, template: 4 of every 10
    assert skip_list(logs[1]) == skip_list(logs[2])
    errors = []
    for workers in (1, 2):
        with pytest.raises(BadRecordError) as error:
            load_supervised_dataset(path, tokenizer, "auto", 512, tower_processor,
                                    image_folder=images, image_aspect_ratio="anyres",
                                    anyres=anyres, build_workers=workers)  # fmt: skip
        errors.append(str(error.value))
    with pytest.raises(BadRecordError) as expected:
        whole_file_dataset(path, tokenizer, "auto", 512, images, anyres,
                           image_processor=tower_processor, image_aspect_ratio="anyres")  # fmt: skip
    assert errors == [str(expected.value)] * 2
