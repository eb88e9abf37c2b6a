"""The start-up benchmark's data looks like LLaVA's mixture, and its command runs (tiny)."""

import glob
import json

import pytest

from llava.bench.startup import main, write_mixture
from llava.data.formats import load_records


def test_the_mixture_has_llava_like_records(tmp_path):
    path = write_mixture(str(tmp_path), 2000)
    rows = json.load(open(path))
    assert len(rows) == 2000
    text_only = [row for row in rows if "image" not in row]
    assert 0.03 < len(text_only) / len(rows) < 0.09
    for row in rows:
        turns = row["conversations"]
        assert 2 <= len(turns) <= 8 and len(turns) % 2 == 0
        questions = [len(turn["value"].split()) for turn in turns[0::2]]
        answers = [len(turn["value"].split()) for turn in turns[1::2]]
        assert all(10 <= n <= 42 for n in questions) and all(5 <= n <= 300 for n in answers)
    assert len(load_records(path, str(tmp_path / "images")).records) == 2000  # images exist


@pytest.mark.slow
def test_the_command_runs_two_ranks_cold_then_from_the_cache(tmp_path):
    rows = main(["--records", "2000", "--ranks", "2", "--workers", "0", "--workdir", str(tmp_path)])
    assert [(start, result["rank"]) for start, result in rows] == [
        ("cold", 0), ("cold", 1), ("warm", 0), ("warm", 1)
    ]  # fmt: skip
    assert {result["samples"] for _, result in rows} == {2000}
    assert all(result["first_batch_s"] >= result["ready_s"] > 0 for _, result in rows)
    assert len(glob.glob(str(tmp_path / "mix2000.json.lengths-*.npz"))) == 1


def test_the_shards_hold_the_mixtures_records(tmp_path):
    from llava.bench.startup import write_shards
    from llava.data.shards import ShardRecords, ShardSet

    rows = json.load(open(write_mixture(str(tmp_path), 700)))
    pattern = write_shards(str(tmp_path), 700, per_shard=300)
    assert pattern.endswith("mix700-shards/{00000..00002}.tar")
    records = ShardRecords.read(ShardSet.find(pattern), None, None)
    assert len(records) == 700
    for index in (0, 299, 300, 699):  # each shard's first and last
        record = records.record(index)
        assert record.id == rows[index]["id"]
        assert [turn.text for turn in record.turns] == [
            turn["value"] for turn in rows[index]["conversations"]
        ]
        assert len(record.images) == int("image" in rows[index])


def test_the_command_builds_shards_cold_then_from_the_cache(tmp_path):
    rows = main(["--records", "400", "--ranks", "1", "--workers", "0", "--format", "shards",
                 "--workdir", str(tmp_path)])  # fmt: skip
    assert [(start, result["samples"]) for start, result in rows] == [("cold", 400), ("warm", 400)]
    assert len(glob.glob(str(tmp_path / "mix400-shards" / "*.lengths-*.npz"))) == 1


def test_the_jsonl_holds_the_mixtures_rows(tmp_path):
    from llava.bench.startup import write_jsonl

    path = write_mixture(str(tmp_path), 300)
    lines = open(write_jsonl(path)).read().splitlines()
    assert [json.loads(line) for line in lines] == json.load(open(path))
