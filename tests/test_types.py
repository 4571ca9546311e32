"""Batch containers: selecting rows (to shard a round over workers and minibatches) and
concatenating the shards back."""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.types import PPOBatch, PromptBatch, Rollout

B, P, R = 5, 3, 4


def make_rollout(offset: int = 0, rows: int = B) -> Rollout:
    n = torch.arange(rows) + offset
    return Rollout(
        prompt_ids=n[:, None] * 10 + torch.arange(P),
        prompt_mask=torch.ones(rows, P, dtype=torch.long),
        prompt_index=n,
        response_ids=n[:, None] * 100 + torch.arange(R),
        response_mask=(torch.arange(R) <= (n[:, None] % R)).long(),
        has_eos=n % 2 == 0,
        sampler_logprobs=-(n[:, None] + torch.arange(R)).float(),
        weight_version=torch.full((rows,), 7),
        prompts=[f"p{i}" for i in n.tolist()],
        responses=[f"r{i}" for i in n.tolist()],
        worker_id=n % 2,
    )


def assert_same(a: Rollout, b: Rollout) -> None:
    for name, value in vars(a).items():
        other = getattr(b, name)
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(value, other, rtol=0, atol=0)
        else:
            assert value == other, name


@pytest.mark.parametrize(
    "index, rows",
    [
        (slice(1, 4), [1, 2, 3]),
        (slice(None, None, 2), [0, 2, 4]),
        (torch.tensor([4, 0, 2]), [4, 0, 2]),
        ([3, 1], [3, 1]),
        ([2, 2], [2, 2]),
        ([], []),
    ],
    ids=["slice", "strided", "tensor", "list", "repeat", "empty"],
)
def test_select_takes_the_same_rows_of_every_field(index, rows):
    rollout = make_rollout()
    part = rollout.select(index)
    assert isinstance(part, Rollout)
    assert len(part) == len(rows)
    assert part.prompt_index.tolist() == rows
    assert part.prompts == [f"p{i}" for i in rows]
    assert part.responses == [f"r{i}" for i in rows]
    assert part.response_ids[:, 0].tolist() == [100 * i for i in rows]
    assert part.has_eos.tolist() == [i % 2 == 0 for i in rows]
    assert part.sampler_logprobs.shape == (len(rows), R)
    assert len(rollout) == B  # the original is untouched


def test_select_with_a_bool_mask_keeps_the_masked_rows_or_refuses():
    rollout = make_rollout()
    part = rollout.select(rollout.has_eos)
    assert part.prompt_index.tolist() == [0, 2, 4]


def test_concat_of_selected_shards_round_trips():
    rollout = make_rollout()
    shards = [rollout.select(slice(0, 2)), rollout.select(slice(2, 3)), rollout.select([3, 4])]
    assert_same(Rollout.concat(shards), rollout)


def test_concat_in_another_order_follows_the_parts():
    rollout = make_rollout()
    back = Rollout.concat([rollout.select([3, 4]), rollout.select(slice(0, 3))])
    assert back.prompt_index.tolist() == [3, 4, 0, 1, 2]
    assert back.prompts == ["p3", "p4", "p0", "p1", "p2"]


def test_concat_of_separate_rollouts():
    both = Rollout.concat([make_rollout(0, 2), make_rollout(2, 3)])
    assert_same(both, make_rollout(0, 5))


def test_input_ids_and_attention_mask_join_prompt_and_response():
    rollout = make_rollout()
    assert rollout.prompt_len == P
    assert rollout.input_ids.shape == (B, P + R)
    torch.testing.assert_close(rollout.input_ids[:, :P], rollout.prompt_ids)
    torch.testing.assert_close(rollout.input_ids[:, P:], rollout.response_ids)
    torch.testing.assert_close(rollout.attention_mask[:, :P], rollout.prompt_mask)
    torch.testing.assert_close(rollout.attention_mask[:, P:], rollout.response_mask)
    part = rollout.select([1])
    torch.testing.assert_close(part.input_ids, rollout.input_ids[1:2])


def test_prompt_batch_select():
    batch = PromptBatch(
        prompt_ids=torch.arange(6).view(3, 2),
        prompt_mask=torch.ones(3, 2),
        prompt_index=torch.tensor([7, 8, 9]),
        prompts=["a", "b", "c"],
    )
    part = batch.select([2, 0])
    assert part.prompts == ["c", "a"]
    assert part.prompt_index.tolist() == [9, 7]
    assert part.prompt_ids.tolist() == [[4, 5], [0, 1]]


def _ppo_batch(rows: int, prompt_len: int) -> PPOBatch:
    t = torch.zeros(rows, 4)
    return PPOBatch(
        input_ids=torch.zeros(rows, 9, dtype=torch.long),
        attention_mask=torch.ones(rows, 9, dtype=torch.long),
        response_mask=t,
        old_logprobs=t,
        old_values=t,
        advantages=t,
        returns=t,
        ref_logprobs=t,
        prompt_len=prompt_len,
    )


def test_ppo_batch_keeps_scalar_fields_through_select_and_concat():
    batch = _ppo_batch(4, prompt_len=3)
    part = batch.select(slice(1, 3))
    assert part.prompt_len == 3 and len(part) == 2
    assert len(PPOBatch.concat([part, batch.select([0])])) == 3


def test_concat_refuses_batches_with_different_prompt_lengths():
    with pytest.raises(ValueError, match="prompt_len"):
        PPOBatch.concat([_ppo_batch(2, prompt_len=3), _ppo_batch(2, prompt_len=5)])


def _prompts(**kw) -> PromptBatch:
    return PromptBatch(
        prompt_ids=torch.zeros(3, 2, dtype=torch.long),
        prompt_mask=torch.ones(3, 2, dtype=torch.long),
        prompt_index=torch.tensor([7, 3, 7]),
        prompts=["a", "b", "c"],
        **kw,
    )


def test_per_row_fields_left_empty_get_their_defaults():
    batch = _prompts()
    assert batch.sample_index.tolist() == [0, 0, 1] and batch.columns == [{}, {}, {}]
    given = _prompts(columns=[{"x": 1}, {"x": 2}, {"x": 3}], sample_index=torch.tensor([5, 6, 7]))
    assert given.columns[2] == {"x": 3} and given.sample_index.tolist() == [5, 6, 7]


@pytest.mark.parametrize(
    ("kw", "says"),
    [
        ({"columns": [{"x": 1}, {"x": 2}]}, "PromptBatch: columns has 2 entries for 3 rows"),
        ({"sample_index": torch.tensor([0, 1])}, "PromptBatch: sample_index has 2 entries for 3"),
    ],
)
def test_per_row_fields_of_the_wrong_length_raise_naming_both_lengths(kw, says):
    with pytest.raises(ValueError, match=says):
        _prompts(**kw)


def test_a_rollout_with_misaligned_columns_raises():
    n = 2
    with pytest.raises(ValueError, match="Rollout: columns has 3 entries for 2 rows"):
        Rollout(
            prompt_ids=torch.zeros(n, 2, dtype=torch.long),
            prompt_mask=torch.ones(n, 2, dtype=torch.long),
            prompt_index=torch.arange(n),
            response_ids=torch.zeros(n, 3, dtype=torch.long),
            response_mask=torch.ones(n, 3, dtype=torch.long),
            has_eos=torch.zeros(n, dtype=torch.bool),
            sampler_logprobs=torch.zeros(n, 3),
            weight_version=torch.zeros(n, dtype=torch.long),
            prompts=["p"] * n,
            responses=["r"] * n,
            columns=[{}, {}, {}],
        )
