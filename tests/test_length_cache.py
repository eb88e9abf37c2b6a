"""Start-up at scale: JSON rows as byte ranges, and the length cache (same result, no re-tokenizing)."""

import codecs
import glob
import json
import logging
import os
import pickle
import random

import pytest
import torch
from transformers import AutoTokenizer, CLIPImageProcessor

import llava.data.dataset as dataset_module
import llava.data.length_cache as length_cache
from llava.data.dataset import SupervisedDataset, load_supervised_dataset, split_for_validation
from llava.data.forked import ChildFailed, contiguous_shares, map_forked
from llava.data.formats import BadRecordError, DataFileError, read_json_list
from llava.data.length_cache import JsonRecords, LengthCache, built_once, scan_json_list
from llava.data.skipped import SKIPPED_RECORDS, collect_skipped_records
from llava.data.tokenize import ConversationTokenizer
from tests.test_data_formats import llava_row, write_image, write_rows

NUM_IMAGE_TOKENS = 8


@pytest.fixture
def tokenizer(tokenizer_paths):
    return AutoTokenizer.from_pretrained(tokenizer_paths["sp"])


@pytest.fixture
def processor() -> CLIPImageProcessor:
    return CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})


@pytest.fixture
def data(tmp_path) -> tuple[str, str]:
    """(data path, image folder): image and text records, one shortened, one too long."""
    folder = tmp_path / "images"
    folder.mkdir()
    write_image(str(folder / "a.png"))
    long = " ".join(["word"] * 120)
    rows = [llava_row(i, "a.png" if i % 3 else None) for i in range(12)]
    rows.append(llava_row(12, None, [("human", "Hi?"), ("gpt", long)]))  # too long
    rows.append(llava_row(13, None, [("human", "Hi?"), ("gpt", "Yes."), ("human", "More?"),
                                     ("gpt", long)]))  # fmt: skip
    return write_rows(str(tmp_path), rows), str(folder)


def build(data, tokenizer, processor, max_length=96, **options):
    path, folder = data
    return load_supervised_dataset(
        path, tokenizer, "v1", max_length, processor, NUM_IMAGE_TOKENS, folder, "pad", **options
    )


def caches(data) -> list[str]:
    return glob.glob(glob.escape(data[0]) + ".lengths-*.npz")


@pytest.fixture
def count_encodes(monkeypatch) -> list[int]:
    """How many conversations were tokenized since the test began."""
    calls = [0]
    encode_many = ConversationTokenizer.encode_many

    def counting(self, turns_list, *args):
        calls[0] += len(turns_list)
        return encode_many(self, turns_list, *args)

    monkeypatch.setattr(ConversationTokenizer, "encode_many", counting)
    return calls


def same_dataset(a, b) -> None:
    assert (a.lengths, a.modalities, a.modality_lengths) == (b.lengths, b.modalities,
                                                             b.modality_lengths)  # fmt: skip
    assert a.summary.line() == b.summary.line() and len(a) == len(b)
    assert a.max_images_per_sample == b.max_images_per_sample
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert torch.equal(x["input_ids"], y["input_ids"])
        assert torch.equal(x["labels"], y["labels"])
        assert (x["pixel_values"] is None) == (y["pixel_values"] is None)
        if x["pixel_values"] is not None:
            assert torch.equal(x["pixel_values"], y["pixel_values"])


