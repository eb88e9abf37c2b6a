"""DPO (llava/train/dpo.py): pair data, the loss against full logits, log 2 at the start, and a
toy preference task learnt from images."""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from llava.constants import IGNORE_INDEX
from llava.conversation import ASSISTANT, USER, Turn
from llava.data.formats import BadRecordError
from llava.data.preference import build_preference_data, read_preference_records
from llava.data.tokenize import ConversationTokenizer
from llava.model.builder import build_llava_model, load_tokenizer
from llava.train.dpo import (
    DPOArguments,
    DPOTrainer,
    check_reference,
    parse_dpo_arguments,
    train_dpo,
)
from llava.train.dpo_loss import preference_loss, sequence_log_probs
from llava.train.lora import add_lora
from llava.train.stages import apply_stage, plan_stage
from tests.fixtures.checkpoints import perturb
from tests.fixtures.datasets import COLOURS

QUESTION = "What colour is the square?"
NUM_TRAIN_IMAGES = 16  # of the shapes dataset's 24; the others make the held-out pairs


def colour_pairs(indices, layout: str = "llava") -> list[dict]:
    """Per image of the shapes dataset, its colour (chosen) against each other colour."""
    names = list(COLOURS)
    rows = []
    for index in indices:
        colour, image = names[index % len(names)], f"{index:03d}.png"
        for wrong in names:
            if wrong == colour:
                continue
            pair_id = f"{index}-{wrong}"
            if layout == "llava":
                rows.append(
                    {
                        "id": pair_id,
                        "image": image,
                        "conversations": [{"from": "human", "value": f"<image>\n{QUESTION}"}],
                        "chosen": colour,
                        "rejected": wrong,
                    }
                )
            else:
                content = [{"type": "image"}, {"type": "text", "text": QUESTION}]
                rows.append(
                    {
                        "id": pair_id,
                        "images": [image],
                        "prompt": [{"role": "user", "content": content}],
                        "chosen": [{"role": "assistant", "content": colour}],
                        "rejected": [{"role": "assistant", "content": wrong}],
                    }
                )
    return rows


def write_rows(path: str, rows: list[dict]) -> str:
    with open(path, "w") as f:
        if path.endswith(".jsonl"):
            f.writelines(json.dumps(row) + "\n" for row in rows)
        else:
            json.dump(rows, f)
    return path


