"""The Gaudi path without Gaudi hardware: lazy imports, dispatch, a CPU run of the real GaudiTrainer.

optimum-habana is installed for real. Its import runs `pip list | grep habana-torch-plugin`
and fails without the Habana stack; the tests that import it put a `pip` first on PATH that
reports the plugin (nothing else is faked: `habana_frameworks` stays absent). They run in
subprocesses, so optimum-habana never enters this test process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils.data import DataLoader

from llava.data.collator import StaticShapes, bucket_lengths
from llava.data.sampler import ModalityLengthGroupedSampler
from llava.device import optimum_habana_installed
from llava.model.builder import build_llava_model, load_tokenizer
from llava.train.arguments import DataArguments, ModelArguments, TrainingArguments, wants_gaudi
from llava.train.train import build_data
from tests.fixtures.training import REPO, STAGE_ONE_FILES, dry_run_arguments, training_flags

if not optimum_habana_installed():
    pytest.skip(
        "the habana extra is not installed (CI's second environment has it)",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def habana_pip(tmp_path_factory) -> dict[str, str]:
    """An environment whose `pip list` reports habana-torch-plugin, as on a Gaudi machine."""
    folder = tmp_path_factory.mktemp("habana_pip")
    pip = folder / "pip"
    pip.write_text('#!/bin/sh\necho "habana-torch-plugin 1.24.0"\n')
    pip.chmod(0o755)
    return {**os.environ, "PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}


def run_python(code: str, env: dict[str, str] | None = None, *args: str) -> dict:
    """Run code in a fresh interpreter; it prints one JSON line starting with RESULT."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env or dict(os.environ),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return json.loads(lines[-1][len("RESULT ") :])


def test_importing_llava_loads_no_habana_module():
    out = run_python(
        """
        import json, sys
        import llava, llava.device, llava.train.train, llava.train.gaudi, llava.train.gaudi_launch
        import llava.eval.model_vqa, llava.serve.cli, llava.export_hf
        names = [n for n in sys.modules if n.startswith(("optimum.habana", "habana_frameworks"))]
        print("RESULT " + json.dumps(names))
        """
    )
    assert out == []


def test_use_habana_without_the_habana_stack_is_a_clear_error():
    out = run_python(
        """
        import json
        from llava.train.arguments import parse_arguments
        try:
            parse_arguments(["--model_name_or_path", "m", "--output_dir", "o", "--use_habana"])
        except RuntimeError as error:
            print("RESULT " + json.dumps(str(error)))
        """
    )
    assert "Habana software stack is not" in out and "Gaudi machine" in out


def test_use_habana_picks_the_gaudi_classes(habana_pip):
    out = run_python(
        """
        import json
        from optimum.habana import GaudiTrainer, GaudiTrainingArguments
        from llava.train.arguments import LlavaTrainingFields, training_arguments_class
        from llava.train.gaudi import gaudi_trainer_class, is_gaudi_arguments
        from llava.train.trainer import LlavaTrainerMixin
        from llava.train.arguments import parse_arguments
        args_class, trainer_class = training_arguments_class(True), gaudi_trainer_class()
        try:  # on a machine without HPUs, device setup needs habana_frameworks
            parse_arguments(["--model_name_or_path", "m", "--output_dir", "o", "--use_habana"])
        except RuntimeError as error:
            missing = str(error)
        print("RESULT " + json.dumps({
            "args": [issubclass(args_class, GaudiTrainingArguments),
                     issubclass(args_class, LlavaTrainingFields)],
            "trainer": [issubclass(trainer_class, GaudiTrainer),
                        issubclass(trainer_class, LlavaTrainerMixin)],
            "defaults": [args_class.num_length_buckets, args_class.dataloader_drop_last],
            "missing": missing,
        }))
        """,
        habana_pip,
    )
    assert out["args"] == [True, True] and out["trainer"] == [True, True]
    assert out["defaults"] == [8, True]  # static shapes by default on Gaudi
    assert "habana_frameworks" in out["missing"]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--use_habana"], True),
        (["--use_habana", "True"], True),
        (["--use_habana=true"], True),
        (["--use_habana", "False"], False),
        (["--bf16", "True"], False),
    ],
)
def test_wants_gaudi_reads_the_flag_as_the_parser_does(argv, expected):
    assert wants_gaudi(["--output_dir", "o", *argv]) is expected


