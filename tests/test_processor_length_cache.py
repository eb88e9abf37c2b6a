"""The row-by-row path and length cache for transformers processor models (Qwen2-VL, Idefics3,
PaliGemma): the same samples, lengths, summary, bad records, first error and loaded items as
the whole-file path (load_records, what load_processor_dataset did before), a first build
shared by forked children that is the one-process build, and a start from the cache that
tokenizes no record and reads no image header; the processor's settings are in the cache key."""

import contextlib
import json
import os
import pickle
from unittest.mock import Mock

import pytest
import torch
from transformers import AutoProcessor

import llava.data.dataset as dataset_module
import tests.test_length_cache_more as length_cache_more_tests
from llava.conversation import get_template
from llava.data.dataset import DataSummary, RowStore, length_cache_key
from llava.data.formats import BadRecordError, load_records
from llava.data.length_cache import LengthCache, processor_fingerprint
from llava.data.processor_media import (
    ProcessorConversationTokenizer,
    ProcessorDataset,
    PromptSuffixDataset,
    PromptSuffixMedia,
    is_prompt_suffix,
    load_processor_dataset,
)
from llava.data.tokenize import ConversationTokenizer
from tests.fixtures.tiny_vlms import PROMPT_FAMILIES, VLM_FAMILIES, tiny_image
from tests.test_data_formats import llava_row, write_rows
from tests.test_shards import write_shards

same_dataset = length_cache_more_tests.same_dataset  # samples, lengths, summary, bad, items
skip_list = length_cache_more_tests.skip_list
unaddressed = length_cache_more_tests.unaddressed  # PIL names a shard image's BytesIO
caches = length_cache_more_tests.caches

# Two families whose token counts depend on the image's size (Qwen2-VL's grid, Idefics3's
# tiles) on both transformers lines, and PaliGemma's prompt+suffix processor (5.x only).
CONVERSATION_FAMILIES = [f for f in ("qwen2_vl", "idefics3") if f in VLM_FAMILIES]
SUFFIX_FAMILIES = [f for f in ("paligemma",) if f in PROMPT_FAMILIES]
FAMILIES = CONVERSATION_FAMILIES + SUFFIX_FAMILIES
IMAGE_SIZES = {"a.png": (40, 70), "b.png": (90, 30), "c.png": (33, 33)}
MAX_LENGTH = 200
LONG = " ".join(["word"] * 300)
FORMS = ["json", "jsonl", "shards"]


@pytest.fixture(scope="module")
def processors(tiny_vlm_paths) -> dict:
    return {family: AutoProcessor.from_pretrained(tiny_vlm_paths[family]) for family in FAMILIES}


@pytest.fixture
def images(tmp_path) -> str:
    """A folder of noise images of three sizes and a broken one."""
    folder = tmp_path / "images"
    folder.mkdir()
    for seed, (name, size) in enumerate(IMAGE_SIZES.items()):
        tiny_image(size, seed).save(folder / name)
    (folder / "broken.png").write_bytes(b"this is not an image")
    return str(folder)


@pytest.fixture
def header_reads(monkeypatch) -> Mock:
    """The image-header reader datasets call, counting (`call_count`) since the test began."""
    reader = Mock(wraps=dataset_module.read_size)
    monkeypatch.setattr(dataset_module, "read_size", reader)
    return reader


@contextlib.contextmanager
def no_record_tokenized():
    """Tokenizing or measuring a record inside fails the test (the processor's probes at
    construction, a constant cost, still run)."""

    def fail(*args, **kwargs):
        raise AssertionError("a record tokenized at a start from the length cache")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ConversationTokenizer, "encode_segments", fail)
        patch.setattr(ProcessorConversationTokenizer, "encode_with_sizes", fail)
        patch.setattr(PromptSuffixMedia, "length", fail)
        yield


def conversation_rows(count: int, shards: bool) -> list:
    """Records of one image, two, none, images in a later turn, one shortened, and bad ones: a
    broken image (its header unreadable), a missing one (not in shards, which cannot hold one),
    more <image> tags than images, one too long."""
    rows = []
    for i in range(count):
        kind = i % 10
        if kind == 1:
            two = [("human", "<image> and <image>?"), ("gpt", "Two.")]
            rows.append(llava_row(i, ["b.png", "c.png"], two))
        elif kind == 2:
            rows.append(llava_row(i))
        elif kind == 3:
            rows.append(llava_row(i, "broken.png"))
        elif kind == 4:
            rows.append(llava_row(i, "a.png" if shards else "missing.png"))
        elif kind == 5:
            rows.append(llava_row(i, "c.png", [("human", "<image> and <image>"), ("gpt", "Two.")]))
        elif kind == 6:
            rows.append(llava_row(i, None, [("human", "Hi?"), ("gpt", LONG)]))
        elif kind == 7:
            turns = [("human", "<image>\nHi?"), ("gpt", "Yes."), ("human", "More?"), ("gpt", LONG)]
            rows.append(llava_row(i, "b.png", turns))  # shortened
        elif kind == 8:
            turns = [("human", "Hi?"), ("gpt", "Yes."), ("human", "And <image>?"), ("gpt", "No.")]
            rows.append(llava_row(i, "c.png", turns))
        else:
            rows.append(llava_row(i, ["a.png", "b.png", "c.png"][i % 3]))
    return rows


