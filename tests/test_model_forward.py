"""Golden tests of the forward pass: image scatter, supervised-only loss, gradients, generate."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llava.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID
from llava.model.builder import build_llava_model
from llava.model.llava import supervised_loss
from tests.fixtures.models import TINY_IMAGE_SIZE

P = IMAGE_PLACEHOLDER_ID


@pytest.fixture(scope="module")
def model(tiny_llama_path, tiny_clip_path):
    torch.manual_seed(0)
    return build_llava_model(tiny_llama_path, tiny_clip_path).eval()


def pixels(count: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=generator)


def mixed_batch(num: int) -> dict[str, torch.Tensor]:
    """Row 0: two images; row 1: text only; row 2: one image. Right padding with id 0."""
    rows = [
        [1, 5] + [P] * num + [6] + [P] * num + [7, 8, 9],
        [1, 30, 31, 32, 33, 34, 35],
        [1] + [P] * num + [40, 41],
    ]
    width = max(map(len, rows))
    input_ids = torch.tensor([row + [0] * (width - len(row)) for row in rows])
    attention_mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[0, 2 * num + 3 : 2 * num + 6] = torch.tensor([7, 8, 9])
    labels[1, 4:7] = torch.tensor([33, 34, 35])
    labels[2, num + 1 : num + 3] = torch.tensor([40, 41])
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "pixel_values": pixels(3),
    }


def test_image_features_land_on_their_placeholders_in_order(model):
    batch = mixed_batch(model.num_image_tokens)
    num = model.num_image_tokens
    with torch.no_grad():
        embeds = model.embed_inputs(batch["input_ids"], batch["pixel_values"])
        features = model.encode_images(batch["pixel_values"])  # (3, num, D)
        token_embeds = model.get_input_embeddings()(batch["input_ids"].clamp(min=0))
    assert torch.equal(embeds[0, 2 : 2 + num], features[0])
    assert torch.equal(embeds[0, 3 + num : 3 + 2 * num], features[1])
    assert torch.equal(embeds[2, 1 : 1 + num], features[2])
    text = batch["input_ids"] != P
    assert torch.equal(embeds[text], token_embeds[text])


def test_mismatched_image_count_names_both_counts(model):
    num = model.num_image_tokens
    input_ids = torch.tensor([[1] + [P] * num + [2]])
    with pytest.raises(ValueError, match=rf"tokens: {num}, features: {2 * num}"):
        model.embed_inputs(input_ids, pixels(2))
    with pytest.raises(ValueError, match=rf"{num} image placeholder tokens but no pixel_values"):
        model.embed_inputs(input_ids, None)


def reference_loss(model, batch) -> torch.Tensor:
    """Full-logits causal LM cross-entropy, as transformers computes it."""
    embeds = model.embed_inputs(batch["input_ids"], batch["pixel_values"])
    logits = model.language_model(
        inputs_embeds=embeds, attention_mask=batch["attention_mask"]
    ).logits
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        batch["labels"][:, 1:].flatten(),
        ignore_index=IGNORE_INDEX,
    )


def test_loss_equals_full_logits_cross_entropy(model):
    batch = mixed_batch(model.num_image_tokens)
    with torch.no_grad():
        ours = model(**batch).loss
        reference = reference_loss(model, batch)
    assert ours.item() == pytest.approx(reference.item(), rel=1e-5)
    assert model(**batch).logits is None  # no logits were materialised


def test_chunked_loss_and_gradients_equal_one_chunk():
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    head = torch.nn.Linear(16, 40, bias=False)
    labels = torch.randint(0, 40, (2, 9))
    labels[0, :3] = IGNORE_INDEX
    one = supervised_loss(hidden, labels, head, chunk_size=1024)
    grads_one = torch.autograd.grad(one, [hidden, head.weight])
    chunked = supervised_loss(hidden, labels, head, chunk_size=3)  # checkpointed chunks
    grads_chunked = torch.autograd.grad(chunked, [hidden, head.weight])
    assert chunked.item() == pytest.approx(one.item(), rel=1e-6)
    for a, b in zip(grads_one, grads_chunked):
        assert torch.allclose(a, b, atol=1e-6)


def test_loss_is_normalised_by_the_accumulated_token_count(model):
    """Two micro-batches summed with num_items_in_batch equal one batch holding both."""
    batch = mixed_batch(model.num_image_tokens)
    total = int((batch["labels"] != IGNORE_INDEX).sum())
    with torch.no_grad():
        whole = model(**batch).loss
        parts = [
            model(
                input_ids=batch["input_ids"][rows],
                attention_mask=batch["attention_mask"][rows],
                labels=batch["labels"][rows],
                pixel_values=batch["pixel_values"][images],
                num_items_in_batch=total,
            ).loss
            for rows, images in ((slice(0, 2), slice(0, 2)), (slice(2, 3), slice(2, 3)))
        ]
    assert sum(parts).item() == pytest.approx(whole.item(), rel=1e-5)


def test_no_supervised_token_gives_zero_loss_with_a_graph():
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    labels = torch.full((1, 4), IGNORE_INDEX)
    loss = supervised_loss(hidden, labels, torch.nn.Linear(8, 10))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(hidden.grad) == 0


def test_gradients_reach_only_trainable_parts(tiny_llama_path, tiny_clip_path):
    model = build_llava_model(tiny_llama_path, tiny_clip_path).train()
    model.language_model.requires_grad_(False)  # stage 1: only the projector learns
    batch = mixed_batch(model.num_image_tokens)
    model(**batch).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projector.parameters())
    frozen = [*model.vision_tower.parameters(), *model.language_model.parameters()]
    assert all(p.grad is None for p in frozen)


def test_text_only_batch_runs_the_whole_image_path(tiny_llama_path, tiny_clip_path):
    """ZeRO-3 gathers the tower's weights collectively: a text-only rank must run it too."""
    model = build_llava_model(tiny_llama_path, tiny_clip_path).train()
    tower_calls = []
    model.vision_tower.register_forward_hook(lambda *_: tower_calls.append(1))
    input_ids = torch.tensor([[1, 30, 31, 32]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 31, 32]])
    loss = model(input_ids=input_ids, labels=labels).loss
    loss.backward()
    assert tower_calls == [1]
    assert all(p.grad is not None for p in model.projector.parameters())
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.projector.parameters())
    with torch.no_grad():  # the blank image changes nothing: same loss as the plain LM's
        logits = model.language_model(input_ids=input_ids).logits
        reference = torch.nn.functional.cross_entropy(logits[0, 1:3], labels[0, 2:])
    assert torch.allclose(loss, reference, atol=1e-6)