def test_gaudi_only_flags_off_gaudi_name_the_flag():
    with pytest.raises(ValueError, match="--use_lazy_mode, --gaudi_config_name act only on Gaudi"):
        TrainingArguments(output_dir="o", use_lazy_mode=True, gaudi_config_name="g.json")


def test_gaudi_refuses_fp16_and_tf32(habana_pip):
    out = run_python(
        """
        import json
        from llava.train.arguments import parse_arguments
        errors = []
        for flag in ("--fp16", "--tf32"):
            argv = ["--model_name_or_path", "m", "--output_dir", "o", "--use_cpu", "True",
                    "--use_lazy_mode", "False", flag, "True"]
            try:
                parse_arguments(argv, gaudi=True)
            except ValueError as error:
                errors.append(str(error))
        print("RESULT " + json.dumps(errors))
        """,
        habana_pip,
    )
    assert len(out) == 2 and "--fp16" in out[0] and "--tf32" in out[1]


def test_stage_one_runs_through_the_real_gaudi_trainer_on_cpu(
    habana_pip, training_assets, tmp_path
):
    argv = training_flags(
        training_assets,
        tmp_path,
        "--data_path", training_assets["pretrain"],
        "--version", "plain",
        "--tune_mm_mlp_adapter", "True",
        "--use_lazy_mode", "False",
        "--model_max_length", "128",
    )  # fmt: skip
    out = run_python(
        """
        import json, sys
        import torch, transformers
        from optimum.habana import GaudiTrainer
        from llava.train.arguments import parse_arguments
        from llava.train.train import build_model, train
        model_args, data_args, args = parse_arguments(json.loads(sys.argv[1]), gaudi=True)
        transformers.set_seed(args.seed)
        before = build_model(model_args, args)[0].state_dict()
        trainer = train(model_args, data_args, args)
        after = trainer.model.state_dict()
        changed = sorted({k.split(".")[0] for k in after if not torch.equal(after[k], before[k])})
        print("RESULT " + json.dumps({
            "gaudi_trainer": isinstance(trainer, GaudiTrainer),
            "trainer": type(trainer).__name__,
            "changed": changed,
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "lengths": list(trainer.data_collator.static_shapes.lengths),
        }))
        """,
        habana_pip,
        json.dumps(argv),
    )
    assert out["gaudi_trainer"] and out["trainer"] == "LlavaGaudiTrainer"
    assert out["changed"] == ["projector"]
    assert len(out["losses"]) == 3 and out["losses"][-1] < out["losses"][0]
    assert out["lengths"] == list(bucket_lengths(128, 8))
    assert sorted(os.listdir(tmp_path)) == STAGE_ONE_FILES