def prompt_suffix_rows(count: int, shards: bool) -> list:
    """Single-turn records of one image, and bad ones: a missing image (not in shards), a
    broken one, two turns, no image (a bare prompt is about images); one too long."""
    rows = []
    for i in range(count):
        kind = i % 6
        if kind == 1:
            rows.append(llava_row(i, "b.png" if shards else "missing.png"))
        elif kind == 2:
            rows.append(llava_row(i, "broken.png"))
        elif kind == 3:
            turns = [("human", "<image>\nHi?"), ("gpt", "Yes."), ("human", "More?"), ("gpt", "No.")]
            rows.append(llava_row(i, "a.png", turns))
        elif kind == 4:
            rows.append(llava_row(i))
        elif kind == 5:
            rows.append(llava_row(i, "c.png", [("human", "<image>\nHi?"), ("gpt", LONG)]))
        else:
            rows.append(llava_row(i, ["a.png", "b.png", "c.png"][i % 3]))
    return rows


def write_data(folder: str, images: str, family: str, form: str, count: int) -> str:
    """The family's rows as a .json list, a .jsonl file or three tar shards; the data path."""
    rows_of = prompt_suffix_rows if family in SUFFIX_FAMILIES else conversation_rows
    rows = rows_of(count, shards=form == "shards")
    if form == "shards":
        return write_shards(os.path.join(folder, "shards"), rows, images)
    return write_rows(folder, rows, f"data.{form}")


def whole_file_dataset(path, processor, folder, **options) -> ProcessorDataset:
    """The dataset as load_processor_dataset built it before: every record read by
    load_records, then built from the list."""
    loaded = load_records(path, folder, None, None, options.get("skip_bad_records", False))
    dataset_class = PromptSuffixDataset if is_prompt_suffix(processor) else ProcessorDataset
    return dataset_class(loaded.records, processor, get_template("auto"), MAX_LENGTH,
                         summary=DataSummary(source=path), skipped=loaded.skipped, **options)  # fmt: skip


def load(path, processor, folder, **options) -> ProcessorDataset:
    return load_processor_dataset(path, processor, "auto", MAX_LENGTH, folder, **options)


def cache_path_of(path: str, tmp_path) -> str:
    return os.path.join(tmp_path, "shards", "{000..002}.tar") if "{" in path else path


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("family", FAMILIES)
def test_a_processor_dataset_from_the_cache_reads_no_header_and_is_the_whole_file_one(
    tmp_path, images, processors, header_reads, family, form
):
    processor = processors[family]
    path = write_data(str(tmp_path), images, family, form, 20)
    folder = None if form == "shards" else images
    logs = [str(tmp_path / f"out{k}") for k in range(3)]
    before = whole_file_dataset(path, processor, folder, skip_bad_records=True,
                                skip_log_dir=logs[0])  # fmt: skip
    read_before = header_reads.call_count
    assert read_before > 0
    cold = load(path, processor, folder, skip_bad_records=True, skip_log_dir=logs[1])
    assert type(cold) is type(before) and cold.samples.store is not None
    assert header_reads.call_count == 2 * read_before  # the same headers as before, once
    assert len(caches(cache_path_of(path, tmp_path))) == 1
    with no_record_tokenized():
        warm = load(path, processor, folder, skip_bad_records=True, skip_log_dir=logs[2])
    assert header_reads.call_count == 2 * read_before  # none read from the cache
    assert type(warm) is type(before) and warm.samples.store is not None
    summary = before.summary
    assert len(before) >= 4 and summary.skipped_bad >= 4 and summary.dropped_too_long >= 2
    assert summary.shortened == (2 if family in CONVERSATION_FAMILIES else 0)
    same_dataset(before, cold)  # every item too: input_ids, labels, pixels, grids, ...
    same_dataset(before, warm)
    copy = pickle.loads(pickle.dumps(warm))  # as loader workers get it
    assert torch.equal(copy[len(copy) - 1]["input_ids"], warm[len(warm) - 1]["input_ids"])
    listed = [unaddressed(skip_list(log)) for log in logs]
    assert listed[0] == listed[1] == listed[2]
    with pytest.raises(BadRecordError) as expected:
        whole_file_dataset(path, processor, folder)
    with pytest.raises(BadRecordError) as from_cache:
        load(path, processor, folder)
    assert unaddressed(str(from_cache.value)) == unaddressed(str(expected.value))


