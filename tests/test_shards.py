"""Webdataset-style tar shards: brace patterns, the same dataset as JSON, order, cache, bad input."""

import glob
import io
import json
import os
import pickle
import re
import shutil
import tarfile

import pytest
import torch
from transformers import AutoTokenizer, CLIPImageProcessor

import llava.data.dataset as dataset_module
import llava.data.shards as shards_module
from llava.data.dataset import SupervisedDataset, load_supervised_dataset
from llava.data.formats import BadRecordError, DataFileError, load_records
from llava.data.sampler import build_train_sampler
from llava.data.shards import ShardRecords, expand_braces
from llava.data.skipped import collect_skipped_records
from llava.train.arguments import parse_arguments
from llava.train.train import train
from tests.fixtures.training import training_flags
from tests.test_data_formats import llava_row, write_image, write_rows
from tests.test_length_cache import count_encodes, same_dataset  # noqa: F401 (a fixture)

NUM_IMAGE_TOKENS = 8


@pytest.fixture
def tokenizer(tokenizer_paths):
    return AutoTokenizer.from_pretrained(tokenizer_paths["sp"])


@pytest.fixture
def processor() -> CLIPImageProcessor:
    return CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})


def write_shard(path: str, members: list[tuple[str, bytes]]) -> str:
    """A tar of the (name, bytes) members, in order, as tarfile (and webdataset) write it."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def sample_members(key: str, row: dict, image_folder: str) -> list[tuple[str, bytes]]:
    """A LLaVA row as webdataset members: KEY.json, then KEY.png or KEY.0.png, KEY.1.png, ..."""
    members = [(f"{key}.json", json.dumps(row).encode())]
    images = row.get("image")
    images = [] if images is None else [images] if isinstance(images, str) else images
    for number, name in enumerate(images):
        extension = os.path.splitext(name)[1]
        suffix = extension if len(images) == 1 else f".{number}{extension}"
        with open(os.path.join(image_folder, name), "rb") as f:
            members.append((key + suffix, f.read()))
    return members


def write_shards(folder: str, rows: list, image_folder: str, num_shards: int = 3) -> str:
    """The rows cut into `num_shards` shards `folder/{000..N}.tar`; returns the pattern."""
    os.makedirs(folder, exist_ok=True)
    per_shard = -(-len(rows) // num_shards)
    for shard in range(num_shards):
        members = []
        for index in range(shard * per_shard, min(len(rows), (shard + 1) * per_shard)):
            members += sample_members(f"{index:06d}", rows[index], image_folder)
        write_shard(os.path.join(folder, f"{shard:03d}.tar"), members)
    return os.path.join(folder, f"{{000..{num_shards - 1:03d}}}.tar")


@pytest.fixture
def data(tmp_path):
    """(JSON path, image folder, shard pattern) of the same records: one, two and no images,
    one shortened, one too long."""
    folder = tmp_path / "images"
    folder.mkdir()
    write_image(str(folder / "a.png"))
    write_image(str(folder / "b.png"), size=(8, 30), colour=(0, 0, 255))
    two = [("human", "<image> left, <image> right: same?"), ("gpt", "No.")]
    long = " ".join(["word"] * 120)
    rows = [llava_row(i, "a.png" if i % 3 else None) for i in range(10)]
    rows += [llava_row(10, ["a.png", "b.png"], two), llava_row(11, ["b.png", "a.png"], two)]
    rows.append(llava_row(12, None, [("human", "Hi?"), ("gpt", long)]))  # too long
    rows.append(llava_row(13, "b.png", [("human", "<image>\nHi?"), ("gpt", "Yes."),
                                        ("human", "More?"), ("gpt", long)]))  # fmt: skip
    json_path = write_rows(str(tmp_path), rows)
    pattern = write_shards(str(tmp_path / "shards"), rows, str(folder))
    return json_path, str(folder), pattern


def build(path, tokenizer, processor, image_folder=None, **options):
    return load_supervised_dataset(
        path, tokenizer, "v1", 96, processor, NUM_IMAGE_TOKENS, image_folder, "pad", **options
    )


def shard_caches(pattern: str) -> list[str]:
    return glob.glob(glob.escape(pattern) + ".lengths-*.npz")


# -- brace patterns ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "pattern, expected",
    [
        ("data/train.tar", ["data/train.tar"]),
        ("s/{000..003}.tar", ["s/000.tar", "s/001.tar", "s/002.tar", "s/003.tar"]),
        ("{8..11}", ["8", "9", "10", "11"]),  # no leading zero: no padding
        ("{0..2}", ["0", "1", "2"]),
        ("{1..010}", ["001", "002", "003", "004", "005", "006", "007", "008", "009", "010"]),
        ("{3..1}", ["3", "2", "1"]),
        ("{098..101}", ["098", "099", "100", "101"]),
        ("{a,b}-{1..2}.tar", ["a-1.tar", "a-2.tar", "b-1.tar", "b-2.tar"]),
        ("x{a,b{0..1}}y", ["xay", "xb0y", "xb1y"]),
        ("{train,val}/{00..01}.tar", ["train/00.tar", "train/01.tar", "val/00.tar", "val/01.tar"]),
        ("{a,}z", ["az", "z"]),
    ],
)
def test_brace_expansion(pattern, expected):
    assert expand_braces(pattern) == expected


@pytest.mark.parametrize(
    "pattern, message",
    [
        ("s/{000..099.tar", r"unclosed '\{' at character 2"),
        ("s/000..099}.tar", r"unmatched '\}' at character 10"),
        ("s/{a}.tar", r"\{a\} in 's/\{a\}.tar' is neither a list \{a,b\} nor a numeric range"),
        ("s/{}.tar", "neither a list"),
        ("s/{a..c}.tar", "neither a list"),
        ("{0..9999999}", "more than 1000000 shards"),
    ],
)
def test_brace_expansion_errors(pattern, message):
    with pytest.raises(ValueError, match=message):
        expand_braces(pattern)


# -- the same dataset as the JSON -------------------------------------------------------------------
def test_shards_give_the_dataset_of_the_equivalent_json(data, tokenizer, processor, monkeypatch):
    monkeypatch.setenv("LLAVA_LENGTH_CACHE", "0")
    json_path, folder, pattern = data
    from_json = build(json_path, tokenizer, processor, folder)
    from_shards = build(pattern, tokenizer, processor)
    assert from_shards.summary.line().replace(pattern, json_path) == from_json.summary.line()
    assert (from_json.summary.shortened, from_json.summary.dropped_too_long) == (1, 1)
    assert from_shards.max_images_per_sample == 2
    from_shards.summary.source = json_path  # (the only difference, checked above)
    same_dataset(from_json, from_shards)  # input ids, labels, lengths, modalities, pixel values
    assert [r.id for r, _ in from_shards.samples] == [r.id for r, _ in from_json.samples]
    assert from_shards.samples.keys.typecode == "q"  # rows, read again when a sample loads
    # the records as load_records gives them (processor models, anyres) hold the same
    loaded = load_records(pattern).records
    assert [r.turns for r in loaded] == [r.turns for r in load_records(json_path, folder).records]
    copy = pickle.loads(pickle.dumps(from_shards))  # as loader workers get it: no open file
    assert copy.samples.store.files.fds == {}
    assert torch.equal(copy[10]["pixel_values"], from_json[10]["pixel_values"])


def test_shards_built_by_forked_children_give_the_one_process_dataset(
    data, tokenizer, processor, monkeypatch
):
    monkeypatch.setenv("LLAVA_LENGTH_CACHE", "0")
    monkeypatch.setattr(dataset_module, "ENCODE_BLOCK", 2)
    monkeypatch.setattr(dataset_module, "SHARE_BLOCKS", 2)
    _, _, pattern = data
    one = build(pattern, tokenizer, processor, build_workers=1)
    shared = build(pattern, tokenizer, processor, build_workers=3)
    assert SupervisedDataset.build_shares(shared.samples.store, (), 3) == 3
    same_dataset(one, shared)
    assert list(one.samples.keys) == list(shared.samples.keys)


def test_start_up_reads_headers_not_images(data, tokenizer, processor, monkeypatch):
    """Building reads each sample's headers and JSON, never an image member's bytes."""
    json_path, folder, pattern = data
    records = ShardRecords.read(pattern)
    reads = []
    read = records.files.read
    monkeypatch.setattr(records.files, "read", lambda *a: reads.append(a[:2]) or read(*a))
    items = list(records)
    images = set()
    for shard in records.shards.paths:
        with tarfile.open(shard) as tar:
            images |= {(shard, m.offset_data) for m in tar if m.name.endswith(".png")}
    assert len(images) == 11 and reads and not images & set(reads)
    assert [len(item.images) for item in items][10:12] == [2, 2]
    image = items[11].images[0]
    assert (image.name, image.fetch()) == ("000011.0.png", open(f"{folder}/b.png", "rb").read())


# -- order and resume -------------------------------------------------------------------------------
def test_the_sampler_order_is_seeded_and_resumes_mid_epoch(data, tokenizer, processor):
    json_path, folder, pattern = data
    dataset = build(pattern, tokenizer, processor)

    def sampler(seed):
        return build_train_sampler(
            dataset, per_device_batch_size=2, group_by_modality_length=True, seed=seed
        )

    order = list(sampler(3))
    assert order == list(sampler(3)) and sorted(order) == list(range(len(dataset)))
    assert order != list(sampler(4))
    from_json = build(json_path, tokenizer, processor, folder)
    assert list(build_train_sampler(from_json, 2, group_by_modality_length=True, seed=3)) == order

    resumed = sampler(3)
    resumed.load_state_dict({"seed": 3, "epoch": 0, "start_index": 5})  # as a checkpoint holds
    resumed.set_epoch(0)
    remaining = list(resumed)
    assert remaining == order[5:]
    again = build(pattern, tokenizer, processor)  # a restarted process (from the cache)
    for i in remaining:
        assert torch.equal(again[i]["input_ids"], dataset[i]["input_ids"])


# -- the length cache -------------------------------------------------------------------------------
def test_the_second_build_reads_the_cache_and_a_changed_shard_rebuilds(
    data,
    tokenizer,
    processor,
    count_encodes,  # noqa: F811 (the imported fixture)
    monkeypatch,
):
    _, folder, pattern = data
    first = build(pattern, tokenizer, processor)
    assert count_encodes[0] == 14 and len(shard_caches(pattern)) == 1
    scans = []
    scan = shards_module.scan_shard
    monkeypatch.setattr(shards_module, "scan_shard", lambda *a: scans.append(a) or scan(*a))
    second = build(pattern, tokenizer, processor)
    assert count_encodes[0] == 14 and not scans  # nothing tokenized, no tar read
    same_dataset(first, second)

    shard = pattern.replace("{000..002}", "001")
    status = os.stat(shard)
    os.utime(shard, ns=(status.st_atime_ns, status.st_mtime_ns + 10**9))  # touched
    touched = build(pattern, tokenizer, processor)
    assert count_encodes[0] == 28 and len(scans) == 3 and len(shard_caches(pattern)) == 2
    same_dataset(first, touched)

    rows = [llava_row(5, "a.png", [("human", "<image>\nWhat?"), ("gpt", "A long answer.")])]
    write_shard(shard, sample_members("000005", rows[0], folder))  # rewritten: one sample
    rewritten = build(pattern, tokenizer, processor)
    assert count_encodes[0] == 38 and len(shard_caches(pattern)) == 3
    assert rewritten.summary.records == 14 - 5 + 1
    assert [r.id for r, _ in rewritten.samples].count("r5") == 1
    assert rewritten.lengths == [len(rewritten[i]["input_ids"]) for i in range(len(rewritten))]


# -- bad input --------------------------------------------------------------------------------------
def test_shard_set_errors_name_the_pattern_or_shard(tmp_path, data):
    _, folder, pattern = data
    shards = os.path.dirname(pattern)
    with pytest.raises(DataFileError, match=r"\{100\.\.102\}\.tar: no shard found: none of its 3"):
        load_records(os.path.join(shards, "{100..102}.tar"))
    with pytest.raises(DataFileError, match=r"1 of 4 shards missing: .*/shards/003\.tar"):
        load_records(os.path.join(shards, "{000..003}.tar"))
    with pytest.raises(DataFileError, match=r"missing\.tar: no shard found"):
        load_records(os.path.join(shards, "missing.tar"))
    with pytest.raises(DataFileError, match="bad shard pattern: unclosed"):
        load_records(os.path.join(shards, "{000..002.tar"))
    with pytest.raises(DataFileError, match=r"\.tar\.gz: compressed shards cannot be read"):
        load_records(os.path.join(shards, "000.tar.gz"))
    with pytest.raises(DataFileError, match="names shard .*000.tar more than once"):
        load_records(os.path.join(shards, "{000,000}.tar"))
    empty = [write_shard(str(tmp_path / f"empty{n}.tar"), []) for n in range(2)]
    with pytest.raises(DataFileError, match=r"empty\{0\.\.1\}\.tar: no samples: its 2 shard"):
        load_records(str(tmp_path / "empty{0..1}.tar"))
    assert load_records(empty[0].replace("empty0", "{empty0,shards/000}")).records


@pytest.mark.parametrize(
    "damage, message",
    [
        ("cut in a member", r"001\.tar: truncated: member 000009\.json needs bytes up to \d+, "),
        ("cut at a member", r"001\.tar: truncated after member 000008\.png: no end-of-archive"),
        (
            "garbage header",
            r"001\.tar: corrupt: no valid tar header at byte \d+ \(after member 000008\.png",
        ),
        ("not a tar", r"001\.tar: not a readable tar file \(at its start\)"),
        ("empty file", r"001\.tar: empty file"),
    ],
)
def test_a_corrupt_or_truncated_shard_names_it_and_the_member(data, damage, message):
    _, _, pattern = data
    shard = pattern.replace("{000..002}", "001")
    raw = open(shard, "rb").read()
    with tarfile.open(shard) as tar:
        last = tar.getmembers()[-1]
    if damage == "cut in a member":
        raw = raw[: last.offset_data + 10]
    elif damage == "cut at a member":
        raw = raw[: last.offset]
    elif damage == "garbage header":
        raw = raw[: last.offset] + b"x" * 512 + raw[last.offset + 512 :]
    elif damage == "not a tar":
        raw = b"this is not a tar file" * 50
    else:
        raw = b""
    open(shard, "wb").write(raw)
    with pytest.raises(DataFileError, match=message):
        load_records(pattern)


def png(folder: str, name: str = "a.png") -> bytes:
    return open(os.path.join(folder, name), "rb").read()


def bad_samples(folder: str) -> list[tuple[str, list[tuple[str, bytes]], str]]:
    """(what, members, message) of samples that are bad records; each message names the member."""
    tags = [("human", "<image> and <image>?"), ("gpt", "No.")]
    return [
        ("named image missing", sample_members("000000", llava_row(0, "a.png"), folder)[:1],
         r"member 000000\.json: names 1 image\(s\) \['a\.png'\] but the shard holds 0 image member\(s\) "
         r"of the sample \(expected 000000\.jpg \(\.png, \.\.\.\)"),
        ("more tags than images", [("000001.json", json.dumps(llava_row(1, None, tags)).encode()),
                                   ("000001.png", png(folder))],
         r"member 000001\.json: 2 <image> tags but 1 images"),
        ("no json", [("000002.png", png(folder))], r"member 000002\.png: 000002\.png without 000002\.json"),
        ("invalid json", [("000003.json", b'{"id": ')], r"member 000003\.json: invalid JSON"),
        ("not an object", [("000004.json", b"[1]")], r"member 000004\.json: a record must be a JSON object"),
        ("gap in numbers", [("000005.json", json.dumps(llava_row(5, None, tags)).encode()),
                            ("000005.0.png", png(folder)), ("000005.2.png", png(folder))],
         r"member 000005\.0\.png: image members 000005\.0\.png, 000005\.2\.png must be numbered"),
        ("two single images", [("000006.json", json.dumps(llava_row(6, None, tags)).encode()),
                               ("000006.png", png(folder)), ("000006.jpg", png(folder))],
         r"member 000006\.png: several images \(000006\.png, 000006\.jpg\): name them 000006\.0\.jpg"),
    ]  # fmt: skip


def test_bad_samples_name_the_shard_and_member_and_are_skipped_and_listed(
    tmp_path, data, tokenizer, processor
):
    _, folder, _ = data
    good = sample_members("000009", llava_row(9, "a.png"), folder)
    shards = tmp_path / "bad"
    shards.mkdir()
    pattern = str(shards / "{000..000}.tar")
    for _, members, message in bad_samples(folder):
        shard = write_shard(str(shards / "000.tar"), [*good, *members])
        where = rf"{re.escape(pattern)} record 1( \(id \S+\))?: {re.escape(shard)} {message}"
        with pytest.raises(BadRecordError, match=where):
            build(pattern, tokenizer, processor)

    samples = [sample for _, sample, _ in bad_samples(folder)]
    write_shard(str(shards / "000.tar"), [*good, *sum(samples[:4], [])])
    write_shard(str(shards / "001.tar"), sum(samples[4:], []))
    out = str(tmp_path / "out")
    pattern = str(shards / "{000..001}.tar")
    for _ in range(2):  # built, then from the cache
        dataset = build(pattern, tokenizer, processor, skip_bad_records=True, skip_log_dir=out)
        assert len(dataset) == 1 and dataset.summary.skipped_bad == 7
        assert "000.tar member 000000.json: names 1 image" in dataset.summary.reasons[0]
    assert collect_skipped_records(out) == 7
    with open(os.path.join(out, "skipped_records.jsonl")) as f:
        listed = [json.loads(line) for line in f]
    assert {entry["data_file"] for entry in listed} == {pattern}
    assert [entry["index"] for entry in listed] == list(range(1, 8))
    assert "001.tar member 000004.json" in listed[4]["reason"]


def test_an_unreadable_image_member_is_replaced_and_named(tmp_path, data, tokenizer, processor):
    _, folder, _ = data
    members = sample_members("000000", llava_row(0, "a.png"), folder)
    members += sample_members("000001", llava_row(1, "a.png"), folder)
    members[1] = ("000000.png", b"not an image")
    pattern = write_shard(str(tmp_path / "one.tar"), members)
    dataset = build(pattern, tokenizer, processor, skip_bad_records=True)
    assert torch.equal(dataset[0]["input_ids"], dataset[1]["input_ids"])  # the next image sample
    named = r"one\.tar record 0 \(id r0\): unreadable image '000000\.png' in .*one\.tar"
    with pytest.raises(BadRecordError, match=named):
        build(pattern, tokenizer, processor)[0]


# -- training -------------------------------------------------------------------------------------
def test_stage_one_trains_on_shards_and_resumes_with_the_same_losses(
    training_assets, tmp_path, monkeypatch
):
    """pretrain's flags over shards; a run resumed from its step-2 checkpoint (the existing
    machinery: trainer state, sampler position) loads only step 3's samples and logs the loss
    of the uninterrupted run."""
    loaded = []
    load = SupervisedDataset.load
    monkeypatch.setattr(
        SupervisedDataset, "load", lambda self, i: loaded.append(i) or load(self, i)
    )
    with open(training_assets["pretrain"]) as f:
        rows = json.load(f)
    pattern = write_shards(str(tmp_path / "shards"), rows, training_assets["image_folder"], 2)

    def run(output_dir):
        flags = training_flags(
            training_assets,
            output_dir,
            "--version", "plain",
            "--data_path", pattern,
            "--tune_mm_mlp_adapter", "True",
            "--group_by_modality_length", "True",
            "--per_device_train_batch_size", "2",
            "--max_steps", "3",
            "--save_strategy", "steps",
            "--save_steps", "2",
        )  # fmt: skip
        trainer = train(*parse_arguments(flags))
        history = trainer.state.log_history
        return trainer, {h["step"]: h["loss"] for h in history if "loss" in h}

    trainer, first = run(tmp_path / "first")
    assert sorted(first) == [1, 2, 3] and len(trainer.train_dataset) == len(rows)
    assert os.path.isfile(tmp_path / "first" / "mm_projector.bin")
    first_loaded, loaded[:] = list(loaded), []
    shutil.copytree(tmp_path / "first" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    _, resumed = run(tmp_path / "resumed")
    assert loaded == first_loaded[4:]  # batch 3 (and the one fetched ahead), nothing before
    assert resumed[3] == pytest.approx(first[3], rel=1e-5)


@pytest.mark.parametrize(
    "tar_format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]
)
def test_members_read_from_plain_headers_are_tarfiles_and_others_fall_back(
    tmp_path, tar_format, monkeypatch
):
    """A sample's members, and a shard's sample ranges, from its headers alone equal tarfile's
    (names, data offsets, sizes; starts and ends); a header only tarfile reads (a long name, a
    non-ASCII one, a directory, a bad checksum) or a truncated shard makes the fast read give
    up, and then tarfile reads it."""
    by_tarfile = {}
    deep = "d" * 120 + "/" if tar_format != tarfile.USTAR_FORMAT else ""
    cases = {
        "plain": [("k.json", b"{}"), ("k.0.png", b"x" * 700), ("k.1.png", b"y"), ("k.txt", b"")],
        "prefixed": [("a/b/k.json", b"{}"), ("a/b/k.jpg", b"z" * 513)],
        "long": [(deep + "k" * 130 + ".json", b"{}")] if deep else [],
        "non-ascii": [("kä.json", b"{}")],
        "directory": [("k.json", b"{}"), ("k.dir/", b"")],
    }
    for case, members in cases.items():
        if not members:
            continue
        path = str(tmp_path / f"{case}.tar")
        with tarfile.open(path, "w", format=tar_format) as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.type = (
                    len(data),
                    tarfile.DIRTYPE if name.endswith("/") else info.type,
                )
                tar.addfile(info, io.BytesIO(data))
        with tarfile.open(path) as tar:
            expected = [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]
            expected = [m for m in expected if shards_module.member_key(m[0])]
            span_end = tar.offset
        span = shards_module.SpanFile(shards_module.ShardFiles(), path, 0, span_end)
        found = shards_module.plain_members(span)
        scanned = shards_module.plain_scan(path, os.path.getsize(path))
        with monkeypatch.context() as patch:
            patch.setattr(shards_module, "plain_scan", lambda path, size: None)
            by_tarfile[case] = shards_module.scan_shard(path, os.path.getsize(path))
        if case in ("plain", "prefixed"):
            assert [(m.name, m.offset_data, m.size) for m in found] == expected, case
            assert scanned == by_tarfile[case], case
        else:
            assert found is None and scanned is None, case
    assert by_tarfile["plain"] == ([0], [512 * 8])  # KEY.json, .0.png (2 blocks), .1.png, .txt
    with open(path, "rb") as f:
        whole = f.read()
    truncated = str(tmp_path / "truncated.tar")
    with open(truncated, "wb") as f:
        f.write(whole[: 512 * 2])  # the first header and data block, no marker
    assert shards_module.plain_scan(truncated, 512 * 2) is None
    with open(path, "r+b") as f:  # the last case's first header, its checksum broken
        f.seek(148)
        f.write(b"0000000\0")
    assert (
        shards_module.plain_members(
            shards_module.SpanFile(shards_module.ShardFiles(), path, 0, span_end)
        )
        is None
    )