# -- rows as byte ranges ----------------------------------------------------------------------------
@pytest.mark.parametrize("ensure_ascii", [True, False])
@pytest.mark.parametrize("indent", [None, 1])
@pytest.mark.parametrize("bom", [False, True])
def test_scan_finds_every_row_across_window_ends(tmp_path, monkeypatch, ensure_ascii, indent, bom):
    rng = random.Random(0)
    rows = [{"id": i, "text": 'héllo ✓ " ] , ' * rng.randint(0, 9)} for i in range(60)]
    rows += [12345, 3.5e-7, "x", [1, [2]], None, True, {}]
    data = json.dumps(rows, ensure_ascii=ensure_ascii, indent=indent).encode()
    path = tmp_path / "rows.json"
    path.write_bytes((codecs.BOM_UTF8 if bom else b"") + data)
    for window in (5, 61, 1 << 20):  # windows that cut rows, strings and numbers
        monkeypatch.setattr(length_cache, "WINDOW_BYTES", window)
        scan = scan_json_list(str(path), None)
        raw = path.read_bytes()
        assert [json.loads(raw[a:b]) for a, b in zip(scan.starts, scan.ends)] == rows


@pytest.mark.parametrize(
    "text", [b"", b"[]", b'{"a": 1}', b"[1,", b"[1 2]", b"[1] x", b"[\xff]", b'[{"a": 1}']
)
def test_a_file_that_is_no_list_of_records_gets_the_readers_error(tmp_path, text):
    path = tmp_path / "data.json"
    path.write_bytes(text)
    with pytest.raises(DataFileError) as expected:
        read_json_list(str(path))
    with pytest.raises(DataFileError) as got:
        JsonRecords.read(str(path))
    assert str(got.value) == str(expected.value)


def test_samples_keep_rows_not_records_and_pickle_without_the_open_file(data, tokenizer, processor):
    dataset = build(data, tokenizer, processor)
    assert dataset.samples.keys.typecode == "q"  # row numbers, parsed again when loaded
    assert dataset.samples[0][0].id == "r0"
    dataset[0]  # opens the file
    copy = pickle.loads(pickle.dumps(dataset))
    assert copy.samples.store.fd is None
    assert torch.equal(copy[1]["input_ids"], dataset[1]["input_ids"])
    train, validation = split_for_validation(dataset, 25, seed=0)
    assert sorted(train.lengths + validation.lengths) == sorted(dataset.lengths)
    assert validation[0]["input_ids"].shape[0] == validation.lengths[0]


# -- the cache --------------------------------------------------------------------------------------
def test_a_second_start_reads_the_cache_and_gives_the_same_dataset(
    data, tokenizer, processor, count_encodes, monkeypatch
):
    first = build(data, tokenizer, processor)
    assert count_encodes[0] == 14 and len(caches(data)) == 1
    assert (first.summary.shortened, first.summary.dropped_too_long) == (1, 1)
    second = build(data, tokenizer, processor)
    assert count_encodes[0] == 14  # nothing tokenized at start-up
    same_dataset(first, second)
    monkeypatch.setenv("LLAVA_LENGTH_CACHE", "0")
    uncached = build(data, tokenizer, processor)
    assert count_encodes[0] == 28
    same_dataset(second, uncached)


@pytest.mark.parametrize("change", ["max_length", "tokenizer", "data", "image_tokens"])
def test_a_changed_input_rebuilds_and_never_reads_a_stale_cache(
    data, tokenizer, processor, count_encodes, change, tokenizer_paths
):
    build(data, tokenizer, processor)
    max_length = 96
    if change == "max_length":
        max_length = 64
    elif change == "tokenizer":
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_paths["sp"])
        tokenizer.add_tokens(["word"])  # "word" is now one id: every length differs
    elif change == "data":
        rows = json.loads(open(data[0]).read())
        rows[0]["conversations"][1]["value"] = "A cat on a mat, sitting."
        write_rows(os.path.dirname(data[0]), rows)
    path, folder = data
    tokens = NUM_IMAGE_TOKENS * (2 if change == "image_tokens" else 1)
    rebuilt = load_supervised_dataset(
        path, tokenizer, "v1", max_length, processor, tokens, folder, "pad"
    )
    assert count_encodes[0] == 28  # tokenized again
    assert len(caches(data)) == 2
    fresh = [len(rebuilt.load(i)["input_ids"]) for i in range(len(rebuilt))]
    assert rebuilt.lengths == fresh


