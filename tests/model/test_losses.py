"""model/losses.py against values worked out by hand on tiny tensors, and their gradients
(closed forms, finite differences, and a descent step that lowers the loss)."""

from __future__ import annotations

import math

import pytest
import torch

from model.losses import contrastive, lambda_pairwise


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# ---- contrastive: cross-entropy of q[b] picking pos[b] among pos (in-batch) + neg ----


def test_contrastive_in_batch_two_orthogonal_pairs():
    # logits = q @ pos.T = I; each row: -log(e^1 / (e^1 + e^0)) = log(1 + e^-1)
    assert contrastive(t([1, 0], [0, 1]), t([1, 0], [0, 1]), temperature=1.0).item() == pytest.approx(
        0.31326168751822286, abs=1e-12
    )


def test_contrastive_extra_negatives_join_the_softmax():
    # a zero negative adds a logit 0 to each row: log((e + 2) / e) = log(1 + 2/e)
    q = pos = t([1, 0], [0, 1])
    assert contrastive(q, pos, t([0, 0]), temperature=1.0).item() == pytest.approx(0.5514447139320511, abs=1e-12)
    # no negatives given and an empty (0, d) tensor of them are the same in-batch loss
    empty = torch.zeros(0, 2, dtype=torch.float64)
    assert contrastive(q, pos, empty, 1.0).item() == pytest.approx(0.31326168751822286, abs=1e-12)


def test_contrastive_temperature_divides_the_logits():
    # logits I / 0.5 = 2 I: log(1 + e^-2)
    q = pos = t([1, 0], [0, 1])
    assert contrastive(q, pos, temperature=0.5).item() == pytest.approx(0.1269280110429726, abs=1e-12)


def test_contrastive_asymmetric_case_and_which_item_is_the_target():
    # q = (1, 2); pos = (3, -1) -> 1; negatives (0, 1) -> 2 and (2, 2) -> 6
    # loss = -1 + log(e^1 + e^2 + e^6)
    q, pos, neg = t([1, 2]), t([3, -1]), t([0, 1], [2, 2])
    assert contrastive(q, pos, neg, 1.0).item() == pytest.approx(5.024744890138822, abs=1e-12)
    # the positive is the target, not any item: making (2, 2) the positive gives -6 + log(same sum)
    assert contrastive(q, t([2, 2]), t([0, 1], [3, -1]), 1.0).item() == pytest.approx(5.024744890138822 - 5, abs=1e-12)


def test_contrastive_gradient_is_softmax_weighted_items_minus_positive():
    # d loss / d q = sum_j p_j items_j - pos (temperature 1, one query), p = softmax(1, 2, 6)
    q = t([1, 2]).requires_grad_()
    contrastive(q, t([3, -1]), t([0, 1], [2, 2]), 1.0).backward()
    p = [0.0065732631853090825, 0.017867981870304504, 0.9755587549443864]
    expected = [p[0] * 3 + p[1] * 0 + p[2] * 2 - 3, p[0] * -1 + p[1] * 1 + p[2] * 2 + 1]
    assert expected == pytest.approx([-1.0291627005553, 2.9624122285737684], abs=1e-12)
    torch.testing.assert_close(q.grad, t(expected), rtol=0, atol=1e-12)


def test_contrastive_gradcheck_and_descent():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    neg = torch.randn(2, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: contrastive(a, b, c, 0.3), (q, pos, neg))
    loss = contrastive(q, pos, neg, 0.3)
    loss.backward()
    with torch.no_grad():
        after = contrastive(q - 1e-3 * q.grad, pos - 1e-3 * pos.grad, neg - 1e-3 * neg.grad, 0.3)
    assert after < loss
    assert (neg.grad.norm(dim=1) > 0).all()  # the extra negatives are pushed away, not ignored


# ---- lambda_pairwise: sum over a query's negatives of |1/r_neg - 1/r_pos| softplus(s_neg - s_pos), mean over queries


def test_lambda_pairwise_one_query():
    # weights |1/1 - 1/2| = 0.5 and |1/4 - 1/2| = 0.25;
    # 0.5 log(1 + e^(1-2)) + 0.25 log(1 + e^(3-2)) = 0.15663084 + 0.32831542
    loss = lambda_pairwise(t(2), t([1, 3]), torch.tensor([2]), torch.tensor([[1, 4]]))
    assert loss.item() == pytest.approx(0.48494626563866716, abs=1e-12)
    # a sum over the query's pairs, not their mean (which would be 0.24247)
    assert loss.item() != pytest.approx(0.48494626563866716 / 2)


def test_lambda_pairwise_is_a_mean_over_queries():
    # second query: s equal (softplus(0) = log 2), ranks 1 vs 2 and 3: (0.5 + 2/3) log 2 = 7/6 log 2
    second = 7 / 6 * math.log(2)
    assert second == pytest.approx(0.8086717106532696, abs=1e-12)
    loss = lambda_pairwise(t(2, 0), t([1, 3], [0, 0]), torch.tensor([2, 1]), torch.tensor([[1, 4], [2, 3]]))
    # (the weights are float32 whatever the scores' dtype, via rank.float(): 1/3 is good to ~1e-8)
    assert loss.item() == pytest.approx((0.48494626563866716 + second) / 2, abs=1e-7)


def test_lambda_pairwise_equal_ranks_weigh_nothing():
    # |1/3 - 1/3| = 0: however badly the pair is ordered, it adds no loss and no gradient
    s_pos, s_neg = t(-5).requires_grad_(), t([9]).requires_grad_()
    loss = lambda_pairwise(s_pos, s_neg, torch.tensor([3]), torch.tensor([[3]]))
    loss.backward()
    assert loss.item() == 0.0 and s_pos.grad.item() == 0.0 and s_neg.grad.item() == 0.0


def test_lambda_pairwise_missed_positive_rank():
    # a positive outside the retrieved pool gets rank pool + 1 (51 for pool 50): weight |1/1 - 1/51| = 50/51
    loss = lambda_pairwise(t(0), t([0]), torch.tensor([51]), torch.tensor([[1]]))
    assert loss.item() == pytest.approx(50 / 51 * math.log(2), abs=1e-7)


def test_lambda_pairwise_gradient_closed_form():
    # d/ds_neg_j = w_j sigmoid(s_neg_j - s_pos) / B, d/ds_pos = -sum_j of those (B = 1)
    s_pos, s_neg = t(2).requires_grad_(), t([1, 3]).requires_grad_()
    lambda_pairwise(s_pos, s_neg, torch.tensor([2]), torch.tensor([[1, 4]])).backward()
    torch.testing.assert_close(s_neg.grad, t([0.13447071068499755, 0.18276464465750122]), rtol=0, atol=1e-12)
    assert s_pos.grad.item() == pytest.approx(-0.3172353553424988, abs=1e-12)  # raising the positive helps


def test_lambda_pairwise_gradcheck():
    gen = torch.Generator().manual_seed(1)
    s_pos = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    s_neg = torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    pos_rank, neg_rank = torch.tensor([1, 7, 51]), torch.tensor([[2, 3, 4, 5], [1, 2, 3, 4], [1, 2, 5, 9]])
    assert torch.autograd.gradcheck(lambda a, b: lambda_pairwise(a, b, pos_rank, neg_rank), (s_pos, s_neg))
