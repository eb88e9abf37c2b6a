"""Every bad input named, nothing silent: data files, records, oversized images and flags; with
--skip_bad_records, every skipped record counted once and listed in skipped_records.jsonl."""

import json
import logging
import os
import re
import warnings
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, CLIPImageProcessor

from llava.data.dataset import build_supervised_data, load_supervised_dataset
from llava.data.formats import BadRecordError, DataFileError, load_records
from llava.data.images import load_image
from llava.data.skipped import (
    PARTS_FOLDER,
    SKIPPED_RECORDS,
    collect_skipped_records,
    skipped_records_line,
)
from llava.train.arguments import parse_arguments
from tests.fixtures.datasets import write_png_header
from tests.test_data_formats import llava_row, write_image, write_rows

NUM_IMAGE_TOKENS = 4


@pytest.fixture
def tokenizer(tokenizer_paths):
    return AutoTokenizer.from_pretrained(tokenizer_paths["sp"])


@pytest.fixture
def processor() -> CLIPImageProcessor:
    return CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})


@pytest.fixture
def image_folder(tmp_path) -> str:
    folder = tmp_path / "images"
    folder.mkdir()
    write_image(str(folder / "a.png"))  # 20 x 12
    write_image(str(folder / "b.png"), size=(8, 30), colour=(0, 0, 255))
    write_image(str(folder / "big.png"), size=(40, 40))  # over a limit of 1000 pixels
    (folder / "broken.png").write_bytes(b"this is not an image")
    return str(folder)


# -- data files that cannot be read -------------------------------------------------------------
UNREADABLE_FILES = {
    "truncated.json": (
        b'[{"id": "r0", "conversations": [',
        "invalid JSON (truncated?): Expecting value at line 1 column 33",
    ),
    "empty.json": (b"", "no records (the file is empty)"),
    "latin1.json": (
        '[{"id": "café"}]'.encode("latin-1"),
        "not UTF-8 text: 'utf-8' codec can't decode byte 0xe9 in position 12: "
        "invalid continuation byte",
    ),
    "object.json": (
        b'{"data": []}',
        "expected a JSON list of records at the top level, not a dict",
    ),
    "empty_list.json": (b"[]", "no records (an empty list)"),
    "blank.jsonl": (b"\n  \n", "no records (the file is empty)"),
}


@pytest.mark.parametrize("name", list(UNREADABLE_FILES))
@pytest.mark.parametrize("skip_bad_records", [False, True])
def test_unreadable_data_file_is_named(tmp_path, name, skip_bad_records):
    content, reason = UNREADABLE_FILES[name]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataFileError) as error:
        load_records(str(path), skip_bad_records=skip_bad_records)
    assert str(error.value) == f"{path}: {reason}"
    assert error.value.path == str(path)


JSONL_BAD_LINES = {
    "not UTF-8": (
        b'{"id": "caf\xe9"}',
        "line 3 is not UTF-8 text: 'utf-8' codec can't decode byte 0xe9 in position 11: "
        "invalid continuation byte",
    ),
    "not an object": (b"[1, 2]", "a record must be a JSON object, found list"),
    "cut off": (b'{"id": "r1", "conversations": [{"fro', "invalid JSON on line 3: "),
}


@pytest.mark.parametrize("case", list(JSONL_BAD_LINES))
def test_bad_jsonl_line_is_a_bad_record_named_by_file_and_index(tmp_path, case):
    line, reason = JSONL_BAD_LINES[case]
    path = tmp_path / "d.jsonl"
    good = json.dumps(llava_row(0)).encode()
    path.write_bytes(good + b"\n\n" + line + b"\n" + json.dumps(llava_row(2)).encode() + b"\n")
    with pytest.raises(BadRecordError) as error:
        load_records(str(path))
    assert str(error.value).startswith(f"{path} record 1: {reason}")  # index 1 is on line 3
    assert (error.value.source, error.value.index) == (str(path), 1)
    loaded = load_records(str(path), skip_bad_records=True)
    assert [record.id for record in loaded.records] == ["r0", "r2"]
    assert [skipped.index for skipped in loaded.skipped] == [1]


def test_unreadable_or_empty_hugging_face_data_is_named(tmp_path):
    datasets = pytest.importorskip("datasets")
    (tmp_path / "pq").mkdir()
    datasets.Dataset.from_dict({"caption": ["a"]}).to_parquet(str(tmp_path / "pq" / "0.parquet"))
    (tmp_path / "pq" / "1.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataFileError, match=re.escape(f"{tmp_path}/pq/1.parquet: cannot read")):
        load_records(str(tmp_path / "pq"))
    features = datasets.Features(caption=datasets.Value("string"))
    empty = datasets.Dataset.from_dict({"caption": []}, features=features)
    (tmp_path / "empty_pq").mkdir()
    empty.to_parquet(str(tmp_path / "empty_pq" / "0.parquet"))
    with pytest.raises(DataFileError) as error:
        load_records(str(tmp_path / "empty_pq"))
    assert str(error.value) == f"{tmp_path}/empty_pq: no records (the parquet files have no rows)"
    empty.save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataFileError) as error:
        load_records(str(tmp_path / "saved"))
    assert str(error.value) == f"{tmp_path}/saved: no records (the dataset has no rows)"