def test_a_cache_whose_key_differs_inside_is_not_used(data, tokenizer, processor, count_encodes):
    build(data, tokenizer, processor)
    (path,) = caches(data)
    cache = LengthCache({"another": "key"}, data[0])
    cache.path = path  # same file name, other key
    assert cache.load() is None


def test_a_damaged_cache_file_is_rebuilt(data, tokenizer, processor, count_encodes):
    first = build(data, tokenizer, processor)
    (path,) = caches(data)
    with open(path, "r+b") as f:
        f.truncate(100)
    second = build(data, tokenizer, processor)
    assert count_encodes[0] == 28
    same_dataset(first, second)
    build(data, tokenizer, processor)  # the rewritten cache is read
    assert count_encodes[0] == 28


def test_bad_records_come_back_from_the_cache(tmp_path, tokenizer, processor, count_encodes):
    folder = tmp_path / "images"
    folder.mkdir()
    write_image(str(folder / "a.png"))
    rows = [
        llava_row(0, "a.png"),
        llava_row(1, "missing.png"),  # found by the reader
        [1, 2],  # not an object
        llava_row(3, None, [("gpt", "Hello.")]),  # no user turn
        llava_row(4),
    ]
    data = (write_rows(str(tmp_path), rows), str(folder))
    out = str(tmp_path / "out")
    first = build(data, tokenizer, processor, skip_bad_records=True, skip_log_dir=out)
    second = build(data, tokenizer, processor, skip_bad_records=True, skip_log_dir=out)
    assert count_encodes[0] == 2
    assert first.summary.skipped_bad == second.summary.skipped_bad == 3
    assert first.summary.reasons == second.summary.reasons
    same_dataset(first, second)
    with pytest.raises(BadRecordError, match=r"data\.json record 1 \(id r1\): image file"):
        build(data, tokenizer, processor)  # from the cache too, without skip_bad_records


