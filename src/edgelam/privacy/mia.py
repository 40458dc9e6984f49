"""Loss-threshold membership inference: Yeom et al., "Privacy Risk in Machine Learning: Analyzing the
Connection to Overfitting", CSF 2018, Sec. 3.2 (the attacker guesses "member" when an example's loss
is below a threshold). Sweeping the threshold gives the attack's ROC curve; its area is the AUC,
which equals the Mann-Whitney U statistic over (member, non-member) pairs divided by their number
(Hanley & McNeil 1982): the chance that a random member has a lower loss than a random non-member,
ties counted half. 0.5 is no leakage: the model tells members from non-members by chance only.

Members are a client's training examples; non-members are examples of the same distribution the
model never trained on: the client's held-out split and the global evaluation examples of the
client's data tasks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgelam.data.build import FederatedData
from edgelam.fl.evaluate import task_sums
from edgelam.tasks.base import Task


@dataclass(frozen=True)
class MIAResult:
    auc: float  # 0.5: no leakage; 1.0: every member has a lower loss than every non-member
    member_loss: float  # mean per-example loss on the members
    nonmember_loss: float
    members: int
    nonmembers: int


def auc_mann_whitney(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float:
    """AUC = U / (n1 n0), U = #{(i, j): s_i > t_j} + #{s_i = t_j} / 2 over members i and non-members j
    (a higher score says "member")."""
    if not member_scores or not nonmember_scores:
        raise ValueError(f"membership inference needs members and non-members; got {len(member_scores)} and "
                         f"{len(nonmember_scores)}")
    s = np.asarray(member_scores, dtype=np.float64)[:, None]  # (n1, 1)
    t = np.asarray(nonmember_scores, dtype=np.float64)[None, :]  # (1, n0)
    return float((s > t).mean() + 0.5 * (s == t).mean())


def example_losses(task: Task, model: Any, examples: Sequence[Any]) -> list[float]:
    """Each example's own loss under ``model`` (the task's loss: mean over a causal LM's answer tokens)."""
    return [task.metrics(task_sums(task, model, [ex], 1))["loss"] for ex in examples]


def mia_sets(data: FederatedData, client: int) -> tuple[list[Any], list[Any]]:
    """(members, non-members) of ``client``: its training examples; its held-out examples and the global
    evaluation examples of its data tasks (the same distribution, never trained on)."""
    c = data.clients[client]
    extra = [ex for t in c.tasks for ex in data.global_eval.get(t, [])]
    return list(c.train), [*c.heldout, *extra]


def loss_attack(task: Task, model: Any, members: Sequence[Any], nonmembers: Sequence[Any]) -> MIAResult:
    """The loss-threshold attack on ``model`` (adapter already set): score = -loss."""
    m, n = example_losses(task, model, members), example_losses(task, model, nonmembers)
    return MIAResult(auc_mann_whitney([-x for x in m], [-x for x in n]), float(np.mean(m)), float(np.mean(n)),
                     len(m), len(n))