def test_gaudi_launcher_runs_the_command_through_the_distributed_runner(habana_pip, tmp_path):
    marker = tmp_path / "ran"
    code = f"open({str(marker)!r}, 'w').write('yes')"
    result = subprocess.run(
        [sys.executable, "-m", "llava.train.gaudi_launch", "--world_size", "1", "--", "-c", code],
        env=habana_pip,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert marker.read_text() == "yes"


def test_hpu_scripts_use_the_gaudi_launcher_configs_and_flags(habana_pip):
    """DEVICE=hpu: DistributedRunner, the Gaudi ZeRO configs, no tf32, and flags that parse."""
    env = {**habana_pip, "DEVICE": "hpu"}
    for script, stage in (("pretrain.sh", 2), ("finetune.sh", 3), ("finetune_lora.sh", 3)):
        argv = dry_run_arguments(script, env)
        assert argv[:3] == ["python", "-m", "llava.train.gaudi_launch"]
        train_argv = argv[argv.index("--") + 2 :]
        pairs = dict(zip(train_argv[::2], train_argv[1::2]))
        assert pairs["--deepspeed"] == f"scripts/zero{stage}_gaudi.json"
        assert pairs["--tf32"] == "False" and pairs["--use_habana"] == "True"
        out = run_python(
            """
            import json, sys, transformers
            from llava.train.arguments import DataArguments, ModelArguments
            from llava.train.arguments import training_arguments_class
            parser = transformers.HfArgumentParser(
                (ModelArguments, DataArguments, training_arguments_class(True)))
            _, unknown = parser.parse_known_args(json.loads(sys.argv[1]))
            print("RESULT " + json.dumps(unknown))
            """,
            habana_pip,
            json.dumps(train_argv),
        )
        assert out == [], script
    for stage in (2, 3):
        with open(os.path.join(REPO, "scripts", f"zero{stage}_gaudi.json")) as f:
            config = json.load(f)
        assert "fp16" not in config and config["bf16"] == {"enabled": True}
        assert config["zero_optimization"]["overlap_comm"] is False


# -- static shapes (any device) ------------------------------------------------------------
@pytest.fixture(scope="module")
def static_data(training_assets):
    """The stage-2 shapes data batched with 4 length buckets and fixed image slots."""
    model = build_llava_model(training_assets["llm"], training_assets["clip"])
    tokenizer = load_tokenizer(training_assets["llm"])
    model_args = ModelArguments(model_name_or_path=training_assets["llm"], version="v1")
    data_args = DataArguments(
        data_path=training_assets["finetune"], image_folder=training_assets["image_folder"]
    )
    args = TrainingArguments(
        output_dir="unused",
        model_max_length=96,
        num_length_buckets=4,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
    )
    dataset, _, collator = build_data(model, tokenizer, model_args, data_args, args)
    return model, dataset, collator


def test_bucket_lengths_are_few_and_cover_the_maximum():
    assert bucket_lengths(2048, 8) == (256, 512, 768, 1024, 1280, 1536, 1792, 2048)
    assert bucket_lengths(100, 3) == (40, 72, 100)


def test_bucketed_collator_yields_only_bucket_shapes_over_an_epoch(static_data):
    _, dataset, collator = static_data
    shapes = collator.static_shapes
    assert shapes == StaticShapes(lengths=(24, 48, 72, 96), image_slots=4, image_shape=(3, 32, 32))
    sampler = ModalityLengthGroupedSampler(
        dataset.lengths, 4, modalities=dataset.modalities, seed=0
    )
    loader = DataLoader(dataset, batch_size=4, sampler=sampler, collate_fn=collator, drop_last=True)
    seen_ids, seen_pixels, real_images = set(), set(), []
    for batch in loader:
        seen_ids.add(tuple(batch["input_ids"].shape))
        seen_pixels.add(tuple(batch["pixel_values"].shape))
        real_images.append(int(batch["num_images"]))
    assert {length for _, length in seen_ids} <= set(shapes.lengths)
    assert {rows for rows, _ in seen_ids} == {4}
    assert seen_pixels == {(4, 3, 32, 32)}  # text-only batches too
    assert 0 in real_images and 4 in real_images  # both modalities went through


def test_a_static_batch_gives_the_loss_of_the_dynamic_one(static_data):
    model, dataset, collator = static_data
    samples = [dataset[i] for i in (0, 1, len(dataset) - 1)]  # two with an image, one text-only
    assert [s["pixel_values"] is None for s in samples] == [False, False, True]
    static = collator(samples)
    dynamic_collator = type(collator)(collator.pad_token_id)
    dynamic = dynamic_collator(samples)
    assert static["input_ids"].shape[1] > dynamic["input_ids"].shape[1]
    assert static["pixel_values"].shape[0] == 4 and int(static["num_images"]) == 2
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(**static).loss, model(**dynamic).loss, atol=1e-6)