def write_stage_two_model(assets: dict[str, str], folder: str) -> str:
    """A full composed checkpoint (as finetune.sh leaves one) with its tokenizer."""
    torch.manual_seed(0)
    model = build_llava_model(assets["llm"], assets["clip"])
    perturb(model.projector, 1)
    model.save_pretrained(folder)
    load_tokenizer(assets["llm"]).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dpo_assets(training_assets, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("dpo")
    train = range(NUM_TRAIN_IMAGES)
    return {
        **training_assets,
        "stage_two": write_stage_two_model(training_assets, str(root / "stage_two")),
        "pairs": write_rows(str(root / "pairs.json"), colour_pairs(train)),
        "message_pairs": write_rows(str(root / "pairs.jsonl"), colour_pairs(train, "messages")),
        "held_out": write_rows(str(root / "held_out.json"), colour_pairs(range(16, 24))),
    }


@pytest.fixture(scope="module")
def tokenizer(dpo_assets):
    return load_tokenizer(dpo_assets["llm"])


@pytest.fixture(scope="module")
def model(dpo_assets):
    torch.manual_seed(0)
    model = build_llava_model(dpo_assets["llm"], dpo_assets["clip"])
    perturb(model.projector, 1)
    return model.eval()


def data_args(path: str, image_folder: str, **extra):
    return type("DataArgs", (), {"data_path": path, "image_folder": image_folder, **extra})()


def pair_data(model, tokenizer, path, image_folder, **extra):
    return build_preference_data(
        tokenizer,
        model.vision_tower.image_processor,
        model.num_image_tokens,
        data_args(path, image_folder, image_aspect_ratio="pad", **extra),
        "v1",
        256,
    )


# -- data ------------------------------------------------------------------------------------------
def test_both_layouts_give_the_same_pairs(dpo_assets, model, tokenizer):
    folder = dpo_assets["image_folder"]
    llava, _ = pair_data(model, tokenizer, dpo_assets["pairs"], folder)
    messages, _ = pair_data(model, tokenizer, dpo_assets["message_pairs"], folder)
    assert len(llava) == len(messages) == 3 * NUM_TRAIN_IMAGES
    for i in (0, 7):
        a, b = llava[i], messages[i]
        for key in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"):
            assert torch.equal(a[key], b[key]), key
        assert torch.equal(a["pixel_values"], b["pixel_values"])


def test_labels_are_the_last_answer_as_stage_two_masks_it(dpo_assets, model, tokenizer):
    """Single turn: the labels are stage 2's. Several turns: only the last answer is scored."""
    earlier = [
        {"from": "human", "value": "<image>\nIs it a square?"},
        {"from": "gpt", "value": "yes"},
    ]
    row = {
        "id": "multi",
        "image": "000.png",
        "conversations": [*earlier, {"from": "human", "value": QUESTION}],
        "chosen": "red",
        "rejected": "a blue one",
    }
    path = write_rows(os.path.join(os.path.dirname(dpo_assets["pairs"]), "multi.json"), [row])
    dataset, _ = pair_data(model, tokenizer, dpo_assets["pairs"], dpo_assets["image_folder"])
    multi, _ = pair_data(model, tokenizer, path, dpo_assets["image_folder"])
    stage_two = ConversationTokenizer(tokenizer, "v1", model.num_image_tokens)

    record = next(read_preference_records(dpo_assets["pairs"], dpo_assets["image_folder"]))
    expected = stage_two.encode([*record.prompt, Turn(ASSISTANT, record.chosen)])
    assert dataset[0]["chosen_input_ids"].tolist() == expected.input_ids
    assert dataset[0]["chosen_labels"].tolist() == expected.labels

    pair = multi[0]
    for side, answer in (("chosen", "red"), ("rejected", "a blue one")):
        turns = [
            Turn(USER, "<image>\nIs it a square?"),
            Turn(ASSISTANT, "yes"),
            Turn(USER, QUESTION),
            Turn(ASSISTANT, answer),
        ]
        full = stage_two.encode(turns)
        labels = pair[f"{side}_labels"].tolist()
        assert pair[f"{side}_input_ids"].tolist() == full.input_ids
        scored = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
        stage_two_scored = [i for i, label in enumerate(full.labels) if label != IGNORE_INDEX]
        # stage 2 scores "yes</s>" too; DPO only the last answer and its end token
        assert scored == [i for i in stage_two_scored if i >= scored[0]]
        assert scored[0] > stage_two_scored[0] and scored[-1] == len(labels) - 1
        assert tokenizer.decode([labels[i] for i in scored]).replace(" ", "") == (
            answer.replace(" ", "") + tokenizer.eos_token
        )
    start = pair["chosen_labels"].ne(IGNORE_INDEX).nonzero()[0, 0]
    assert torch.equal(pair["chosen_input_ids"][:start], pair["rejected_input_ids"][:start])


def test_bad_pairs_are_named_or_skipped_and_counted(dpo_assets, model, tokenizer, tmp_path):
    good = colour_pairs([0])[0]
    rows = [
        good,
        {**good, "id": "same", "rejected": good["chosen"]},
        {**good, "id": "empty", "chosen": "  "},
        {**good, "id": "gone", "image": "missing.png"},
        {
            **good,
            "id": "ends",
            "conversations": [*good["conversations"], {"from": "gpt", "value": "x"}],
        },
    ]
    path = write_rows(str(tmp_path / "bad.json"), rows)
    folder = dpo_assets["image_folder"]
    with pytest.raises(BadRecordError, match=r"record 1 \(id same\): .*identical"):
        pair_data(model, tokenizer, path, folder)
    reasons = {
        item.record_id: item.reason
        for item in read_preference_records(path, folder)
        if isinstance(item, BadRecordError)
    }
    assert "empty" in reasons["empty"] and "not found" in reasons["gone"]
    assert "ends with an assistant turn" in reasons["ends"]
    dataset, _ = pair_data(model, tokenizer, path, folder, skip_bad_records=True)
    assert len(dataset) == 1 and dataset.summary.skipped_bad == 4


# -- the loss -------------------------------------------------------------------------------------
def full_logits_log_prob(model, input_ids, labels, pixel_values) -> torch.Tensor:
    """The reference computation: one sequence alone, all its logits, log-softmax, gather."""
    with torch.no_grad():
        logits = model(input_ids=input_ids[None], pixel_values=pixel_values).logits[0]
    log_probs = torch.log_softmax(logits.float(), dim=-1)[:-1]  # (T-1, V) predict token t+1
    targets = labels[1:]
    mask = targets != IGNORE_INDEX
    return log_probs[mask].gather(1, targets[mask][:, None]).sum()


@pytest.mark.parametrize(
    "loss_type, smoothing", [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0), ("robust", 0.2)]
)
def test_loss_equals_full_logits_reference(dpo_assets, model, tokenizer, loss_type, smoothing):
    dataset, collator = pair_data(model, tokenizer, dpo_assets["pairs"], dpo_assets["image_folder"])
    pairs = [dataset[i] for i in (0, 5, 9)]
    batch = collator(pairs)
    assert batch["input_ids"].shape[0] == 6 and batch["pixel_values"].shape[0] == 3
    reference_model = copy.deepcopy(model)
    perturb(reference_model.language_model, 7)
    beta = 0.5
    with torch.no_grad():
        policy = sequence_log_probs(model, batch)
        reference = sequence_log_probs(reference_model, batch)
    result = preference_loss(
        policy[:3], policy[3:], reference[:3], reference[3:], beta, loss_type, smoothing
    )

    expected_losses = []
    for pair in pairs:
        logps = {
            (name, side): full_logits_log_prob(
                net, pair[f"{side}_input_ids"], pair[f"{side}_labels"], pair["pixel_values"]
            )
            for name, net in (("policy", model), ("reference", reference_model))
            for side in ("chosen", "rejected")
        }
        h = (logps["policy", "chosen"] - logps["policy", "rejected"]) - (
            logps["reference", "chosen"] - logps["reference", "rejected"]
        )
        if loss_type == "ipo":
            expected = (h - 1 / (2 * beta)) ** 2
        else:
            win, lose = F.logsigmoid(beta * h), F.logsigmoid(-beta * h)
            expected = -win * (1 - smoothing) - lose * smoothing
            if loss_type == "robust":
                expected = (-win * (1 - smoothing) + lose * smoothing) / (1 - 2 * smoothing)
        expected_losses.append(expected)
        chosen_reward = beta * (logps["policy", "chosen"] - logps["reference", "chosen"])
        assert result.chosen_rewards[len(expected_losses) - 1].item() == pytest.approx(
            chosen_reward.item(), abs=1e-4
        )
    torch.testing.assert_close(result.losses, torch.stack(expected_losses), atol=1e-4, rtol=1e-4)
    assert result.losses.abs().sum() > 0


