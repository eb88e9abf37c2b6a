"""Local Hugging Face datasets (save_to_disk folders, parquet files) read row by row with the
length cache: the same samples, lengths, summary, bad records and items as the whole-dataset
path (load_records, what load_supervised_dataset did before), cold, warm and forked."""

import os
import pickle
import shutil

import pytest
from PIL import Image

import llava.data.dataset as dataset_module
import tests.test_length_cache_more as more_tests
import tests.test_processor_length_cache as processor_tests
from llava.data.dataset import load_supervised_dataset
from llava.data.formats import BadRecordError, DatasetImage, hf_records
from llava.data.hf_rows import HfRecords
from tests.test_data_formats import llava_row

datasets = pytest.importorskip("datasets")

tokenizer = more_tests.tokenizer  # the sentencepiece tokenizer fixture
processor = more_tests.processor  # the 16 px CLIP processor fixture
images = more_tests.images  # a folder of a.png, b.png, c.png (three sizes), broken.png
tower_processor = more_tests.tower_processor  # an AnyRes tower's (32 px tiles)
anyres_header_reads = more_tests.header_reads  # headers an AnyRes dataset read
processors = processor_tests.processors  # tiny Qwen2-VL's, ...
processor_header_reads = processor_tests.header_reads  # headers a processor dataset read
caches = more_tests.caches
described = more_tests.described
nothing_tokenized = more_tests.nothing_tokenized
same_dataset = more_tests.same_dataset
skip_list = more_tests.skip_list
whole_file_dataset = more_tests.whole_file_dataset
FAILING_TEMPLATE, LONG, NUM_IMAGE_TOKENS = (
    more_tests.FAILING_TEMPLATE,
    more_tests.LONG,
    more_tests.NUM_IMAGE_TOKENS,
)

# (how the dataset is stored, what its image column holds)
FORMS = [
    ("saved", "path lists"),
    ("parquet", "paths"),
    ("saved", "images"),
    ("parquet", "image lists"),
]
TWO_TAGS = [("human", "<image> and <image>?"), ("gpt", "Two.")]


@pytest.fixture(autouse=True)
def images_compared_by_cell(monkeypatch):
    """A stored image is equal to one naming the same cell with the same contents: the whole
    path and the row reader open the dataset apart, and datasets.Dataset compares by identity."""

    def same_cell(a, b):
        return isinstance(b, DatasetImage) and (a.column, a.row, a.position, a.fetch()) == (
            b.column, b.row, b.position, b.fetch()
        )  # fmt: skip

    monkeypatch.setattr(DatasetImage, "__eq__", same_cell)


def hf_row(i: int, lists: bool, paths: bool) -> tuple[dict, list[str]]:
    """(the row's id and conversations, the names of its images): good image and text rows, a
    missing image (only a path can be missing), more <image> tags than images, one too long,
    one the failing template rejects."""
    kind = i % 8
    names = {0: [["a.png", "b.png", "c.png"][i % 3]], 1: ["missing.png"] if paths else [],
             3: ["a.png"], 6: ["b.png", "c.png"] if lists else ["b.png"]}.get(kind, [])  # fmt: skip
    turns = {3: TWO_TAGS, 4: [("human", "Hi?"), ("gpt", LONG)],
             5: [("human", "BOOM?"), ("gpt", "No.")], 6: TWO_TAGS if lists else None}  # fmt: skip
    return llava_row(i, names[0] if names else None, turns.get(kind)), names


def write_hf_dataset(folder: str, images: str, form: tuple[str, str], rows: list[int]) -> str:
    """The rows `hf_row` makes, saved by save_to_disk (two Arrow files) or as two parquet files
    in a folder; the data path. Paths are relative to `images`; stored images are its files."""
    storage, cells = form
    lists, paths = "lists" in cells, "path" in cells
    made = [hf_row(i, lists, paths) for i in rows]
    columns = {
        "id": [row["id"] for row, _ in made],
        "conversations": [row["conversations"] for row, _ in made],
    }
    image = datasets.Value("string") if paths else datasets.Image()

    def cell(names: list[str]):
        found = names if paths else [Image.open(os.path.join(images, n)) for n in names]
        return found if lists else (found[0] if found else None)

    columns["images" if lists else "image"] = [cell(names) for _, names in made]
    features = datasets.Features(
        id=datasets.Value("string"),
        conversations=[{"from": datasets.Value("string"), "value": datasets.Value("string")}],
        **{"images": datasets.Sequence(image)} if lists else {"image": image},
    )
    table = datasets.Dataset.from_dict(columns, features=features)
    path = os.path.join(folder, storage)
    if storage == "saved":
        table.save_to_disk(path, num_shards=2)
        return path
    os.makedirs(path)
    half = len(table) // 2
    table.select(range(half)).to_parquet(os.path.join(path, "0.parquet"))
    table.select(range(half, len(table))).to_parquet(os.path.join(path, "1.parquet"))
    return path


