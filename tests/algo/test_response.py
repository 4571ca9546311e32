import torch

from rlhf_ray.algo import apply_missing_eos_penalty, truncate_after_eos

EOS, PAD = 2, 0


def test_truncate_after_eos_middle_start_end_absent():
    response_ids = torch.tensor(
        [
            [5, 2, 7, 8],  # EOS in the middle
            [2, 5, 2, 6],  # EOS at the start (and again later)
            [5, 6, 7, 2],  # EOS at the end
            [5, 6, 7, 8],  # no EOS
        ]
    )
    ids, mask, has_eos = truncate_after_eos(response_ids, EOS, PAD)
    torch.testing.assert_close(
        ids, torch.tensor([[5, 2, 0, 0], [2, 0, 0, 0], [5, 6, 7, 2], [5, 6, 7, 8]])
    )
    torch.testing.assert_close(
        mask, torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]])
    )
    assert has_eos.tolist() == [True, True, True, False]


def test_missing_eos_penalty_is_subtracted_from_rows_without_eos_only():
    scores = torch.tensor([0.5, 1.5, -0.3, -2.0])
    has_eos = torch.tensor([True, False, True, False])
    torch.testing.assert_close(
        apply_missing_eos_penalty(scores, has_eos, 1.0), torch.tensor([0.5, 0.5, -0.3, -3.0])
    )
    assert apply_missing_eos_penalty(scores, has_eos, None) is scores