@pytest.mark.parametrize("form", ["jsonl", "shards"])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_processor_build_shared_by_forked_children_is_the_one_process_build(
    tmp_path, images, processors, monkeypatch, family, form
):
    """The processor datasets' add_block runs in the children: the same samples, lengths,
    summary, bad records (in order, listed once) and first error as one process and as the
    whole file."""
    monkeypatch.setattr(dataset_module, "ENCODE_BLOCK", 4)
    monkeypatch.setattr(dataset_module, "SHARE_BLOCKS", 2)
    monkeypatch.setenv("LLAVA_LENGTH_CACHE", "0")
    processor = processors[family]
    path = write_data(str(tmp_path), images, family, form, 24)
    folder = None if form == "shards" else images
    logs = {workers: str(tmp_path / f"out{workers}") for workers in (1, 2)}
    built = {
        workers: load(path, processor, folder, skip_bad_records=True, build_workers=workers,
                      skip_log_dir=logs[workers])
        for workers in (1, 2)
    }  # fmt: skip
    assert dataset_module.SupervisedDataset.build_shares(built[2].samples.store, (), 2) == 2
    before = whole_file_dataset(path, processor, folder, skip_bad_records=True)
    same_dataset(before, built[1])
    same_dataset(before, built[2])
    assert len(before.bad_records) >= 5  # broken images, tags; missing images but in shards
    assert unaddressed(skip_list(logs[1])) == unaddressed(skip_list(logs[2]))
    with pytest.raises(BadRecordError) as expected:
        whole_file_dataset(path, processor, folder)
    for workers in (1, 2):
        with pytest.raises(BadRecordError) as error:
            load(path, processor, folder, build_workers=workers)
        assert unaddressed(str(error.value)) == unaddressed(str(expected.value))


# A setting of each family's image processor that changes its images' token counts (but
# PaliGemma's, whose image_seq_length tokens stay: a setting the key holds all the same)
OTHER_TOKENS = {
    "qwen2_vl": {"min_pixels": 8 * 28 * 28},  # a larger grid for the small images
    "idefics3": {"size": {"longest_edge": 32}},  # one tile, not several
    "paligemma": {"size": {"height": 28, "width": 28}},  # other pixels (its tokens stay)
}


def cache_file(processor, version: str = "auto", max_length: int = MAX_LENGTH,
               max_image_pixels: int = 1000) -> str:  # fmt: skip
    """The cache file a data file's build with these settings is saved in."""
    store = RowStore(identity={"path": "/d.json"}, cache_path="/d.json", read=None, reopen=None)
    key = length_cache_key(store, ProcessorDataset, processor.tokenizer, get_template(version),
                           max_length, ["r"], [], None, max_image_pixels, processor=processor)  # fmt: skip
    return LengthCache(key, "/d.json").path


@pytest.mark.parametrize("family", FAMILIES)
def test_the_processors_settings_are_in_the_cache_key(family, tiny_vlm_paths):
    """Another image-processor setting, chat template (named, or the processor's own),
    model_max_length or max_image_pixels gives another key."""
    first, again = (AutoProcessor.from_pretrained(tiny_vlm_paths[family]) for _ in range(2))
    changed = AutoProcessor.from_pretrained(tiny_vlm_paths[family], **OTHER_TOKENS[family])
    others = [
        cache_file(changed),
        cache_file(first, version="chatml"),
        cache_file(first, max_length=MAX_LENGTH + 1),
        cache_file(first, max_image_pixels=2000),
    ]
    assert len({cache_file(first), *others}) == 5
    again.chat_template = (again.chat_template or "") + "{# another template #}"
    assert cache_file(again) != cache_file(first)


@pytest.mark.parametrize("family", VLM_FAMILIES + PROMPT_FAMILIES)
def test_every_familys_processor_gives_one_key_however_often_it_is_loaded(family, tiny_vlm_paths):
    """Its settings serialize (no object address in them) the same on every load."""
    first, again = (AutoProcessor.from_pretrained(tiny_vlm_paths[family]) for _ in range(2))
    assert processor_fingerprint(first) == processor_fingerprint(again)
    assert " at 0x" not in json.dumps(processor_fingerprint(first), default=str)
    assert cache_file(first) == cache_file(again)


@pytest.mark.parametrize("family", CONVERSATION_FAMILIES)
def test_another_image_processor_setting_rebuilds_and_never_reads_a_stale_cache(
    tmp_path, images, tiny_vlm_paths, header_reads, family
):
    path = write_data(str(tmp_path), images, family, "json", 10)
    first = load(path, AutoProcessor.from_pretrained(tiny_vlm_paths[family]), images,
                 skip_bad_records=True)  # fmt: skip
    changed = AutoProcessor.from_pretrained(tiny_vlm_paths[family], **OTHER_TOKENS[family])
    reads = header_reads.call_count
    rebuilt = load(path, changed, images, skip_bad_records=True)
    assert header_reads.call_count > reads and len(caches(path)) == 2
    expected = whole_file_dataset(path, changed, images, skip_bad_records=True)
    assert rebuilt.lengths == expected.lengths != first.lengths
    assert rebuilt.lengths == [len(rebuilt[i]["input_ids"]) for i in range(len(rebuilt))]
