"""DPO on transformers image-text-to-text models (llava/train/dpo_vlm.py,
llava/data/processor_preference.py): pairs through the model's own processor and chat template,
log-probabilities and the loss against the model's plain forward on each whole sequence, the
vision tower once per pair where the family allows it, log 2 at the start with LoRA, and
scripts/dpo.sh end to end on a tiny Qwen2-VL."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F

from llava.constants import IGNORE_INDEX
from llava.data.formats import BadRecordError
from llava.data.images import load_image
from llava.data.processor_preference import IMAGE_INPUTS, build_processor_preference_data
from llava.model.builder import load_image_text_to_text
from llava.model.kinds import CONNECTOR, VISION, parts_by_role
from llava.train.dpo import DPOTrainer, check_reference, parse_dpo_arguments, train_dpo
from llava.train.dpo_loss import preference_loss, sequence_log_probs
from llava.train.dpo_vlm import shares_image_features
from llava.train.lora import add_lora
from llava.train.stages import apply_stage, plan_stage
from llava.train.train import processor_tokenizer
from tests.fixtures.checkpoints import perturb
from tests.fixtures.datasets import write_shapes_dataset
from tests.fixtures.tiny_vlms import PROMPT_FAMILIES, VLM_FAMILIES, save_tiny_vlm
from tests.fixtures.training import logged_losses, run_script
from tests.test_dpo import QUESTION, colour_pairs, data_args, write_rows

# Families the golden test runs on: every one whose tower runs once per pair
# (dpo_vlm.SHARED_IMAGE_FEATURES), and Qwen3-VL and Mllama, whose tower runs on both rows'
# images.
GOLDEN = [
    family
    for family in (
        "llava",
        "llava_next",
        "internvl",
        "qwen2_vl",
        "qwen2_5_vl",
        "idefics3",
        "smolvlm",
        "gemma3",
        "qwen3_vl",
        "mllama",
    )
    if family in VLM_FAMILIES
]
MAX_LENGTH = 256


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("dpo_vlm")
    data = write_shapes_dataset(str(root / "data"), num_images=8)
    return {
        "root": str(root),
        "image_folder": data["image_folder"],
        "pairs": write_rows(str(root / "pairs.json"), colour_pairs(range(8))),
    }


@pytest.fixture(scope="module")
def vlm_folder(assets):
    """family -> a saved tiny checkpoint of it, written once per module."""
    folders: dict[str, str] = {}

    def folder(family: str) -> str:
        if family not in folders:
            folders[family] = save_tiny_vlm(family, os.path.join(assets["root"], family))
        return folders[family]

    return folder


def open_vlm(folder: str):
    """The model by its own class and its processor, as load_pretrained_model opens them."""
    model, processor = load_image_text_to_text(folder, torch.float32)
    processor_tokenizer(processor, MAX_LENGTH)
    return model.eval(), processor


def pair_data(processor, path: str, image_folder: str, **extra):
    return build_processor_preference_data(
        processor, data_args(path, image_folder, **extra), "auto", MAX_LENGTH
    )


# -- data ------------------------------------------------------------------------------------------
def test_pairs_share_the_prompt_and_score_only_the_last_answer(assets, vlm_folder):
    _, processor = open_vlm(vlm_folder("qwen2_vl"))
    row = {
        "id": "multi",
        "image": "000.png",
        "conversations": [
            {"from": "human", "value": "<image>\nIs it a square?"},
            {"from": "gpt", "value": "yes"},
            {"from": "human", "value": QUESTION},
        ],
        "chosen": "red",
        "rejected": "a blue one",
    }
    path = write_rows(os.path.join(assets["root"], "multi.json"), [row])
    dataset, _ = pair_data(processor, path, assets["image_folder"])
    pair = dataset[0]
    start = pair["chosen_labels"].ne(IGNORE_INDEX).nonzero()[0, 0]
    assert torch.equal(pair["chosen_input_ids"][:start], pair["rejected_input_ids"][:start])
    tokenizer = processor.tokenizer
    for side, answer in (("chosen", "red"), ("rejected", "a blue one")):
        labels = pair[f"{side}_labels"].tolist()
        scored = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
        assert scored == list(range(scored[0], scored[-1] + 1))  # one run: the last answer
        assert scored[0] == start
        assert tokenizer.decode([labels[i] for i in scored]) == answer + "<|im_end|>"


def test_bad_pairs_are_named_or_skipped_and_too_long_ones_dropped(assets, vlm_folder, tmp_path):
    _, processor = open_vlm(vlm_folder("qwen2_vl"))
    good = colour_pairs([0])[0]
    rows = [
        good,
        {**good, "id": "same", "rejected": good["chosen"]},
        {**good, "id": "empty", "chosen": "  "},
        {**good, "id": "gone", "image": "missing.png"},
        {**good, "id": "long", "chosen": "red " * 300},
    ]
    path = write_rows(str(tmp_path / "bad.json"), rows)
    with pytest.raises(BadRecordError, match=r"record 1 \(id same\): .*identical"):
        pair_data(processor, path, assets["image_folder"])
    dataset, _ = pair_data(processor, path, assets["image_folder"], skip_bad_records=True)
    assert len(dataset) == 1 and dataset.summary.skipped_bad == 3
    assert dataset.summary.dropped_too_long == 1


@pytest.mark.parametrize("family", PROMPT_FAMILIES[:1])
def test_a_prompt_suffix_processor_is_refused_by_name(family, assets, vlm_folder):
    _, processor = open_vlm(vlm_folder(family))
    with pytest.raises(ValueError, match="prompt\\+suffix processor.*DPO is not implemented"):
        pair_data(processor, assets["pairs"], assets["image_folder"])


# -- the log-probabilities and the loss --------------------------------------------------------------
def full_logits_log_prob(model, processor, pair, side, image) -> torch.Tensor:
    """The reference: the model's plain forward on the processor's encoding of the whole
    rendered conversation (one sequence), all its logits, log-softmax, gather."""
    answer = pair["record"].chosen if side == "chosen" else pair["record"].rejected
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]
    text = processor.apply_chat_template(messages, tokenize=False)
    bos = processor.tokenizer.bos_token
    inputs = processor(
        text=[text],
        images=[[image]],
        return_tensors="pt",
        add_special_tokens=not (bos and text.startswith(bos)),
    )
    ids, labels = pair[f"{side}_input_ids"], pair[f"{side}_labels"]
    # the template may write text after the end token (Qwen's newline), which the pair leaves
    # to a next prompt: the sequences agree up to the shorter one, and it holds every label
    length = min(inputs["input_ids"].shape[1], len(ids))
    assert inputs["input_ids"][0, :length].tolist() == ids[:length].tolist()
    assert labels[length:].eq(IGNORE_INDEX).all()
    with torch.no_grad():
        logits = model(**inputs).logits[0, :length]  # (T, V)
    log_probs = torch.log_softmax(logits.float(), dim=-1)[:-1]
    targets = labels[1:length]
    mask = targets != IGNORE_INDEX
    return log_probs[mask].gather(1, targets[mask][:, None]).sum()


class TowerCalls:
    """Counts the vision tower's forward calls and the pixel rows each one takes."""

    def __init__(self, tower: torch.nn.Module):
        self.rows: list[int] = []
        self.handle = tower.register_forward_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs, output):
        pixels = next((a for a in args if isinstance(a, torch.Tensor)), None)
        pixels = kwargs.get("pixel_values", pixels)
        self.rows.append(pixels.shape[0])