def test_reference_free_takes_the_reference_as_zero():
    chosen, rejected = torch.tensor([-3.0, -1.0]), torch.tensor([-2.0, -4.0])
    free = preference_loss(chosen, rejected, None, None, beta=0.2)
    expected = -F.logsigmoid(0.2 * (chosen - rejected))
    torch.testing.assert_close(free.losses, expected)
    torch.testing.assert_close(free.chosen_rewards, 0.2 * chosen)


def lora_trainer(model, dataset, collator, output_dir, **arguments) -> DPOTrainer:
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
    return DPOTrainer(
        model=wrapped,
        args=args,
        stage_plan=plan,
        dpo=dpo,
        train_dataset=dataset,
        data_collator=collator,
    )


def test_reference_equal_to_policy_gives_log_2_and_no_margin(dpo_assets, tokenizer, tmp_path):
    """LoRA at step 0 (lora_B = 0): the policy is its reference (adapters disabled)."""
    torch.manual_seed(0)
    model = build_llava_model(dpo_assets["llm"], dpo_assets["clip"])
    dataset, collator = pair_data(model, tokenizer, dpo_assets["pairs"], dpo_assets["image_folder"])
    trainer = lora_trainer(model, dataset, collator, tmp_path, beta=0.3)
    batch = collator([dataset[i] for i in range(4)])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    logs = trainer.preference_logs()
    assert logs["rewards/margins"] == 0 and logs["rewards/chosen"] == 0
    assert logs["rewards/accuracies"] == 0 and logs["logps/chosen"] < 0
    loss.backward()  # the adapters get a gradient, the frozen projector none
    lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)
    assert all(p.grad is None for p in trainer.model.base_model.model.projector.parameters())


