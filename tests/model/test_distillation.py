"""Distillation losses and candidates against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from model.distillation import LOSSES, batch_candidates, distill_loss, listnet, margin_mse, teacher_top

LN2, LN3 = math.log(2), math.log(3)


def test_listnet_hand_computed_2x3():
    # row 1: p = softmax(ln2, 0, 0) = (1/2, 1/4, 1/4), student uniform: cross-entropy = ln 3
    # row 2: p uniform, log softmax(ln2, 0, 0) = (-ln2, -2 ln2, -2 ln2): cross-entropy = 5/3 ln 2
    teacher = torch.tensor([[LN2, 0.0, 0.0], [0.0, 0.0, 0.0]])
    student = torch.tensor([[0.0, 0.0, 0.0], [LN2, 0.0, 0.0]])
    expected = (LN3 + 5 / 3 * LN2) / 2
    assert listnet(teacher, student, 1.0).item() == pytest.approx(expected, rel=1e-6)
    # the temperature divides both: halved scores at T = 0.5 give the same loss
    assert listnet(teacher / 2, student / 2, 0.5).item() == pytest.approx(expected, rel=1e-6)
    assert distill_loss("listnet", teacher, student, 1.0).item() == pytest.approx(expected, rel=1e-6)


def test_listnet_is_minimised_when_the_student_equals_the_teacher():
    torch.manual_seed(0)
    teacher = torch.randn(4, 7)
    student = teacher.clone().requires_grad_(True)
    loss = listnet(teacher, student, 0.1)
    loss.backward()
    assert student.grad.abs().max().item() < 1e-6
    # its value is then the teacher's entropy, and any change of the student raises it
    p = torch.softmax(teacher / 0.1, -1)
    entropy = -(p * torch.log_softmax(teacher / 0.1, -1)).sum(-1).mean()
    assert loss.item() == pytest.approx(entropy.item(), rel=1e-5)
    for _ in range(5):
        other = teacher + 0.05 * torch.randn(4, 7)
        assert listnet(teacher, other, 0.1).item() > loss.item()
    # a per-row constant changes no softmax
    assert listnet(teacher, teacher + torch.tensor([[3.0], [-1.0], [0.5], [9.0]]), 0.1).item() == pytest.approx(
        loss.item(), rel=1e-5
    )


def test_listnet_gradient_is_softmax_difference():
    teacher = torch.tensor([[LN2, 0.0, 0.0]])
    student = torch.zeros(1, 3, requires_grad=True)
    listnet(teacher, student, 1.0).backward()
    # d/ds of -sum p log softmax(s) = softmax(s) - p = (1/3 - 1/2, 1/3 - 1/4, 1/3 - 1/4)
    expected = torch.tensor([[1 / 3 - 1 / 2, 1 / 3 - 1 / 4, 1 / 3 - 1 / 4]])
    assert torch.allclose(student.grad, expected, atol=1e-6)


def test_margin_mse_hand_computed():
    # centred teacher (-1, 1), centred student (0, 0): mean squared gap 1, divided by T^2
    teacher, student = torch.tensor([[0.0, 2.0]]), torch.zeros(1, 2)
    assert margin_mse(teacher, student, 1.0).item() == pytest.approx(1.0)
    assert margin_mse(teacher, student, 0.5).item() == pytest.approx(4.0)
    assert distill_loss("margin-mse", teacher, student, 0.5).item() == pytest.approx(4.0)


def test_margin_mse_shift_invariant_and_zero_when_equal():
    torch.manual_seed(1)
    teacher, student = torch.randn(3, 6), torch.randn(3, 6)
    base = margin_mse(teacher, student, 0.05).item()
    shifted = student + torch.tensor([[10.0], [-4.0], [0.25]])
    assert margin_mse(teacher, shifted, 0.05).item() == pytest.approx(base, rel=1e-4)
    assert margin_mse(teacher + 7.0, student, 0.05).item() == pytest.approx(base, rel=1e-4)
    assert margin_mse(teacher, teacher, 0.05).item() == pytest.approx(0.0, abs=1e-10)
    assert margin_mse(teacher, teacher - 3.0, 0.05).item() == pytest.approx(0.0, abs=1e-8)
    assert base > 0


def test_distill_loss_unknown_name_lists_the_losses():
    assert LOSSES == ("listnet", "margin-mse")
    with pytest.raises(ValueError, match=r"distill loss 'kl' is not one of \('listnet', 'margin-mse'\)"):
        distill_loss("kl", torch.zeros(1, 2), torch.zeros(1, 2), 1.0)


def test_teacher_top_is_topk_of_inner_products():
    torch.manual_seed(2)
    queries, items = torch.randn(5, 8), torch.randn(40, 8)
    top = teacher_top(queries, items, 6)
    assert top.shape == (5, 6) and top.dtype == torch.int64
    assert torch.equal(top, torch.topk(queries @ items.T, 6, dim=1).indices)


def test_teacher_top_k_above_n_is_cut_to_n():
    torch.manual_seed(3)
    queries, items = torch.randn(2, 4), torch.randn(3, 4)
    top = teacher_top(queries, items, 10)
    assert top.shape == (2, 3)
    assert torch.equal(top, torch.argsort(queries @ items.T, dim=1, descending=True))


def test_batch_candidates_union_of_the_batch_rows():
    top = torch.tensor([[5, 1, 3], [3, 9, 0], [7, 7, 2]])
    gen = torch.Generator().manual_seed(0)
    assert batch_candidates(top, torch.tensor([0, 1]), 10, 0, gen).tolist() == [0, 1, 3, 5, 9]
    assert batch_candidates(top, torch.tensor([2]), 10, 0, gen).tolist() == [2, 7]


def test_batch_candidates_random_extras_within_range_and_seeded():
    top = torch.tensor([[5, 1, 3], [3, 9, 0], [40, 41, 42]])
    batch = torch.tensor([0, 1])
    out = batch_candidates(top, batch, 50, 20, torch.Generator().manual_seed(4))
    values = out.tolist()
    assert values == sorted(set(values))  # sorted, unique
    assert {0, 1, 3, 5, 9} <= set(values)
    extras = set(values) - {0, 1, 3, 5, 9}
    assert extras and all(0 <= v < 50 for v in values)
    assert len(values) <= 5 + 20
    again = batch_candidates(top, batch, 50, 20, torch.Generator().manual_seed(4))
    assert torch.equal(out, again)
    # the drawn extras are exactly the generator's next draw
    drawn = torch.randint(50, (20,), generator=torch.Generator().manual_seed(4))
    assert set(values) == {0, 1, 3, 5, 9} | set(drawn.tolist())
