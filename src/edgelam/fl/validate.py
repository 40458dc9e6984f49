"""The server's gate on every received update, in front of every strategy: an update whose names,
shapes or dtypes are not what the trip's plan says, or with NaN / Inf values, is rejected with its
reason (the round goes on without it); with ``fl.norm_bound`` a delta (update - start) longer than
the bound is scaled down to it (server-side norm bounding: Sun et al., "Can You Really Backdoor
Federated Learning?", 2019)."""

from __future__ import annotations

import math

from torch import Tensor

from edgelam.fl.transforms import Clip, Trip

State = dict[str, Tensor]


def rejection(sent: State, planned: State) -> str | None:
    """Why ``sent`` is refused against the planned upload (same names and dtypes, shapes within the
    planned ones), or None."""
    missing, extra = sorted(set(planned) - set(sent)), sorted(set(sent) - set(planned))
    if missing or extra:
        return f"names differ from the plan (missing {missing[:3]}, unexpected {extra[:3]})"
    for k in sorted(sent):
        v, p = sent[k], planned[k]
        # the plan is an upper bound: a scheme may send less than planned (HetLoRA's rank self-pruning)
        if v.dim() != p.dim() or any(a > b for a, b in zip(v.shape, p.shape)):
            return f"{k}: shape {tuple(v.shape)}, expected at most {tuple(p.shape)}"
        if v.dtype != p.dtype:
            return f"{k}: dtype {v.dtype}, expected {p.dtype}"
        if not bool(v.isfinite().all()):
            return f"{k}: {int((~v.isfinite()).sum())} NaN or infinite values"
    return None


def bound(update: State, start: State, max_norm: float | None) -> State:
    """The update with its delta scaled to L2 norm <= ``max_norm`` (unchanged when None or within)."""
    if max_norm is None or not math.isfinite(max_norm):
        return update
    return Clip(max_norm)(update, start, Trip(-1, -1))  # the server's clip: no trip of its own