# A chat template that fails on one record: a bad record found only when rendering.
FAILING_TEMPLATE = (
    "{% for m in messages %}{% if 'BOOM' in m['content'] %}{{ raise_exception('boom') }}"
    "{% endif %}{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


def test_the_readers_bad_records_come_first_as_before(tmp_path, tokenizer, caplog):
    """Rendering finds record 0 bad, the reader record 2: the reader's is raised (it was read
    first before), and both are listed in that order, from the cache too."""
    tokenizer.chat_template = FAILING_TEMPLATE
    rows = [llava_row(0, None, [("human", "BOOM?"), ("gpt", "No.")]), llava_row(1), [1]]
    path = write_rows(str(tmp_path), rows)
    with pytest.raises(BadRecordError, match="record 2: a record must be a JSON object"):
        load_supervised_dataset(path, tokenizer, "auto", 96)
    for _ in range(2):  # built, then from the cache
        dataset = load_supervised_dataset(path, tokenizer, "auto", 96, skip_bad_records=True)
        assert len(dataset) == 1 and dataset.summary.skipped_bad == 2
        assert "record 2" in dataset.summary.reasons[0] and "boom" in dataset.summary.reasons[1]


def test_the_cache_goes_elsewhere_when_the_data_folder_is_read_only(
    data, tokenizer, processor, tmp_path, monkeypatch
):
    monkeypatch.setattr(length_cache.os, "access", lambda path, mode: False)
    out = tmp_path / "out"
    build(data, tokenizer, processor, skip_bad_records=True, skip_log_dir=str(out))
    assert not caches(data) and len(glob.glob(str(out / "data.json.lengths-*.npz"))) == 1


def test_other_ranks_wait_for_rank_0s_cache(data, tokenizer, processor, monkeypatch, caplog):
    """Rank 1 builds nothing when rank 0's cache is there after the barrier."""
    build(data, tokenizer, processor)  # what rank 0 writes
    (path,) = caches(data)
    saved, key = open(path, "rb").read(), json.loads(saved_meta(path))["key"]
    os.remove(path)
    monkeypatch.setattr(length_cache, "distributed_rank", lambda: (1, 2))
    monkeypatch.setattr(torch.distributed, "barrier", lambda: open(path, "wb").write(saved))
    cache = LengthCache({}, data[0])
    cache.path, cache.key_text = path, key
    built = []
    used = built_once(cache, lambda builders: built.append(1), lambda cached: len(cached.lengths))
    assert not built and used == len(build(data, tokenizer, processor).lengths)


@pytest.mark.parametrize("rank", [0, 1])
def test_every_rank_waits_once_even_when_the_cache_is_already_there(
    data, tokenizer, processor, monkeypatch, rank
):
    """A rank that finds rank 0's fresh cache before reaching the barrier still meets rank 0
    there: skipping it left the two ranks' collectives out of step (a hang at the next one)."""
    build(data, tokenizer, processor)
    (path,) = caches(data)
    key = json.loads(saved_meta(path))["key"]
    barriers = []
    monkeypatch.setattr(length_cache, "distributed_rank", lambda: (rank, 2))
    monkeypatch.setattr(torch.distributed, "barrier", lambda: barriers.append(rank))
    cache = LengthCache({}, data[0])
    cache.path, cache.key_text = path, key
    built = []
    built_once(cache, lambda builders: built.append(1), lambda cached: len(cached.lengths))
    assert barriers == [rank] and not built


def saved_meta(path: str) -> bytes:
    import numpy as np

    with np.load(path) as arrays:
        return arrays["meta"].tobytes()


def test_rank_0_builds_and_then_releases_the_others(monkeypatch):
    events = []
    monkeypatch.setattr(length_cache, "distributed_rank", lambda: (0, 2))
    monkeypatch.setattr(torch.distributed, "barrier", lambda: events.append("barrier"))
    cache = LengthCache({}, "/nonexistent/data.json")
    assert built_once(cache, lambda builders: events.append(builders) or "built", None) == "built"
    assert events == [1, "barrier"]  # rank 0 builds alone: every CPU of its machine
    with pytest.raises(ValueError):  # a failing build still releases the others
        built_once(cache, lambda builders: (events.append(builders), int("x")), None)
    assert events[-1] == "barrier"


@pytest.mark.parametrize(
    "env, builders",
    [({"LOCAL_WORLD_SIZE": "4"}, 4), ({"LOCAL_SIZE": "8"}, 8), ({}, 1)],  # torchrun, deepspeed
)
def test_ranks_that_cannot_see_rank_0s_cache_share_their_machines_cpus(
    data, tokenizer, processor, monkeypatch, env, builders
):
    """Ranks of a machine without rank 0's cache (a local disk) all build at once: each forks
    its share of the CPUs, not every CPU."""
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(length_cache, "distributed_rank", lambda: (1, 2))
    monkeypatch.setattr(torch.distributed, "barrier", lambda: None)
    seen = []
    monkeypatch.setattr(
        dataset_module.SupervisedDataset,
        "build_shares",
        staticmethod(lambda records, skipped, workers: seen.append(workers) or 1),
    )
    build(data, tokenizer, processor, build_workers=8)
    assert seen == [8 // builders]


def test_summary_line_stays_the_last_warning(data, tokenizer, processor, caplog):
    with caplog.at_level(logging.WARNING):
        build(data, tokenizer, processor)
        build(data, tokenizer, processor)
    assert caplog.messages[-1].startswith(f"data {data[0]}: 14 records -> 13 samples")


# -- the first build shared by forked children ------------------------------------------------------
def test_forked_shares_run_at_once_and_come_back_in_order():
    results = map_forked(lambda share: (os.getpid(), share * 2), [1, 2, 3])
    assert [value for _, value in results] == [2, 4, 6]
    pids = {pid for pid, _ in results}
    assert len(pids) == 3 and os.getpid() not in pids
    assert contiguous_shares(10, 3) == [range(0, 3), range(3, 6), range(6, 10)]
    assert contiguous_shares(2, 5) == [range(0, 1), range(1, 2)]


def test_each_forked_share_runs_torch_on_one_thread():
    """The children are one per CPU: torch's pool in each would oversubscribe them."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert map_forked(lambda share: torch.get_num_threads(), [1, 2]) == [1, 1]
        assert torch.get_num_threads() == 2  # the parent's pool is left alone
    finally:
        torch.set_num_threads(before)


def test_an_error_in_a_forked_share_is_raised_with_its_traceback():
    def work(share):
        if share == 2:
            raise ValueError("share two is broken")
        return share

    with pytest.raises(ChildFailed, match="(?s)1 of 3 children failed.*share two is broken"):
        map_forked(work, [1, 2, 3])


def mixed_rows() -> list:
    """Good image and text records with bad ones of every kind spread over the file."""
    long = " ".join(["word"] * 120)
    rows = []
    for i in range(60):
        kind = i % 10
        if kind == 3:
            rows.append(llava_row(i, "missing.png"))  # the reader's: no such image
        elif kind == 5:
            rows.append([i])  # the reader's: not an object
        elif kind == 6:
            rows.append(llava_row(i, None, [("human", "BOOM?"), ("gpt", "No.")]))  # the template's
        elif kind == 7:
            rows.append(llava_row(i, None, [("human", "Hi?"), ("gpt", long)]))  # too long
        elif kind == 8:
            turns = [("human", "Hi?"), ("gpt", "Yes."), ("human", "More?"), ("gpt", long)]
            rows.append(llava_row(i, None, turns))  # shortened
        else:
            rows.append(llava_row(i, "a.png" if i % 2 else None))
    return rows


def test_a_build_shared_by_forked_children_is_the_one_process_build(
    tmp_path, tokenizer, processor, monkeypatch
):
    """The rows cut into shares tokenized in children give the same samples, summary, bad
    records (in the same order, listed once, by the parent) and first error as one process."""
    monkeypatch.setattr(dataset_module, "ENCODE_BLOCK", 4)
    monkeypatch.setattr(dataset_module, "SHARE_BLOCKS", 2)
    monkeypatch.setenv("LLAVA_LENGTH_CACHE", "0")
    tokenizer.chat_template = FAILING_TEMPLATE
    folder = tmp_path / "images"
    folder.mkdir()
    write_image(str(folder / "a.png"))
    path = write_rows(str(tmp_path), mixed_rows())

    def load(workers, **options):
        return load_supervised_dataset(path, tokenizer, "auto", 96, processor, NUM_IMAGE_TOKENS,
                                       str(folder), "pad", build_workers=workers, **options)  # fmt: skip

    logs = {workers: str(tmp_path / f"out{workers}") for workers in (1, 3)}
    one, shared = (load(w, skip_bad_records=True, skip_log_dir=logs[w]) for w in (1, 3))
    assert SupervisedDataset.build_shares(shared.samples.store, (), 3) == 3
    same_dataset(one, shared)
    assert one.bad_records == shared.bad_records and len(one.bad_records) == 18
    assert [index for index, _, _ in one.bad_records[:12]] == [
        i for i in range(60) if i % 10 in (3, 5)
    ]
    assert one.summary.reasons == shared.summary.reasons
    assert one.summary.dropped_too_long == shared.summary.dropped_too_long == 6
    assert [collect_skipped_records(logs[w]) for w in (1, 3)] == [18, 18]
    listed = [open(os.path.join(logs[w], SKIPPED_RECORDS)).read() for w in (1, 3)]
    assert listed[0] == listed[1]
    for workers in (1, 3):
        with pytest.raises(BadRecordError, match=r"record 3 \(id r3\): image file"):
            load(workers)