def test_lora_reference_refuses_a_training_projector():
    with pytest.raises(ValueError, match="--freeze_mm_mlp_adapter True"):
        check_reference(plan_stage(lora_enable=True), DPOArguments())
    check_reference(plan_stage(lora_enable=True, freeze_mm_mlp_adapter=True), DPOArguments())
    check_reference(plan_stage(lora_enable=True), DPOArguments(reference_free=True))


def test_dpo_arguments_are_checked():
    with pytest.raises(ValueError, match="--dpo_loss must be one of sigmoid, ipo, robust"):
        DPOArguments(dpo_loss="hinge")
    with pytest.raises(ValueError, match="--beta"):
        DPOArguments(beta=0)


# -- a toy preference task ------------------------------------------------------------------------
def held_out_accuracy(model, dataset, collator) -> float:
    """How often the model gives the chosen answer the higher log-probability."""
    wins = []
    with torch.no_grad():
        for start in range(0, len(dataset), 8):
            batch = collator([dataset[i] for i in range(start, min(start + 8, len(dataset)))])
            logps = sequence_log_probs(model, batch)
            half = logps.shape[0] // 2
            wins.append(logps[:half] > logps[half:])
    return torch.cat(wins).float().mean().item()


@pytest.mark.slow  # 100 steps: about 15 s on an idle 2-core machine
def test_entry_trains_the_toy_preference_task(dpo_assets, tokenizer, tmp_path):
    """Full DPO from the stage-2 model through the entry (the reference: a frozen copy) makes
    the held-out pairs' chosen colour the likelier answer: it has to read the image."""
    output = tmp_path / "dpo"
    arguments = parse_dpo_arguments(
        [
            "--model_name_or_path", dpo_assets["stage_two"],
            "--data_path", dpo_assets["pairs"],
            "--image_folder", dpo_assets["image_folder"],
            "--image_aspect_ratio", "pad",
            "--beta", "0.5",
            "--output_dir", str(output),
            "--per_device_train_batch_size", "8",
            "--max_steps", "100",
            "--learning_rate", "3e-3",
            "--lr_scheduler_type", "constant",
            "--logging_steps", "10",
            "--save_strategy", "no",
            "--report_to", "none",
            "--disable_tqdm", "True",
            "--use_cpu", "True",
        ]
    )  # fmt: skip
    trainer = train_dpo(*arguments)
    model = trainer.model.eval()
    held_out, collator = pair_data(
        model, tokenizer, dpo_assets["held_out"], dpo_assets["image_folder"]
    )
    start = held_out_accuracy(trainer.reference_model, held_out, collator)
    after = held_out_accuracy(model, held_out, collator)
    # balanced pairs: a model that ignores the image scores exactly 0.5
    assert start <= 0.6 and after >= 0.85, (start, after)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs[0]["loss"] > logs[-1]["loss"]
    for field in ("rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"):
        assert field in logs[-1]
    assert logs[-1]["rewards/accuracies"] > logs[0]["rewards/accuracies"]
    assert logs[-1]["rewards/margins"] > 0
    assert logs[-1]["pairs_per_second"] > 0 and "tokens_per_second" in logs[-1]
    assert all(not p.requires_grad for p in trainer.reference_model.parameters())
    assert {"config.json", "model.safetensors", "run_complete.json"} <= set(os.listdir(output))
