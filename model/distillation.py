"""Distillation of the float model's ranking into the index's scores (Distill-VQ, SIGIR 2022;
LibVQ): the label-free way to learn an index, and a regulariser for the supervised modes.

Teacher: the frozen float encoder, score t(q, x) = <q, x> over float item embeddings.
Student: the index's own scores of the same candidates, exactly as the search engine computes
them (`index.search`): coarse  s_c(q, x) = <R q', C[cell(x)]>, full  s(q, x) = s_c + ADC =
<R q', C[cell(x)] + concat_m P[m, code_m(x)]>, with q' the (optionally trained) query tower.

Candidates per query: the teacher's exact top-K plus every other query's top-K in the batch
(Distill-VQ: dropping the in-batch items hurt a lot), so a batch scores B queries against the
union U of their candidates, (B, U) matrices. Loss: ListNet, the cross-entropy between the
teacher's and the student's softmax over the candidates, on the full and on the coarse score.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812

from index import exact_search

LOSSES = ("listnet", "margin-mse")


def listnet(teacher: torch.Tensor, student: torch.Tensor, temperature: float) -> torch.Tensor:
    """teacher, student (B, U) scores -> mean over queries of -sum softmax(t/T) log softmax(s/T)."""
    p = F.softmax(teacher / temperature, dim=-1)
    return -(p * F.log_softmax(student / temperature, dim=-1)).sum(-1).mean()


def margin_mse(teacher: torch.Tensor, student: torch.Tensor, temperature: float) -> torch.Tensor:
    """The alternative measured beside ListNet (Hofstaetter et al.'s margin-MSE, over a list):
    squared error between the student's and the teacher's score margins to each query's mean
    candidate score, in units of the temperature. It matches every candidate's margin equally;
    ListNet weights the top of the teacher's list by its softmax mass."""
    t = teacher - teacher.mean(-1, keepdim=True)
    s = student - student.mean(-1, keepdim=True)
    return (((s - t) / temperature) ** 2).mean()


def distill_loss(name: str, teacher: torch.Tensor, student: torch.Tensor, temperature: float) -> torch.Tensor:
    if name == "listnet":
        return listnet(teacher, student, temperature)
    if name == "margin-mse":
        return margin_mse(teacher, student, temperature)
    raise ValueError(f"distill loss {name!r} is not one of {LOSSES}")


def teacher_top(queries: torch.Tensor, items: torch.Tensor, k: int) -> torch.Tensor:
    """(Nq, d) teacher query embeddings, (N, d) float items -> (Nq, min(k, N)) rows of each
    query's exact top-k by inner product (the float model's ranking)."""
    _, rows = exact_search(queries, items, min(k, len(items)), "ip", device="cpu")
    return torch.from_numpy(rows)


def batch_candidates(
    top: torch.Tensor, batch: torch.Tensor, n_items: int, extra_random: int, gen: torch.Generator
) -> torch.Tensor:
    """Candidate rows for a batch: the union of its queries' teacher top-K (in-batch items for the
    others) plus `extra_random` uniformly drawn rows (the far tail the student must keep down)."""
    rows = top[batch].reshape(-1)
    if extra_random:
        rows = torch.cat([rows, torch.randint(n_items, (extra_random,), generator=gen)])
    return torch.unique(rows)
