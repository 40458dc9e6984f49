"""Aggregation rules as pure functions on adapter state dicts (name -> tensor)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

State = dict[str, Tensor]
Reduce = Callable[[Sequence[State], Sequence[float]], State]  # (states, weights) -> one state


def _check(states: Sequence[State], weights: Sequence[float]) -> None:
    if not states or len(states) != len(weights):
        raise ValueError(f"need one weight per state and at least one state (got {len(states)} states, {len(weights)} weights)")
    if float(sum(weights)) <= 0 or min(weights) < 0:
        raise ValueError(f"weights must be >= 0 and sum to > 0 (got {list(weights)})")
    keys = states[0].keys()
    for s in states[1:]:
        if s.keys() != keys:
            raise ValueError(f"all states must have the same keys (differ in {sorted(set(s) ^ set(keys))[:3]})")


def weighted_average(states: Sequence[State], weights: Sequence[float]) -> State:
    """sum_k w_k x_k / sum_k w_k, key by key (McMahan et al. 2017, FedAvg; FedIT averages A and B apart)."""
    _check(states, weights)
    total = float(sum(weights))
    keys = states[0].keys()
    return {k: sum((w / total) * s[k].double() for s, w in zip(states, weights)).to(states[0][k].dtype)  # type: ignore[union-attr]
            for k in keys}


def fill_unsent(states: Sequence[State], weights: Sequence[float],
                unsent: Sequence[frozenset[str]], reduce: Reduce = weighted_average,
                key_weights: Sequence[dict[str, float]] | None = None) -> list[State]:
    """The states with every key that some client did not send (``unsent[i]``: e.g. the head of a
    task it does not hold) set, in every state, to ``reduce`` over the states that did send it,
    with the senders' weights (``key_weights[i][key]`` where given, else ``weights[i]``). Any
    reducer of the filled states then gives exactly that for the key (all its values are equal),
    so it is averaged (or its median taken) over its senders only and never diluted by the silent
    clients; keys everyone sent are untouched; a key nobody sent keeps its (start) values."""
    w = [float(x) for x in weights]
    _check(states, w)
    out = [dict(s) for s in states]
    for key in set().union(*unsent):
        sent = [i for i, u in enumerate(unsent) if key not in u]
        ws = [key_weights[i].get(key, w[i]) if key_weights else w[i] for i in sent]
        if not sent or sum(ws) <= 0:
            continue
        value = reduce([{key: states[i][key]} for i in sent], ws)[key]
        for s in out:
            s[key] = value
    return out


def coordinate_median(states: Sequence[State], weights: Sequence[float]) -> State:
    """The element-wise median of the states (Yin et al., ICML 2018, "coordinate-wise median");
    weights are ignored: each update is one vote. With an even count, the mean of the middle two."""
    _check(states, weights)
    return {k: torch.stack([s[k].double() for s in states]).quantile(0.5, dim=0).to(states[0][k].dtype) for k in states[0]}


def trimmed_mean(states: Sequence[State], weights: Sequence[float], trim: float = 0.2, cut: int | None = None) -> State:
    """The element-wise mean after dropping the ``cut`` (default floor(trim * n)) largest and smallest
    values (Yin et al., ICML 2018, "coordinate-wise trimmed mean"); weights are ignored."""
    _check(states, weights)
    n = len(states)
    cut = int(trim * n) if cut is None else cut
    if n - 2 * cut < 1:
        raise ValueError(f"trimming {cut} of {n} updates from each side leaves none")
    out = {}
    for k in states[0]:
        x = torch.stack([s[k].double() for s in states]).sort(dim=0).values  # (n, *shape)
        out[k] = x[cut: n - cut].mean(dim=0).to(states[0][k].dtype)
    return out


def krum_scores(states: Sequence[State], f: int) -> list[float]:
    """Krum's score of each update (Blanchard et al., NeurIPS 2017, eq. 3): the sum of squared L2
    distances to its n - f - 2 nearest other updates, over the whole flattened state (every LoRA
    factor, as the clients sent them)."""
    n = len(states)
    if n - f - 2 < 1:
        raise ValueError(f"Krum needs n > f + 2 updates (got n = {n}, f = {f}); lower fl.byzantine or select more clients")
    x = torch.stack([torch.cat([s[k].double().reshape(-1) for k in sorted(s)]) for s in states])  # (n, d)
    d2 = torch.cdist(x, x).pow(2)  # (n, n)
    return [float(torch.sort(torch.cat([d2[i, :i], d2[i, i + 1:]])).values[: n - f - 2].sum()) for i in range(n)]


def multi_krum(states: Sequence[State], weights: Sequence[float], f: int = 0, m: int | None = None) -> State:
    """Multi-Krum (Blanchard et al. 2017, sec. 4): the sample-weighted mean of the m updates with the
    lowest Krum scores (m = n - f by default; m = 1 is Krum itself). f: the number of Byzantine
    updates tolerated (``fl.byzantine``)."""
    _check(states, weights)
    scores = krum_scores(states, f)
    keep = sorted(range(len(states)), key=lambda i: (scores[i], i))[: m or len(states) - f]
    return weighted_average([states[i] for i in keep], [weights[i] for i in keep])


REDUCERS: dict[str, Reduce] = {
    "mean": weighted_average, "median": coordinate_median, "trimmed_mean": trimmed_mean,
    "krum": lambda s, w: multi_krum(s, w, 0, 1), "multi_krum": multi_krum,
}


def reducer(name: str, byzantine: int = 0) -> Reduce:
    """``fl.aggregator`` as a reduce; Krum and Multi-Krum tolerate ``fl.byzantine`` bad updates, the
    trimmed mean drops that many from each side (when > 0; else 20 %)."""
    if name == "trimmed_mean" and byzantine > 0:
        return lambda s, w: trimmed_mean(s, w, cut=byzantine)
    if name == "krum":
        return lambda s, w: multi_krum(s, w, byzantine, 1)
    if name == "multi_krum":
        return lambda s, w: multi_krum(s, w, byzantine)
    return REDUCERS[name]


def pseudo_gradient(global_state: State, average: State) -> State:
    """Delta = x_global - avg(x_k): the server's descent direction (Reddi et al. 2021, Alg. 2)."""
    return {k: global_state[k] - average[k] for k in global_state}


