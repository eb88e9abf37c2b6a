"""DPO on a composed model trained with AnyRes (llava/data/anyres_preference.py): each image's
tokens and tiles by its size as stage 2 has them (read from headers at build), the pairs'
views, image_sizes and media_kinds once per pair; log-probabilities and the loss against the
full logits of the model's own forward on stage 2's samples; log 2 at step 0 with LoRA; a short
run of the entry."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from llava.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID
from llava.conversation import ASSISTANT, Turn
from llava.data.anyres_data import AnyResDataset
from llava.data.anyres_preference import AnyResPreferenceDataset
from llava.data.formats import BadRecordError, Record
from llava.data.media import TILED, WHOLE
from llava.data.preference import build_preference_data
from llava.model.builder import build_llava_model, load_tokenizer
from llava.model.config import LlavaConfig
from llava.train.dpo import check_aspect_of, parse_dpo_arguments, train_dpo
from llava.train.dpo_loss import preference_loss, sequence_log_probs
from tests.fixtures.checkpoints import perturb
from tests.test_dpo import QUESTION, data_args, lora_trainer, write_rows

PINPOINTS = "(1x1),...,(2x2)"  # 32 px tiles: 32x32 to 64x64
ANYRES, ONEVISION = "anyres", "anyres_max_1"  # OneVision's: a two-image prompt's images whole


def pair_rows() -> list[dict]:
    """Images of three sizes (40x40, 48x32, 32x56: shapes dataset 000-002) and a two-image
    prompt."""
    one = [{"from": "human", "value": f"<image>\n{QUESTION}"}]
    two = [{"from": "human", "value": "<image>\n<image>\nWhich colour is the first square?"}]
    return [
        {"id": "square", "image": "000.png", "conversations": one, "chosen": "red",
         "rejected": "blue"},
        {"id": "wide", "image": "001.png", "conversations": one, "chosen": "green",
         "rejected": "a yellow one"},
        {"id": "tall", "image": "002.png", "conversations": one, "chosen": "blue",
         "rejected": "red"},
        {"id": "two", "images": ["001.png", "002.png"], "conversations": two,
         "chosen": "green", "rejected": "blue, the second one"},
    ]  # fmt: skip


def anyres_model(assets: dict[str, str], aspect: str):
    torch.manual_seed(0)
    model = build_llava_model(
        assets["llm"],
        assets["clip"],
        image_aspect_ratio=aspect,
        image_grid_pinpoints=PINPOINTS,
        mm_patch_merge_type="spatial_unpad",
    )
    perturb(model.projector, 1)  # the newline too: it must land where the model puts it
    return model


@pytest.fixture(scope="module")
def assets(training_assets, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("dpo_anyres")
    return {**training_assets, "pairs": write_rows(str(root / "pairs.json"), pair_rows())}


@pytest.fixture(scope="module")
def tokenizer(assets):
    return load_tokenizer(assets["llm"])


@pytest.fixture(scope="module", params=[ANYRES, ONEVISION])
def model(request, assets):
    return anyres_model(assets, request.param).eval()


def pair_data(model, tokenizer, path, image_folder, max_length=2048, **extra):
    aspect = model.config.image_aspect_ratio
    return build_preference_data(
        tokenizer,
        model.vision_tower.image_processor,
        model.num_image_tokens,
        data_args(path, image_folder, image_aspect_ratio=aspect, **extra),
        "v1",
        max_length,
        anyres=model.anyres,
    )


def stage_two_samples(model, tokenizer, dataset: AnyResPreferenceDataset, side: str) -> list:
    """Stage 2's AnyRes samples of each pair's prompt + `side` answer, as one conversation."""
    records = [
        Record(
            (*pair.prompt, Turn(ASSISTANT, getattr(pair, side))),
            pair.images,
            pair.source,
            pair.index,
            pair.id,
        )
        for pair in dataset.records
    ]
    stage_two = AnyResDataset(
        records,
        tokenizer,
        "v1",
        2048,
        image_processor=model.vision_tower.image_processor,
        anyres=model.anyres,
        image_aspect_ratio=model.config.image_aspect_ratio,
    )
    return [stage_two[i] for i in range(len(stage_two))]


def full_logits_log_prob(model, sample: dict) -> torch.Tensor:
    """The reference: one stage-2 sample alone through the model's plain forward, all its
    logits, log-softmax, the supervised labels gathered and summed."""
    with torch.no_grad():
        logits = model(
            input_ids=sample["input_ids"][None],
            pixel_values=sample["pixel_values"],
            image_sizes=sample["image_sizes"],
            media_kinds=sample["media_kinds"],
        ).logits[0]
    log_probs = torch.log_softmax(logits.float(), dim=-1)[:-1]  # (T-1, V) predict token t+1
    targets = sample["labels"][1:]
    mask = targets != IGNORE_INDEX
    return log_probs[mask].gather(1, targets[mask][:, None]).sum()


# -- data -----------------------------------------------------------------------------------------
def test_pairs_are_stage_two_samples_with_the_last_answer_scored(
    assets, model, tokenizer, monkeypatch
):
    """Each side is stage 2's AnyRes sample of the prompt and that answer (ids, views, sizes,
    kinds); lengths come from the headers, no image decoded at build; the prompt's ids are
    shared and only the answer and its end token are scored."""

    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was decoded while the pairs were built")

    monkeypatch.setattr("llava.data.preference.load_image", no_decoding)
    monkeypatch.setattr("llava.data.anyres_data.load_image", no_decoding)
    dataset, _ = pair_data(model, tokenizer, assets["pairs"], assets["image_folder"])
    monkeypatch.undo()
    assert isinstance(dataset, AnyResPreferenceDataset) and len(dataset) == 4
    stage_two = {
        side: stage_two_samples(model, tokenizer, dataset, side) for side in ("chosen", "rejected")
    }
    anyres = model.anyres
    for i, record in enumerate(dataset.records):
        pair = dataset[i]
        sizes = [Image.open(source).size for source in record.images]
        kinds = anyres.media_kinds([False] * len(sizes))
        assert pair["media_kinds"].tolist() == kinds
        assert pair["image_sizes"].tolist() == [[h, w] for w, h in sizes]
        views = sum(anyres.medium_views(kind, size) for kind, size in zip(kinds, sizes))
        assert pair["pixel_values"].shape == (views, 3, 32, 32)
        for side in ("chosen", "rejected"):
            sample = stage_two[side][i]
            ids, labels = pair[f"{side}_input_ids"], pair[f"{side}_labels"]
            assert torch.equal(ids, sample["input_ids"]) and torch.equal(labels, sample["labels"])
            assert torch.equal(pair["pixel_values"], sample["pixel_values"])
            assert torch.equal(pair["image_sizes"], sample["image_sizes"])
            placeholders = int((ids == IMAGE_PLACEHOLDER_ID).sum())
            assert placeholders == sum(anyres.medium_tokens(k, s) for k, s in zip(kinds, sizes))
            scored = labels[labels != IGNORE_INDEX].tolist()
            answer = getattr(record, side)
            assert tokenizer.decode(scored).replace(" ", "") == (
                answer.replace(" ", "") + tokenizer.eos_token
            )
        assert (
            max(len(pair["chosen_input_ids"]), len(pair["rejected_input_ids"]))
            == (dataset.lengths[i])
        )
        start = pair["chosen_labels"].ne(IGNORE_INDEX).nonzero()[0, 0]
        assert torch.equal(pair["chosen_input_ids"][:start], pair["rejected_input_ids"][:start])
    two = dataset[3]["media_kinds"].tolist()
    assert two == ([WHOLE, WHOLE] if model.anyres.several_images_whole else [TILED, TILED])
    if not model.anyres.max_tiles:  # (anyres_max_1 shrinks 48x32 and 32x56 to one count)
        counts = {
            int((dataset[i]["chosen_input_ids"] == IMAGE_PLACEHOLDER_ID).sum()) for i in range(3)
        }
        assert len(counts) == 3  # three sizes, three counts


def test_too_long_pairs_are_dropped_and_bad_ones_named_or_skipped(
    assets, model, tokenizer, tmp_path
):
    folder = assets["image_folder"]
    full, _ = pair_data(model, tokenizer, assets["pairs"], folder)
    shortest = min(full.lengths)
    short, _ = pair_data(model, tokenizer, assets["pairs"], folder, max_length=shortest)
    assert len(short) == sum(n <= shortest for n in full.lengths) < 4
    assert short.summary.dropped_too_long == 4 - len(short)

    (tmp_path / "broken.png").write_bytes(b"not an image" * 10)
    good = pair_rows()[1]
    rows = [
        good,
        {**good, "id": "same", "rejected": good["chosen"]},
        {**good, "id": "gone", "image": "missing.png"},
        {**good, "id": "broken", "image": str(tmp_path / "broken.png")},
        {**good, "id": "video", "video": "clip.mp4"},
    ]
    path = write_rows(str(tmp_path / "bad.json"), rows)
    with pytest.raises(BadRecordError, match=r"record 1 \(id same\): .*identical"):
        pair_data(model, tokenizer, path, folder)
    skipped, _ = pair_data(model, tokenizer, path, folder, skip_bad_records=True)
    assert len(skipped) == 1 and skipped.summary.skipped_bad == 4
    reasons = " ".join(skipped.summary.reasons)
    for named in ("(id gone): image file", "(id broken): unreadable image", "(id video): a video"):
        assert named in reasons


def test_the_aspect_flag_must_be_the_models(assets, model, tokenizer):
    trained = model.config.image_aspect_ratio
    other = ONEVISION if trained == ANYRES else ANYRES
    check_aspect_of(model, trained)
    with pytest.raises(ValueError, match=f"the model was trained with {trained}"):
        check_aspect_of(model, other)
    with pytest.raises(ValueError, match=f"the model was trained with {trained}"):
        check_aspect_of(model, "pad")
    with pytest.raises(ValueError, match="pad and the model's anyres images disagree"):
        build_preference_data(
            tokenizer, None, 0, data_args(assets["pairs"], None, image_aspect_ratio="pad"),
            "v1", 2048, anyres=model.anyres,
        )  # fmt: skip


# -- the loss -------------------------------------------------------------------------------------
def test_log_probs_and_loss_equal_the_full_logits_of_the_plain_forward(assets, model, tokenizer):
    """Two pairs of images of other sizes and aspect ratios (one with two images): the summed
    log-probabilities from the supervised positions of the paired batch (the tower once per
    pair) equal those of stage 2's sample of each side through the model's own forward."""
    dataset, collator = pair_data(model, tokenizer, assets["pairs"], assets["image_folder"])
    chosen = stage_two_samples(model, tokenizer, dataset, "chosen")
    rejected = stage_two_samples(model, tokenizer, dataset, "rejected")
    picked = [1, 3]  # 48x32 alone; 48x32 beside 32x56
    pairs = [dataset[i] for i in picked]
    batch = collator(pairs)
    assert batch["input_ids"].shape[0] == 4
    assert batch["image_sizes"].shape == (3, 2) and batch["media_kinds"].shape == (3,)
    assert batch["pixel_values"].shape[0] == sum(p["pixel_values"].shape[0] for p in pairs)
    reference_model = copy.deepcopy(model)
    perturb(reference_model.language_model, 7)
    with torch.no_grad():
        policy = sequence_log_probs(model, batch)
        reference = sequence_log_probs(reference_model, batch)
    samples = [chosen[i] for i in picked] + [rejected[i] for i in picked]
    expected_policy = torch.stack([full_logits_log_prob(model, s) for s in samples])
    expected_reference = torch.stack([full_logits_log_prob(reference_model, s) for s in samples])
    torch.testing.assert_close(policy, expected_policy, atol=1e-5, rtol=0)
    torch.testing.assert_close(reference, expected_reference, atol=1e-5, rtol=0)

    beta = 0.5
    result = preference_loss(policy[:2], policy[2:], reference[:2], reference[2:], beta)
    h = (expected_policy[:2] - expected_policy[2:]) - (
        expected_reference[:2] - expected_reference[2:]
    )
    torch.testing.assert_close(result.losses, -F.logsigmoid(beta * h), atol=1e-5, rtol=0)
    assert (h.abs() > 1e-3).all()  # the reference differs: the loss is not log 2


def test_lora_at_step_zero_gives_log_2(assets, tokenizer, tmp_path):
    """LoRA at step 0 (lora_B = 0): the policy is its reference (adapters disabled); the
    adapters get a gradient, the frozen projector and its newline none."""
    model = anyres_model(assets, ANYRES)
    dataset, collator = pair_data(model, tokenizer, assets["pairs"], assets["image_folder"])
    trainer = lora_trainer(model, dataset, collator, tmp_path, beta=0.3)
    batch = collator([dataset[i] for i in range(4)])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    logs = trainer.preference_logs()
    assert logs["rewards/margins"] == 0 and logs["logps/chosen"] < 0
    loss.backward()
    lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)
    assert all(p.grad is None for p in trainer.model.base_model.model.projector.parameters())


# -- the entry ------------------------------------------------------------------------------------
def test_the_entry_runs_dpo_on_a_saved_anyres_model(assets, tmp_path):
    """A saved anyres model folder through train_dpo with --image_aspect_ratio anyres: three
    steps, the rewards logged, the model saved with its anyres settings."""
    folder = str(tmp_path / "stage_two")
    anyres_model(assets, ANYRES).save_pretrained(folder)
    load_tokenizer(assets["llm"]).save_pretrained(folder)
    output = tmp_path / "dpo"
    trainer = train_dpo(
        *parse_dpo_arguments(
            [
                "--model_name_or_path",
                folder,
                "--data_path",
                assets["pairs"],
                "--image_folder",
                assets["image_folder"],
                "--image_aspect_ratio",
                ANYRES,
                "--output_dir",
                str(output),
                "--per_device_train_batch_size",
                "2",
                "--max_steps",
                "3",
                "--learning_rate",
                "1e-3",
                "--logging_steps",
                "1",
                "--save_strategy",
                "no",
                "--report_to",
                "none",
                "--disable_tqdm",
                "True",
                "--use_cpu",
                "True",
            ]
        )  # fmt: skip
    )
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3 and all(math.isfinite(entry["loss"]) for entry in logs)
    assert all("rewards/margins" in entry and "logps/rejected" in entry for entry in logs)
    assert {"config.json", "model.safetensors", "run_complete.json"} <= set(os.listdir(output))
    saved = LlavaConfig.from_pretrained(output)
    assert saved.image_aspect_ratio == ANYRES and saved.mm_patch_merge_type == "spatial_unpad"
