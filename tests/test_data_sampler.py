"""The grouped sampler: one modality per global batch, similar lengths, each index once, seeded."""

from types import SimpleNamespace

import numpy as np
import pytest

from llava.data.sampler import ModalityLengthGroupedSampler, build_train_sampler


def make_data(num_image: int, num_text: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    lengths = list(rng.integers(600, 1200, num_image)) + list(rng.integers(20, 800, num_text))
    modalities = ["image"] * num_image + ["text"] * num_text
    order = rng.permutation(len(lengths))  # interleave the modalities in the dataset
    return [int(lengths[k]) for k in order], [modalities[k] for k in order]


def global_batches(order: list[int], size: int) -> list[list[int]]:
    return [order[start : start + size] for start in range(0, len(order), size)]


def sampler_for(lengths, modalities, batch=4, world=2, accumulation=2, seed=0, **kwargs):
    return ModalityLengthGroupedSampler(
        lengths, batch, world, accumulation, modalities=modalities, seed=seed, **kwargs
    )


def test_every_global_batch_is_one_modality_and_every_index_comes_once():
    lengths, modalities = make_data(16 * 20, 16 * 7)  # multiples of the global batch (16)
    order = list(sampler_for(lengths, modalities))
    assert sorted(order) == list(range(len(lengths)))
    for batch in global_batches(order, 16):
        assert len({modalities[i] for i in batch}) == 1


def test_remainders_mix_in_one_final_global_batch_at_most():
    lengths, modalities = make_data(16 * 20 + 5, 16 * 7 + 9)
    order = list(sampler_for(lengths, modalities))
    assert sorted(order) == list(range(len(lengths)))
    batches = global_batches(order, 16)
    mixed = [k for k, batch in enumerate(batches) if len({modalities[i] for i in batch}) > 1]
    assert len(mixed) <= 1 and all(k >= len(batches) - 2 for k in mixed)
    assert all(len({modalities[i] for i in batch}) == 1 for batch in batches[:-2])


@pytest.mark.parametrize("modality", ["image", "text"])
def test_single_modality_data_works(modality):
    lengths = list(range(1, 38))
    sampler = sampler_for(lengths, [modality] * len(lengths))
    assert sorted(sampler) == list(range(len(lengths)))
    signed = [n if modality == "image" else -n for n in lengths]
    assert sorted(ModalityLengthGroupedSampler(signed, 4, 2, 2)) == list(range(len(lengths)))


def padding_waste(order: list[int], lengths: list[int], batch: int) -> int:
    waste = 0
    for start in range(0, len(order), batch):
        chunk = [lengths[i] for i in order[start : start + batch]]
        waste += max(chunk) * len(chunk) - sum(chunk)
    return waste


def test_per_device_batches_have_similar_lengths():
    lengths, modalities = make_data(16 * 40, 16 * 40, seed=1)
    order = list(sampler_for(lengths, modalities))
    random_order = list(np.random.default_rng(0).permutation(len(lengths)))
    assert padding_waste(order, lengths, 4) < padding_waste(random_order, lengths, 4) / 5
    for batch in global_batches(order, 16):  # sorted inside a global batch, longest first
        assert [lengths[i] for i in batch] == sorted((lengths[i] for i in batch), reverse=True)


def test_longest_sample_comes_in_the_first_global_batch():
    lengths, modalities = make_data(16 * 10, 16 * 10, seed=2)
    order = list(sampler_for(lengths, modalities))
    assert max(lengths) in [lengths[i] for i in order[:16]]


def test_seeded_and_deterministic_per_epoch():
    lengths, modalities = make_data(100, 60)
    first, again = sampler_for(lengths, modalities), sampler_for(lengths, modalities)
    assert list(first) == list(again)
    other_seed = sampler_for(lengths, modalities, seed=1)
    assert list(other_seed) != list(first)
    epoch_0 = list(first)
    first.set_epoch(1)
    assert list(first) != epoch_0 and sorted(first) == sorted(epoch_0)
    again.set_epoch(1)
    assert list(first) == list(again)


def test_resume_from_a_saved_position():
    lengths, modalities = make_data(100, 60)
    sampler = sampler_for(lengths, modalities)
    sampler.set_epoch(3)
    full = list(sampler)
    resumed = sampler_for(lengths, modalities)
    resumed.load_state_dict({"seed": 0, "epoch": 3, "start_index": 48})
    resumed.set_epoch(3)  # the trainer sets the same epoch again: the position stays
    assert list(resumed) == full[48:] and len(resumed) == len(full) - 48
    resumed.set_epoch(4)  # the next epoch starts from its beginning
    assert len(list(resumed)) == len(full)


def test_group_by_length_ignores_modality():
    lengths, modalities = make_data(30, 30)
    sampler = sampler_for(lengths, modalities, group_by_modality=False)
    order = list(sampler)
    assert sorted(order) == list(range(60))
    assert any(len({modalities[i] for i in batch}) > 1 for batch in global_batches(order, 16))


def test_build_train_sampler_follows_the_flags():
    dataset = SimpleNamespace(lengths=[5, 6, 7, 8], modalities=["image", "text", "image", "text"])
    assert build_train_sampler(dataset, 2) is None
    sampler = build_train_sampler(dataset, 1, 1, 2, group_by_modality_length=True, seed=3)
    assert sampler.global_batch_size == 2 and sampler.seed == 3
    for batch in global_batches(list(sampler), 2):
        assert len({dataset.modalities[i] for i in batch}) == 1
    plain = build_train_sampler(dataset, 2, group_by_length=True)
    assert set(plain.modalities) == {"all"}
