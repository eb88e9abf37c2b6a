"""The image-text-to-text rows of the benchmark compare like with like: TRL's collator and this
project's data path give the same tokens and supervised labels for the same records; a run of
both systems reports the figures; without TRL the command says so."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch
from transformers import AutoProcessor

from llava.bench.assets import Assets
from llava.bench.configs import CONFIGS, VLM_STAGES
from llava.bench.trl_baseline import (
    NOT_INSTALLED,
    conversation_messages,
    trl_dataset,
    trl_installed,
)
from llava.bench.vlm_models import write_vlm_assets
from llava.data.processor_media import load_processor_dataset
from tests.test_bench import bench

TINY = CONFIGS["tiny"]
STEPS = 1  # the records are exactly STEPS batches: a run trains one epoch of them
requires_trl = pytest.mark.skipif(not trl_installed(), reason='TRL is not installed (".[bench]")')


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Assets:
    folder = str(tmp_path_factory.mktemp("bench_vlm"))
    write_vlm_assets(folder, TINY, list(VLM_STAGES), warmup=0, steps=STEPS)
    return Assets(folder)


def test_records_become_messages_with_the_image_first():
    record = {
        "conversations": [
            {"from": "human", "value": "<image>\nw1 w2?"},
            {"from": "gpt", "value": "w3."},
        ]
    }
    assert conversation_messages(record) == [
        {"role": "user", "content": "w1 w2?"},
        {"role": "assistant", "content": "w3."},
    ]


@requires_trl
@pytest.mark.parametrize("family", VLM_STAGES)
def test_trl_collator_and_ours_give_the_same_tokens_and_labels(assets, family):
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    # Each side its own processor, as in the benchmark's separate processes: a call through
    # TRL's collator leaves padding switched on in the tokenizer it used.
    ours_processor = AutoProcessor.from_pretrained(assets.vlm(family))
    trl_processor = AutoProcessor.from_pretrained(assets.vlm(family))
    path = assets.data(family, "measure")
    ours = load_processor_dataset(
        path, ours_processor, "auto", TINY.model_max_length, assets.images
    )
    rows = trl_dataset(path, assets.images)
    assert len(ours) == len(rows) == STEPS * TINY.batch_size  # nothing dropped
    collator = DataCollatorForVisionLanguageModeling(trl_processor, assistant_only_loss=True)
    theirs = collator([rows[i] for i in range(len(rows))])
    for row in range(len(rows)):
        sample = ours[row]
        n = len(sample["input_ids"])
        assert theirs["attention_mask"][row].sum() == n
        assert torch.equal(theirs["input_ids"][row, :n], sample["input_ids"])
        assert torch.equal(theirs["labels"][row, :n], sample["labels"])


@requires_trl
def test_a_run_of_both_systems_reports_the_figures(assets):
    from llava.bench.report import summarise, table
    from llava.bench.runs import OursOptions, run

    family = "qwen2_vl"
    records = []
    for system in ("ours", "baseline"):
        result = asdict(run(system, assets.folder, TINY, family, 0, STEPS, OursOptions()))
        records.append({**result, "round": 0, "load": [0.0, 0.0]})
    assert records[0]["options"]["packing"] == "none"
    assert records[1]["options"]["trainer"] == "trl.SFTTrainer"
    summary = summarise(records, TINY)[family]  # checks both did the same work
    for system in ("ours", "baseline"):
        figures = summary[system]
        assert figures["samples_per_s"] > 0 and figures["peak_memory_mib"] > 0
        assert figures["loss"] == pytest.approx(summary["ours"]["loss"], rel=1e-4)
    assert summary["speedup"] > 0 and summary["memory_ratio"] > 0

    class Args:
        steps, warmup, rounds = STEPS, 0, 1

    printed = table({family: summary}, TINY, Args, "now")
    assert "| qwen2_vl | ours |" in printed and "| qwen2_vl | trl |" in printed


def test_without_trl_the_command_says_so(monkeypatch, capsys):
    import llava.bench.trl_baseline
    from llava.bench.__main__ import main

    monkeypatch.setattr(llava.bench.trl_baseline, "trl_installed", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", "tiny", "--stage", "vlm"])
    assert exit_info.value.code == NOT_INSTALLED


@requires_trl
@pytest.mark.slow
def test_vlm_bench_command_prints_both_families():
    out = bench("--config", "tiny", "--stage", "vlm", "--steps", "1", "--warmup", "0", "--json")
    summary = json.loads(out)["summary"]
    for family in VLM_STAGES:
        assert {"ours", "baseline", "speedup", "memory_ratio"} <= set(summary[family])