def test_unknown_columns_name_the_file(tmp_path):
    path = write_rows(str(tmp_path), [{"id": "r0", "text": "hi"}])
    with pytest.raises(DataFileError, match=re.escape(f"{path}: cannot tell the text columns")):
        load_records(path)


# -- records ------------------------------------------------------------------------------------
def test_image_without_a_tag_in_messages_is_a_bad_record(tmp_path, image_folder):
    row = {
        "id": "m1",
        "messages": [
            {"role": "user", "content": "Describe it."},
            {"role": "assistant", "content": "Red."},
        ],
        "images": ["a.png"],
    }
    path = write_rows(str(tmp_path), [row], "m.jsonl")
    with pytest.raises(BadRecordError) as error:
        load_records(path, image_folder)
    assert str(error.value) == f"{path} record 0 (id m1): 1 images but no <image> tag in the text"


# -- images over the pixel limit ------------------------------------------------------------------
def test_pixel_limit_names_the_image_and_can_be_raised(image_folder):
    path = os.path.join(image_folder, "a.png")  # 20 x 12 = 240 pixels
    with pytest.raises(ValueError) as error:
        load_image(path, max_pixels=239)
    assert str(error.value) == (
        f"image {path!r} has 20x12 = 240 pixels, over the limit of 239 "
        "(raise it with --max_image_pixels)"
    )
    assert load_image(path, max_pixels=240).size == (20, 12)
    assert load_image(path, max_pixels=0).size == (20, 12)  # no limit


def test_decompression_bomb_is_named_without_pillow_warnings(tmp_path):
    between = write_png_header(str(tmp_path / "between.png"), 10_000, 10_000)  # 1e8 pixels
    beyond = write_png_header(str(tmp_path / "beyond.png"), 20_000, 20_000)  # 4e8 pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning must not escape
        with pytest.raises(ValueError) as error:
            load_image(between)
        assert str(error.value) == (
            f"image {between!r} has 10000x10000 = 100000000 pixels, over the limit of 89478485 "
            "(raise it with --max_image_pixels)"
        )
        with pytest.raises(ValueError) as error:  # Pillow refuses before the header is ours
            load_image(beyond)
    assert str(error.value).startswith(
        f"image {beyond!r} has more than 89478485 pixels (raise it with --max_image_pixels): "
    )


