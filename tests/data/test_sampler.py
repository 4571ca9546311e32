"""PromptSampler: seeded epoch permutations, fixed batch size across epochs, exact resume."""

from __future__ import annotations

import json

import pytest

from rlhf_ray.data import PromptSampler


def stream(sampler: PromptSampler, num_batches: int) -> list[int]:
    return [i for _ in range(num_batches) for i in sampler.next_batch()]


def test_same_seed_same_batches_other_seed_other_order():
    a, b, c = (
        PromptSampler(50, 8, seed=1),
        PromptSampler(50, 8, seed=1),
        PromptSampler(50, 8, seed=2),
    )
    assert stream(a, 10) == stream(b, 10)
    assert stream(PromptSampler(50, 8, seed=1), 10) != stream(c, 10)


def test_every_index_once_per_epoch_with_a_batch_crossing_the_boundary():
    sampler = PromptSampler(10, 4, seed=0)
    batches = [sampler.next_batch() for _ in range(5)]  # 20 indices = 2 epochs
    assert all(len(b) == 4 for b in batches)
    flat = [i for b in batches for i in b]
    assert sorted(flat[:10]) == list(range(10))
    assert sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]  # a fresh permutation each epoch
    # Batch 3 holds the last 2 of epoch 0 and the first 2 of epoch 1.
    assert batches[2] == flat[8:12]
    assert (sampler.epoch, sampler.cursor) == (2, 0)


def test_batch_larger_than_dataset_spans_epochs():
    sampler = PromptSampler(3, 7, seed=5)
    flat = stream(sampler, 3)
    for epoch in range(7):
        assert sorted(flat[3 * epoch : 3 * epoch + 3]) == [0, 1, 2]


def test_resume_from_state_dict_continues_identically():
    reference = PromptSampler(23, 5, seed=3)
    stream(reference, 7)
    state = json.loads(json.dumps(reference.state_dict()))  # survives a JSON checkpoint
    expected = stream(reference, 12)

    resumed = PromptSampler(23, 5, seed=3)
    resumed.load_state_dict(state)
    assert stream(resumed, 12) == expected


def test_resume_rejects_other_data_or_seed():
    state = PromptSampler(23, 5, seed=3).state_dict()
    with pytest.raises(ValueError, match="num_prompts=23"):
        PromptSampler(24, 5, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="seed=3"):
        PromptSampler(23, 5, seed=4).load_state_dict(state)


def test_invalid_sizes_raise():
    with pytest.raises(ValueError, match="batch_size"):
        PromptSampler(10, 0, seed=0)
    with pytest.raises(ValueError, match="num_prompts"):
        PromptSampler(0, 4, seed=0)


def test_iteration_yields_the_same_batches_as_next_batch():
    it = iter(PromptSampler(9, 4, seed=7))
    direct = PromptSampler(9, 4, seed=7)
    assert [next(it) for _ in range(5)] == [direct.next_batch() for _ in range(5)]
