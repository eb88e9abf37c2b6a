"""Packed batches (rows or one flattened row) train exactly like padded ones: loss and gradients."""

from __future__ import annotations

import pytest
import torch

from llava.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID
from llava.data.collator import SupervisedCollator
from llava.data.packing import (
    SAMPLE_LENGTHS,
    PackingCollator,
    pack_rows,
    without_sample_lengths,
)
from llava.model.builder import build_llava_model
from llava.model.llava import PACKED_SDPA, register_packed_attention
from llava.train.evaluation import summed_loss
from tests.fixtures.models import TINY_IMAGE_SIZE

P = IMAGE_PLACEHOLDER_ID


def sample(ids: list[int], supervised_from: int, images: int = 0, seed: int = 0) -> dict:
    labels = [IGNORE_INDEX] * supervised_from + ids[supervised_from:]
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(images, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=generator)
    return {
        "input_ids": torch.tensor(ids),
        "labels": torch.tensor([IGNORE_INDEX if i == P else t for i, t in zip(ids, labels)]),
        "pixel_values": pixels if images else None,
    }


def mixed_samples(num: int) -> list[dict]:
    """Different lengths, 0-2 images each, supervision starting at different places."""
    return [
        sample([1, 5] + [P] * num + [6, 7, 8, 9, 10], num + 3, images=1, seed=1),
        sample([1, 30, 31, 32, 33, 34, 35], 3),
        sample([1] + [P] * num + [40] + [P] * num + [41, 42], 2 * num + 2, images=2, seed=2),
        sample([1, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61], 5),
        sample([1] + [P] * num + [70, 71], num + 1, images=1, seed=3),
    ]


@pytest.fixture(scope="module")
def model(tiny_llama_path, tiny_clip_path):
    register_packed_attention()
    torch.manual_seed(0)
    model = build_llava_model(tiny_llama_path, tiny_clip_path)
    model.language_model.requires_grad_(True)
    return model.train()


def loss_and_grads(model, batch, attention: str = "sdpa"):
    model.language_model.config._attn_implementation = attention
    model.zero_grad()
    loss = model(**without_sample_lengths(batch)).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.language_model.config._attn_implementation = "sdpa"
    return loss.detach(), grads


@pytest.mark.parametrize(
    "layout",
    [
        ("rows", dict(), "sdpa"),
        ("rows of 40", dict(max_row_length=40), "sdpa"),
        ("flat", dict(flatten=True), PACKED_SDPA),
        ("flat, padded to 16", dict(flatten=True, pad_to_multiple_of=16), PACKED_SDPA),
        ("flat, sdpa block mask", dict(flatten=True), "sdpa"),
    ],
    ids=lambda layout: layout[0],
)
def test_packed_and_padded_batches_give_the_same_loss_and_gradients(model, layout):
    _, options, attention = layout
    samples = mixed_samples(model.num_image_tokens)
    padded_loss, padded_grads = loss_and_grads(model, SupervisedCollator(pad_token_id=0)(samples))
    packed = PackingCollator(pad_token_id=0, **options)(samples)
    packed_loss, packed_grads = loss_and_grads(model, packed, attention)
    assert packed_loss.item() == pytest.approx(padded_loss.item(), rel=1e-5)
    assert packed_grads.keys() == padded_grads.keys()
    for name, grad in padded_grads.items():
        assert torch.allclose(packed_grads[name], grad, atol=1e-5, rtol=1e-4), name


def test_packed_batch_layout():
    samples = mixed_samples(4)
    batch = PackingCollator(pad_token_id=0)(samples)
    lengths = [len(s["input_ids"]) for s in samples]  # 11, 7, 12, 13, 7
    assert batch["input_ids"].shape[1] == max(lengths)
    assert "attention_mask" not in batch
    assert sorted(batch[SAMPLE_LENGTHS].tolist()) == sorted(lengths)
    starts = (batch["position_ids"] == 0).sum().item()
    assert starts == len(samples)  # padding continues a sample, never starts one
    # every sample's first label is ignored: nothing before it in the row predicts it
    assert (batch["labels"][batch["position_ids"] == 0] == IGNORE_INDEX).all()
    # images follow the order in which placeholder runs appear, row by row
    supervised = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    padded = SupervisedCollator(pad_token_id=0)(samples)
    assert supervised == (padded["labels"][:, 1:] != IGNORE_INDEX).sum()
    assert batch["pixel_values"].shape[0] == 4


def test_flat_batch_has_sequence_boundaries():
    samples = mixed_samples(4)
    batch = PackingCollator(pad_token_id=0, flatten=True)(samples)
    lengths = [len(s["input_ids"]) for s in samples]
    assert batch["input_ids"].shape == (1, sum(lengths))
    assert batch["cu_seq_lens_q"].tolist() == [0, 11, 18, 30, 43, 50]
    assert batch["max_length_q"] == max(lengths)
    assert torch.equal(batch["pixel_values"], torch.cat([s["pixel_values"] for s in samples
                                                         if s["pixel_values"] is not None]))  # fmt: skip


def test_pack_rows_first_fit_decreasing():
    assert pack_rows([5, 3, 4, 2, 1], 6) == [[0, 4], [2, 3], [1]]
    rows = pack_rows([7, 1, 1, 7, 2], 8)
    assert sorted(i for row in rows for i in row) == [0, 1, 2, 3, 4]
    assert all(sum([7, 1, 1, 7, 2][i] for i in row) <= 8 for row in rows)
    with pytest.raises(ValueError, match="does not fit"):
        pack_rows([9], 8)


def test_evaluation_loss_is_the_same_packed(model):
    samples = mixed_samples(model.num_image_tokens)
    model.eval()
    try:
        padded = summed_loss(model, [SupervisedCollator(pad_token_id=0)(samples)])
        packed = summed_loss(model, [without_sample_lengths(PackingCollator(0)(samples))])
    finally:
        model.train()
    assert packed[1] == padded[1]
    assert packed[0].item() == pytest.approx(padded[0].item(), rel=1e-5)