def test_a_higher_limit_lifts_pillows_own_for_the_call_only(image_folder, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow refuses above 200 pixels
    path = os.path.join(image_folder, "a.png")  # 240 pixels
    assert load_image(path, max_pixels=1000).size == (20, 12)
    assert Image.MAX_IMAGE_PIXELS == 100
    with pytest.raises(ValueError, match=re.escape(f"image {path!r} has more than 50 pixels")):
        load_image(path, max_pixels=50)
    assert Image.MAX_IMAGE_PIXELS == 100


def test_oversized_image_is_a_bad_record_named_by_record_and_image(
    tmp_path, image_folder, tokenizer, processor
):
    rows = [llava_row(0, "a.png"), llava_row(1, "big.png"), llava_row(2, "b.png")]
    path = write_rows(str(tmp_path), rows)
    arguments = (path, tokenizer, "v1", 512, processor, NUM_IMAGE_TOKENS, image_folder)
    dataset = load_supervised_dataset(*arguments, max_image_pixels=1000)
    big = os.path.join(image_folder, "big.png")
    with pytest.raises(BadRecordError) as error:
        dataset[1]
    assert str(error.value) == (
        f"{path} record 1 (id r1): image {big!r} has 40x40 = 1600 pixels, over the limit of "
        "1000 (raise it with --max_image_pixels)"
    )
    assert dataset[0]["pixel_values"].shape == (1, 3, 16, 16)
    raised = load_supervised_dataset(*arguments, max_image_pixels=1600)
    assert raised[1]["pixel_values"].shape == (1, 3, 16, 16)


# -- flags with a closed set of values ------------------------------------------------------------
TEMPLATE_NAMES = (
    "plain, v1, vicuna_v1, llava_v1, llava_llama_2, llama_3, llava_llama_3, chatml, qwen, "
    "qwen_2, mistral_instruct, gemma, gemma_instruct, auto"
)
BAD_FLAGS = {
    "image_aspect_ratio": ("weird", "pad, square, anyres, anyres_max_N"),
    "version": ("vicuna_v9", TEMPLATE_NAMES),
    "mm_projector_type": (
        "mlp0x_gelu",
        "linear, identity, mlp{N}x_gelu (N >= 1, e.g. mlp2x_gelu), REDUCTION+any of those "
        "(REDUCTION: spatial_pool{K}, spatial_pool{K}_bilinear or pixel_shuffle{K}, K >= 2)",
    ),
    "mm_vision_select_feature": ("cls", "patch, cls_patch"),
    "mm_patch_merge_type": ("unpad", "flat, spatial_unpad"),
    "lora_bias": ("some", "none, all, lora_only"),
    "quant_type": ("int4", "nf4, fp4"),
    "bits": ("2", "4, 8, 16"),
    "packing": ("tight", "none, rows, flat"),
}


@pytest.mark.parametrize("flag", list(BAD_FLAGS))
def test_closed_set_flags_fail_when_parsed_naming_flag_and_choices(tmp_path, flag):
    value, allowed = BAD_FLAGS[flag]
    argv = [
        "--model_name_or_path", str(tmp_path / "no_model"),
        "--data_path", str(tmp_path / "no_data.json"),  # never read: the flag fails first
        "--output_dir", str(tmp_path / "out"),
        f"--{flag}", value,
    ]  # fmt: skip
    with pytest.raises(ValueError) as error:
        parse_arguments(argv)
    shown = int(value) if flag == "bits" else value
    assert str(error.value) == f"--{flag} must be one of {allowed}, not {shown!r}"


def test_closed_set_flags_accept_listed_values(tmp_path):
    argv = ["--model_name_or_path", "m", "--output_dir", str(tmp_path)]
    model_args, data_args, _ = parse_arguments(
        [*argv, "--version", "plain", "--mm_projector_type", "mlp3x_gelu", "--image_aspect_ratio",
         "pad", "--mm_vision_select_feature", "cls_patch", "--max_image_pixels", "0"]
    )  # fmt: skip
    assert (model_args.version, model_args.mm_projector_type) == ("plain", "mlp3x_gelu")
    assert (data_args.image_aspect_ratio, data_args.max_image_pixels) == ("pad", 0)
    with pytest.raises(ValueError, match=r"^--max_image_pixels must be 0 \(no limit\) or more"):
        parse_arguments([*argv, "--max_image_pixels", "-1"])


def test_aspect_ratio_is_checked_before_the_data_is_read(tmp_path, tokenizer):
    with pytest.raises(
        ValueError,
        match=r"^--image_aspect_ratio must be one of pad, square, anyres or anyres_max_N, not",
    ):
        load_supervised_dataset(
            str(tmp_path / "absent.json"), tokenizer, "v1", 512, image_aspect_ratio="weird"
        )


# -- skipped records: counted exactly and listed once ----------------------------------------------
def bad_rows() -> list[dict]:
    """Nine records: two good image records, one text record and six bad ones of six kinds,
    four found by the cheap checks at load and two only when their image is decoded."""
    return [
        llava_row(0, "a.png"),
        llava_row(1, "missing.png"),  # load: no such file
        llava_row(2),
        llava_row(3, "a.png", [("human", "<image> and <image>"), ("gpt", "Two.")]),  # load
        llava_row(4, "a.png", [("human", "Describe."), ("gpt", "Red.")]),  # load: no tag
        llava_row(5, None, [("human", "Hi"), ("robot", "Beep.")]),  # load: unknown role
        llava_row(6, "broken.png"),  # decode: unreadable
        llava_row(7, "big.png"),  # decode: over --max_image_pixels 1000
        llava_row(8, "b.png"),
    ]


def expected_entries(path: str, image_folder: str) -> list[dict]:
    def entry(index: int, reason: str, found: str) -> dict:
        row = {"data_file": path, "index": index, "id": f"r{index}"}
        return {**row, "reason": reason, "found": found}

    missing, broken, big = (
        os.path.join(image_folder, name) for name in ("missing.png", "broken.png", "big.png")
    )
    return [
        entry(1, f"image file {missing!r} not found", "load"),
        entry(3, "2 <image> tags but 1 images", "load"),
        entry(4, "1 images but no <image> tag in the text", "load"),
        entry(
            5, "unknown role 'robot' (known: human, user, gpt, assistant, model, system)", "load"
        ),
        entry(6, f"unreadable image {broken!r}: cannot identify image file {broken!r}", "decode"),
        entry(
            7,
            f"image {big!r} has 40x40 = 1600 pixels, over the limit of 1000 "
            "(raise it with --max_image_pixels)",
            "decode",
        ),
    ]


@pytest.fixture
def bad_data(tmp_path, image_folder) -> SimpleNamespace:
    return SimpleNamespace(
        data_path=write_rows(str(tmp_path), bad_rows()),
        image_folder=image_folder,
        image_aspect_ratio="pad",
        skip_bad_records=True,
        max_image_pixels=1000,
    )


def test_every_skipped_record_is_listed_once_over_workers_processes_and_epochs(
    tmp_path, tokenizer, processor, bad_data, caplog
):
    output_dir = str(tmp_path / "out")
    with caplog.at_level(logging.WARNING):
        dataset, _ = build_supervised_data(
            tokenizer, processor, NUM_IMAGE_TOKENS, bad_data, "v1", 512, skip_log_dir=output_dir
        )
    path = bad_data.data_path
    assert caplog.messages[-1] == (
        f"data {path}: 9 records -> 5 samples (4 with images, 1 text-only); skipped 4 bad "
        "records; dropped 0 longer than model_max_length at the first answer and 0 with no "
        "supervised token; shortened 0 at a turn boundary"
    )
    # Samples r0 r2 r6 r7 r8: r6 and r7 fail to decode, each replaced by the next image
    # sample that decodes (r8), in whichever process asks.
    loader = DataLoader(dataset, batch_size=None, num_workers=2)
    for _ in range(2):  # two epochs, two loader worker processes
        samples = list(loader)
        assert [s["input_ids"].tolist() for s in samples[2:]] == [
            dataset[4]["input_ids"].tolist()
        ] * 3
    assert torch.equal(samples[2]["pixel_values"], samples[4]["pixel_values"])
    # Another rank: same load-time skips, its own decode-time ones.
    other_rank, _ = build_supervised_data(
        tokenizer, processor, NUM_IMAGE_TOKENS, bad_data, "v1", 512, skip_log_dir=output_dir
    )
    assert torch.equal(other_rank[3]["input_ids"], samples[4]["input_ids"])
    assert other_rank.summary.replaced_when_decoding == 1
    parts_folder = os.path.join(output_dir, PARTS_FOLDER)
    part_lines = []
    for name in os.listdir(parts_folder):
        with open(os.path.join(parts_folder, name)) as f:
            part_lines += [json.loads(line)["index"] for line in f]
    # This process: 4 load-time skips per dataset built, r7 met by other_rank[3]. Each epoch:
    # worker 0 (samples 0, 2, 4) meets r6 then r7 on the way to r8, worker 1 (1, 3) meets r7.
    assert sorted(part_lines) == sorted([1, 3, 4, 5] * 2 + [7] + [6, 7, 7] * 2)

    total = collect_skipped_records(output_dir)
    assert total == 6
    with open(os.path.join(output_dir, SKIPPED_RECORDS)) as f:
        assert [json.loads(line) for line in f] == expected_entries(path, bad_data.image_folder)
    assert not os.path.exists(os.path.join(output_dir, PARTS_FOLDER))
    assert skipped_records_line(total, output_dir) == (
        "skipped 6 bad records in all (every rank, loader worker and epoch): "
        f"{output_dir}/{SKIPPED_RECORDS}"
    )


def test_without_skipping_the_first_bad_record_stops_the_run(tokenizer, processor, bad_data):
    bad_data.skip_bad_records = False
    with pytest.raises(BadRecordError, match=r"data\.json record 1 \(id r1\): image file"):
        build_supervised_data(tokenizer, processor, NUM_IMAGE_TOKENS, bad_data, "v1", 512)


def test_collect_merges_a_resumed_runs_list_and_ignores_a_cut_off_line(tmp_path, caplog):
    earlier = {"data_file": "d.json", "index": 3, "id": "r3", "reason": "old", "found": "load"}
    (tmp_path / SKIPPED_RECORDS).write_text(json.dumps(earlier) + "\n")
    (tmp_path / PARTS_FOLDER).mkdir()
    again = {**earlier, "reason": "again"}
    new = {**earlier, "index": 1, "id": "r1", "found": "decode"}
    part = tmp_path / PARTS_FOLDER / "host-1.jsonl"
    part.write_text(json.dumps(again) + "\n" + json.dumps(new) + "\n" + '{"data_file": "d.js')
    with caplog.at_level(logging.WARNING):
        assert collect_skipped_records(str(tmp_path)) == 2
    assert f"{part} line 3 is cut off" in caplog.text
    lines = (tmp_path / SKIPPED_RECORDS).read_text().splitlines()
    assert [json.loads(line) for line in lines] == [new, earlier]
    assert os.listdir(tmp_path) == [SKIPPED_RECORDS]


def test_collect_with_nothing_skipped_writes_an_empty_list(tmp_path):
    assert collect_skipped_records(str(tmp_path)) == 0
    assert (tmp_path / SKIPPED_RECORDS).read_text() == ""