def load(path, tokenizer, processor, images, **options):
    return load_supervised_dataset(path, tokenizer, "auto", 96, processor, NUM_IMAGE_TOKENS,
                                   images, "pad", **options)  # fmt: skip


def whole(path, tokenizer, processor, images, **options):
    return whole_file_dataset(path, tokenizer, "auto", 96, images, image_processor=processor,
                              image_aspect_ratio="pad", **options)  # fmt: skip


@pytest.mark.parametrize("form", FORMS)
def test_a_dataset_is_the_whole_path_one_cold_and_warm(
    tmp_path, images, tokenizer, processor, form
):
    tokenizer.chat_template = FAILING_TEMPLATE
    path = write_hf_dataset(str(tmp_path), images, form, list(range(24)))
    logs = [str(tmp_path / f"out{k}") for k in range(3)]
    before = whole(path, tokenizer, processor, images, skip_bad_records=True, skip_log_dir=logs[0])
    cold = load(path, tokenizer, processor, images, skip_bad_records=True, skip_log_dir=logs[1])
    assert isinstance(cold.samples.store, HfRecords) and len(caches(path)) == 1
    with nothing_tokenized():
        warm = load(path, tokenizer, processor, images, skip_bad_records=True,
                    skip_log_dir=logs[2])  # fmt: skip
    assert warm.samples.store.opened is None  # nothing of the dataset read until a sample is
    paths = "path" in form[1]
    assert before.summary.skipped_bad == (9 if paths else 6)  # missing, tags, template
    assert before.summary.dropped_too_long == 3 and before.summary.image_samples >= 6
    same_dataset(before, cold)
    same_dataset(before, warm)
    assert skip_list(logs[0]) == skip_list(logs[1]) == skip_list(logs[2])


@pytest.mark.parametrize("form", [FORMS[0], FORMS[3]])
def test_a_build_shared_by_forked_children_is_the_one_process_build(
    tmp_path, images, tokenizer, processor, monkeypatch, form
):
    monkeypatch.setattr(dataset_module, "ENCODE_BLOCK", 4)
    monkeypatch.setattr(dataset_module, "SHARE_BLOCKS", 2)
    monkeypatch.setenv("LLAVA_LENGTH_CACHE", "0")
    tokenizer.chat_template = FAILING_TEMPLATE
    path = write_hf_dataset(str(tmp_path), images, form, list(range(24)))
    built = {
        workers: load(path, tokenizer, processor, images, skip_bad_records=True,
                      build_workers=workers)
        for workers in (1, 2)
    }  # fmt: skip
    assert dataset_module.SupervisedDataset.build_shares(built[2].samples.store, (), 2) == 2
    same_dataset(built[1], built[2])
    same_dataset(whole(path, tokenizer, processor, images, skip_bad_records=True), built[2])
    errors = []
    for workers in (1, 2):
        with pytest.raises(BadRecordError) as error:
            load(path, tokenizer, processor, images, build_workers=workers)
        errors.append(str(error.value))
    with pytest.raises(BadRecordError) as expected:
        whole(path, tokenizer, processor, images)
    assert errors == [str(expected.value)] * 2