def momentum_step(global_state: State, delta: State, velocity: State, lr: float, beta: float) -> tuple[State, State]:
    """FedAvgM (Hsu et al. 2019): v <- beta v + Delta; x <- x - lr v."""
    new_v = {k: beta * velocity[k] + delta[k] for k in delta}
    return {k: global_state[k] - lr * new_v[k] for k in delta}, new_v


def adam_step(global_state: State, delta: State, m: State, v: State, lr: float, beta1: float, beta2: float,
              tau: float) -> tuple[State, State, State]:
    """FedAdam (Reddi et al. 2021, Alg. 2): g = -Delta; m <- b1 m + (1-b1) g; v <- b2 v + (1-b2) g^2;
    x <- x + lr m / (sqrt(v) + tau)."""
    new_m = {k: beta1 * m[k] + (1 - beta1) * (-delta[k]) for k in delta}
    new_v = {k: beta2 * v[k] + (1 - beta2) * delta[k] ** 2 for k in delta}
    new_x = {k: global_state[k] + lr * new_m[k] / (torch.sqrt(new_v[k]) + tau) for k in delta}
    return new_x, new_m, new_v


def zeros_like(state: State) -> State:
    return {k: torch.zeros_like(t) for k, t in state.items()}


def staleness_weight(kind: str, tau: int, a: float = 0.5, b: float = 4.0) -> float:
    """FedAsync's s(t - tau) (Xie et al. 2019, sec. 5.2): constant 1; polynomial (tau + 1)^-a;
    hinge 1 if tau <= b else 1 / (a (tau - b) + 1)."""
    if tau < 0:
        raise ValueError(f"staleness must be >= 0 (got {tau})")
    if kind == "constant":
        return 1.0
    if kind == "polynomial":
        return float((tau + 1) ** (-a))
    if kind == "hinge":
        return 1.0 if tau <= b else 1.0 / (a * (tau - b) + 1.0)
    raise ValueError(f"unknown staleness function '{kind}'; allowed: constant, polynomial, hinge")


def mix(global_state: State, local: State, alpha_t: float) -> State:
    """FedAsync: x <- (1 - alpha_t) x + alpha_t x_new."""
    return {k: (1 - alpha_t) * global_state[k] + alpha_t * local[k] for k in global_state}


def buffered_step(global_state: State, buffer: State, count: int, lr: float) -> State:
    """FedBuff (Nguyen et al. 2022): x <- x - eta_g * (sum_i s(tau_i) Delta_i) / K."""
    return {k: global_state[k] - lr * buffer[k] / count for k in global_state}