def test_without_labels_the_model_returns_logits(model):
    batch = mixed_batch(model.num_image_tokens)
    with torch.no_grad():
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
        )
    assert out.loss is None
    assert out.logits.shape == (*batch["input_ids"].shape, model.config.vocab_size)


def prompt(model) -> dict[str, torch.Tensor]:
    num = model.num_image_tokens
    return {"input_ids": torch.tensor([[1, 5] + [P] * num + [6, 7]]), "pixel_values": pixels(1)}


def test_generate_with_and_without_cache_agree(model):
    inputs = prompt(model)
    cached = model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=True)
    uncached = model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=False)
    assert cached.shape == (1, 8)
    assert torch.equal(cached, uncached)


def test_greedy_generate_follows_the_argmax_of_forward(model):
    inputs = prompt(model)
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    ids = inputs["input_ids"]
    with torch.no_grad():
        for step in range(3):
            logits = model(input_ids=ids, pixel_values=inputs["pixel_values"]).logits
            next_id = logits[0, -1].argmax()
            assert next_id == generated[0, step]
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)


def test_sampling_is_seeded(model):
    inputs = prompt(model)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(model.generate(**inputs, max_new_tokens=6, do_sample=True, temperature=1.0))
    assert torch.equal(*runs)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_llama_path, tiny_clip_path):
    model = build_llava_model(tiny_llama_path, tiny_clip_path).train()
    model.language_model.requires_grad_(True)
    batch = mixed_batch(model.num_image_tokens)

    def loss_and_grads():
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        return loss.detach(), grads

    plain_loss, plain_grads = loss_and_grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.language_model.model.gradient_checkpointing
    loss, grads = loss_and_grads()
    assert torch.allclose(loss, plain_loss, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, plain_grads))


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("train_head", [True, False])
def test_fused_head_loss_and_gradients_equal_full_logits(softcap, train_head):
    """The in-forward gradients of LinearCrossEntropy equal autograd through full logits."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 40, bias=True).requires_grad_(train_head)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    labels = torch.randint(0, 40, (2, 9))
    labels[0, :3] = IGNORE_INDEX
    ours = supervised_loss(hidden, labels, head, softcap=softcap, chunk_size=4)
    wanted = [hidden, *head.parameters()] if train_head else [hidden]
    grads = torch.autograd.grad(3 * ours, wanted)  # a scaled upstream gradient too
    logits = head(hidden[:, :-1]).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    reference = F.cross_entropy(
        logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )
    reference_grads = torch.autograd.grad(3 * reference, wanted)
    assert ours.item() == pytest.approx(reference.item(), rel=1e-6)
    for a, b in zip(grads, reference_grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_training_loss_and_gradients_equal_full_logits(model):
    """Through the whole model, gradients included: supervised-only equals full logits."""
    batch = mixed_batch(model.num_image_tokens)
    parameters = [p for p in model.language_model.parameters()]
    flags = [p.requires_grad for p in parameters]
    for p in parameters:
        p.requires_grad_(True)
    try:
        ours = torch.autograd.grad(model(**batch).loss, parameters)
        reference = torch.autograd.grad(reference_loss(model, batch), parameters)
    finally:
        for p, flag in zip(parameters, flags):
            p.requires_grad_(flag)
    for a, b in zip(ours, reference):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