def pixel_rows(image_inputs: dict[str, torch.Tensor]) -> int:
    """The pixel rows the pairs' images make (patches, images, or images x tiles)."""
    pixels = image_inputs["pixel_values"]
    return pixels.shape[0] * (pixels.shape[1] if pixels.ndim == 5 else 1)


@pytest.mark.parametrize("family", GOLDEN)
def test_log_probs_and_loss_equal_the_plain_forward(family, assets, vlm_folder):
    model, processor = open_vlm(vlm_folder(family))
    dataset, collator = pair_data(processor, assets["pairs"], assets["image_folder"])
    indices = (0, 5)  # two images of different sizes
    pairs = [{**dataset[i], "record": dataset.records[i]} for i in indices]
    batch = collator(pairs)
    assert batch["input_ids"].shape[0] == 4
    reference_model = copy.deepcopy(model)
    perturb(parts_by_role(reference_model)["language_model"], 7)

    calls = TowerCalls(parts_by_role(model)[VISION])
    with torch.no_grad():
        policy = sequence_log_probs(model, batch)  # (4,)
    calls.handle.remove()
    assert len(calls.rows) == 1  # the tower ran once for the batch
    with torch.no_grad():
        reference = sequence_log_probs(reference_model, batch)

    beta = 0.5
    result = preference_loss(policy[:2], policy[2:], reference[:2], reference[2:], beta)
    expected = {}
    for name, net in (("policy", model), ("reference", reference_model)):
        plain = TowerCalls(parts_by_role(net)[VISION])
        for k, pair in enumerate(pairs):
            image = load_image(pair["record"].images[0])
            for side in ("chosen", "rejected"):
                expected[name, side, k] = full_logits_log_prob(net, processor, pair, side, image)
        plain.handle.remove()
        if name == "policy":  # the plain forwards saw each pair's images twice, as pairs
            if shares_image_features(model):  # the pairs' images once
                assert calls.rows[0] <= min(pixel_rows(batch[IMAGE_INPUTS]), sum(plain.rows) // 2)
            else:  # where it cannot share: on them twice
                assert calls.rows[0] == sum(plain.rows)
    for k in range(2):
        torch.testing.assert_close(policy[k], expected["policy", "chosen", k], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            policy[2 + k], expected["policy", "rejected", k], atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(
            reference[2 + k], expected["reference", "rejected", k], atol=1e-5, rtol=1e-5
        )
        h = (expected["policy", "chosen", k] - expected["policy", "rejected", k]) - (
            expected["reference", "chosen", k] - expected["reference", "rejected", k]
        )
        torch.testing.assert_close(result.losses[k], -F.logsigmoid(beta * h), atol=1e-5, rtol=1e-5)
    assert result.losses.abs().sum() > 0


@pytest.mark.parametrize("family", ["qwen2_vl", "idefics3"])
def test_a_batch_with_a_text_only_pair_gives_each_pair_its_own_log_probs(
    family, assets, vlm_folder, tmp_path
):
    """Image, text-only and image pairs in one batch (Idefics3's per-sample pixels padded with
    a blank row for the text-only one) score as each pair alone."""
    model, processor = open_vlm(vlm_folder(family))
    text_only = {
        "id": "text",
        "conversations": [{"from": "human", "value": "Say a colour."}],
        "chosen": "red",
        "rejected": "blue",
    }
    rows = [colour_pairs([0])[0], text_only, colour_pairs([1])[0]]
    dataset, collator = pair_data(
        processor, write_rows(str(tmp_path / "mixed.json"), rows), assets["image_folder"]
    )
    with torch.no_grad():
        together = sequence_log_probs(model, collator([dataset[i] for i in range(3)]))
        alone = [sequence_log_probs(model, collator([dataset[i]])) for i in range(3)]
    torch.testing.assert_close(together[:3], torch.stack([a[0] for a in alone]), atol=1e-5, rtol=0)
    torch.testing.assert_close(together[3:], torch.stack([a[1] for a in alone]), atol=1e-5, rtol=0)


def test_entry_runs_full_dpo_on_a_vlm_with_a_frozen_reference(assets, vlm_folder, tmp_path):
    """python -m llava.train.dpo on a Qwen2-VL folder (--version left out: its own template),
    full fine-tuning: the reference is a frozen copy, the folder gets the model's own class."""
    output = tmp_path / "full"
    arguments = parse_dpo_arguments(
        [
            "--model_name_or_path", vlm_folder("qwen2_vl"),
            "--data_path", assets["pairs"],
            "--image_folder", assets["image_folder"],
            "--freeze_mm_mlp_adapter", "True",
            "--output_dir", str(output),
            "--per_device_train_batch_size", "2",
            "--max_steps", "2",
            "--learning_rate", "1e-3",
            "--logging_steps", "1",
            "--save_strategy", "no",
            "--report_to", "none",
            "--disable_tqdm", "True",
            "--use_cpu", "True",
        ]
    )  # fmt: skip
    trainer = train_dpo(*arguments)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    # (the 4.55 line's Trainer logs the loss to 4 decimals)
    assert len(logs) == 2 and logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert "rewards/margins" in logs[-1] and "logps/chosen" in logs[-1]
    assert all(not p.requires_grad for p in trainer.reference_model.parameters())
    assert type(trainer.reference_model) is type(trainer.model)
    names = set(os.listdir(output))
    assert {"config.json", "model.safetensors", "chat_template.jinja", "run_complete.json"} <= names


def lora_trainer(model, processor, dataset, collator, output_dir, **arguments) -> DPOTrainer:
    plan = plan_stage(lora_enable=True, freeze_mm_mlp_adapter=True)
    apply_stage(model, plan)
    wrapped = add_lora(model, r=8, alpha=16, dropout=0.0, bias="none")
    _, _, args, dpo = parse_dpo_arguments(
        [
            "--model_name_or_path", "unused",
            "--output_dir", str(output_dir),
            "--report_to", "none",
            "--use_cpu", "True",
            "--per_device_train_batch_size", "4",
            *[f"--{k}={v}" for k, v in arguments.items()],
        ]
    )  # fmt: skip
    check_reference(plan, dpo)
    return DPOTrainer(
        model=wrapped,
        args=args,
        stage_plan=plan,
        dpo=dpo,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=processor,
    )


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_reference_equal_to_policy_gives_log_2_and_no_margin(family, assets, vlm_folder, tmp_path):
    """LoRA at step 0 (lora_B = 0): the policy is its reference (adapters disabled)."""
    model, processor = open_vlm(vlm_folder(family))
    dataset, collator = pair_data(processor, assets["pairs"], assets["image_folder"])
    trainer = lora_trainer(model, processor, dataset, collator, tmp_path, beta=0.3)
    batch = collator([dataset[i] for i in range(4)])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    logs = trainer.preference_logs()
    assert logs["rewards/margins"] == 0 and logs["rewards/chosen"] == 0
    assert logs["rewards/accuracies"] == 0 and logs["logps/chosen"] < 0
    loss.backward()  # the adapters get a gradient, the frozen tower and connector none
    lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)
    parts = parts_by_role(trainer.model)
    for role in (VISION, CONNECTOR):
        assert all(p.grad is None for p in parts[role].parameters()), role


# -- scripts/dpo.sh end to end ---------------------------------------------------------------------
STEPS = 3


@pytest.mark.slow
def test_script_runs_lora_dpo_on_a_vlm_under_zero3(assets, vlm_folder, tmp_path):
    """`VERSION=auto MODEL_BASE= bash scripts/dpo.sh` on a tiny Qwen2-VL folder: LoRA, 2 CPU
    processes under DeepSpeed ZeRO-3; the adapter and the processor are saved, the logs carry
    the preference metrics."""
    output = str(tmp_path / "run")
    env = {
        "MODEL_NAME_OR_PATH": vlm_folder("qwen2_vl"),
        "MODEL_BASE": "",
        "VERSION": "auto",
        "DATA_PATH": assets["pairs"],
        "IMAGE_FOLDER": assets["image_folder"],
        "OUTPUT_DIR": output,
        "NUM_GPUS": "2",
        "PER_DEVICE_BATCH": "2",
        "GRAD_ACCUM": "1",
        "LAUNCHER": "deepspeed",
        "DEEPSPEED_CONFIG": "scripts/zero3.json",
    }
    flags = [
        "--bf16", "False",
        "--tf32", "False",
        "--model_max_length", str(MAX_LENGTH),
        "--dataloader_num_workers", "0",
        "--gradient_checkpointing", "False",
        "--lora_r", "8",
        "--lora_alpha", "16",
        "--learning_rate", "1e-2",
        "--warmup_ratio", "0",
        "--max_steps", str(STEPS),
        "--save_strategy", "no",
        "--disable_tqdm", "True",
    ]  # fmt: skip
    run_script("dpo.sh", env, *flags, log=output + ".log")
    names = set(os.listdir(output))
    assert {"adapter_config.json", "adapter_model.safetensors", "run_complete.json"} <= names
    assert {"chat_template.jinja", "preprocessor_config.json", "tokenizer.json"} <= names
    assert sorted(logged_losses(output)) == list(range(1, STEPS + 1))
    with open(output + ".log") as f:
        log = f.read()
    for field in ("rewards/margins", "rewards/accuracies", "logps/chosen", "pairs_per_second"):
        assert field in log