# the rows of each case: its bad row last, after one the template rejects (but for that case)
BAD_ROWS = {"missing image": [5, 2, 4, 1], "more tags than images": [5, 2, 4, 3],
            "template rejects": [2, 4, 5]}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_the_first_error_is_the_whole_paths(tmp_path, images, tokenizer, processor, case):
    """Without skip_bad_records the reader's bad row is raised before a row the template
    rejects earlier, as before: built, and from a cache built with skipping."""
    tokenizer.chat_template = FAILING_TEMPLATE
    path = write_hf_dataset(str(tmp_path), images, FORMS[0], BAD_ROWS[case])
    with pytest.raises(BadRecordError) as expected:
        whole(path, tokenizer, processor, images)
    bad = f"record {len(BAD_ROWS[case]) - 1} (id r{BAD_ROWS[case][-1]}): "
    assert bad in str(expected.value)  # the index and the id column's value
    with pytest.raises(BadRecordError) as cold:
        load(path, tokenizer, processor, images)
    assert not caches(path)
    load(path, tokenizer, processor, images, skip_bad_records=True)  # writes the cache
    with nothing_tokenized(), pytest.raises(BadRecordError) as warm:
        load(path, tokenizer, processor, images)
    assert str(cold.value) == str(warm.value) == str(expected.value)


@pytest.mark.parametrize("form", [FORMS[0], FORMS[1]])
def test_a_rewritten_dataset_gets_another_key(tmp_path, images, tokenizer, processor, form):
    first_path = write_hf_dataset(str(tmp_path), images, form, list(range(16)))
    first = load(first_path, tokenizer, processor, images, skip_bad_records=True)
    shutil.rmtree(first_path)
    path = write_hf_dataset(str(tmp_path), images, form, list(range(8, 32)))
    assert path == first_path
    rebuilt = load(path, tokenizer, processor, images, skip_bad_records=True)
    assert len(caches(path)) == 2
    same_dataset(whole(path, tokenizer, processor, images, skip_bad_records=True), rebuilt)
    assert rebuilt.lengths != first.lengths


@pytest.mark.parametrize("form", FORMS)
def test_the_reader_pickles_without_the_dataset_and_reads_the_same_rows(tmp_path, images, form):
    path = write_hf_dataset(str(tmp_path), images, form, list(range(8)))
    rows = HfRecords.read(path, images)
    expected = described(hf_records(path, images, None, None))  # bad rows as their messages
    assert described(rows) == expected
    copy = pickle.loads(pickle.dumps(rows))  # as loader workers started by spawn receive it
    assert copy.opened is None and len(copy) == len(rows)
    assert described(copy) == expected
    reopened = HfRecords.reopen(path, rows.starts, rows.ends, rows.columns, rows.base_folder)
    assert described(reopened) == expected


@pytest.mark.parametrize("form", [FORMS[0], FORMS[3]])
def test_an_anyres_dataset_from_the_cache_reads_no_header_and_is_the_whole_paths(
    tmp_path, images, tokenizer, tower_processor, anyres_header_reads, form
):
    tokenizer.chat_template = FAILING_TEMPLATE
    anyres = more_tests.anyres_config()
    path = write_hf_dataset(str(tmp_path), images, form, list(range(16)))
    before = more_tests.whole_file_dataset(path, tokenizer, "auto", 512, images, anyres,
                                           image_processor=tower_processor,
                                           image_aspect_ratio="anyres", skip_bad_records=True)  # fmt: skip
    read_before = anyres_header_reads[0]
    cold = more_tests.load_anyres(path, tokenizer, tower_processor, anyres, images)
    assert isinstance(cold.samples.store, HfRecords) and anyres_header_reads[0] == 2 * read_before
    with nothing_tokenized():
        warm = more_tests.load_anyres(path, tokenizer, tower_processor, anyres, images)
    assert anyres_header_reads[0] == 2 * read_before > 0  # none read from the cache
    same_dataset(before, cold)
    same_dataset(before, warm)


@pytest.mark.parametrize("form", [FORMS[0], FORMS[3]])
def test_a_processor_dataset_from_the_cache_reads_no_header_and_is_the_whole_paths(
    tmp_path, images, processors, processor_header_reads, form
):
    processor = processors["qwen2_vl"]
    path = write_hf_dataset(str(tmp_path), images, form, list(range(16)))
    before = processor_tests.whole_file_dataset(path, processor, images, skip_bad_records=True)
    read_before = processor_header_reads.call_count
    cold = processor_tests.load(path, processor, images, skip_bad_records=True)
    assert isinstance(cold.samples.store, HfRecords)
    assert processor_header_reads.call_count == 2 * read_before > 0
    with processor_tests.no_record_tokenized():
        warm = processor_tests.load(path, processor, images, skip_bad_records=True)
    assert processor_header_reads.call_count == 2 * read_before  # none read from the cache
    same_dataset(before, cold)  # every item too: input_ids, labels, pixels, grids
    same_dataset(before, warm)
