"""Sampling where the logits are: temperature, top-k, top-p, one random number per (seed, token position),
and exact speculative sampling (the rejection rule).

The head (``head``, ``full`` or ``full:K`` module) samples, so logits never cross a link; the request's
metadata carries ``{"sampling": {temperature, top_p, top_k, seed, at, rows, draw}}``: the parameters,
``at`` (the absolute sequence position of the token the last input row predicts), ``rows`` (how many
of the last rows to sample) and ``draw`` (``sample``: the target's token; ``draft``: a proposal).
Each random number is drawn from a generator keyed by (seed, purpose, position) (``store.rng_for``),
never from a stream: a replay after a failover, another service, or the same seed later, draws the
same numbers, so the same seed gives the same tokens.

Speculative sampling (Leviathan et al. 2023, Alg. 1; Chen et al. 2023, Alg. 2): a draft token x drawn
from the draft's distribution q is kept with probability min(1, p(x) / q(x)); at the first rejection
the token is drawn from norm(max(0, p - q)). Every emitted token is then distributed exactly as p,
whatever q is. q is the draft's processed distribution cut to its ``PROPOSAL_SUPPORT`` most likely
tokens, as integer weights (fixed point, ``Q_SCALE``): the draft draws from exactly the q the verifier
reads, on any wire dtype, at 8 bytes per kept token (int32 id + int32 weight) instead of the 2 x V bytes
of a dense float16 distribution.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from edgelam.store import rng_for

PURPOSES = {"sample": 0, "draft": 1, "accept": 2}  # one independent uniform per purpose and position
PROPOSAL_SUPPORT = 64  # the draft's most likely tokens that make up q (the rest get weight 0)
Q_SCALE = 1 << 24  # q's weights are floor(q * 2^24): exact integers on the wire
SEED_RANGE = (-(2**63), 2**64)


@dataclass(frozen=True)
class Sampling:
    """OpenAI's temperature (0, 2] and top_p (0, 1], HF / vLLM's top_k (0: off) and a seed (any 64-bit
    integer). Temperature 0 is greedy decoding, which is no ``Sampling`` at all (``None``)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        for key, value in vars(self).items():
            problem = check(key, value)
            if problem or (key == "temperature" and value == 0):
                raise ValueError(problem or "temperature must be > 0 to sample (0 is greedy decoding: no sampling)")

    def meta(self, at: int, rows: int = 1, draw: str = "sample") -> dict[str, Any]:
        """The request metadata: sample the last ``rows`` rows, the last one predicting position ``at``."""
        return {**vars(self), "at": at, "rows": rows, "draw": draw}


RANGES = {"temperature": "a number between 0 and 2 (0: greedy)", "top_p": "a number in (0, 1]",
          "top_k": "an integer >= 0 (0: no top-k filtering)", "seed": "an integer in [-2^63, 2^64)"}


def check(key: str, value: Any) -> str | None:
    """What is wrong with sampling parameter ``key``, or None."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    integer = isinstance(value, int) and not isinstance(value, bool)
    ok = {"temperature": number and 0 <= value <= 2, "top_p": number and 0 < value <= 1,
          "top_k": integer and value >= 0, "seed": integer and SEED_RANGE[0] <= value < SEED_RANGE[1]}.get(key, True)
    return None if ok else f"{key} must be {RANGES[key]}, got {json.dumps(value)[:100]}"


def uniform(seed: int, purpose: str, position: int) -> float:
    """The uniform [0, 1) number of ``purpose`` for the token at absolute sequence ``position``."""
    return float(rng_for(seed % 2**64, PURPOSES[purpose], position).random())


def process(logits: Tensor, s: Sampling) -> Tensor:
    """(R, V) logits -> (R, V) float64 probabilities after temperature, top-k, top-p, in Hugging Face's
    order (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper): top-p keeps the smallest set of
    most likely tokens whose mass reaches top_p (Holtzman et al. 2020), at least one."""
    x = logits.double() / s.temperature
    if 0 < s.top_k < x.shape[-1]:
        kth = torch.topk(x, s.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, -math.inf)
    probs = torch.softmax(x, dim=-1)
    if s.top_p < 1:
        probs = probs.masked_fill(~nucleus(probs, s.top_p), 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def nucleus(probs: Tensor, top_p: float) -> Tensor:
    """(R, V) mask of the tokens top-p keeps: a token goes when the mass ranked above it reaches top_p.
    Ranking the k most likely suffices once they hold top_p of the mass (k = 256, x8 until they do):
    a vocabulary-wide sort costs ~5 ms per row at V = 49,152, a top-256 a tenth of that."""
    k = min(256, probs.shape[-1])
    while True:
        ranked, order = torch.topk(probs, k, dim=-1)  # (R, k), descending
        if k == probs.shape[-1] or bool((ranked.sum(-1) >= top_p).all()):
            drop = (ranked.cumsum(-1) - ranked) >= top_p
            return torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, ~drop)
        k = min(8 * k, probs.shape[-1])


def draw(probs: Tensor, u: float) -> int:
    """Inverse-CDF draw from (V,) non-negative weights with uniform ``u``, in vocabulary order (never a
    zero-weight token)."""
    cdf = probs.double().cumsum(0)
    i = int(torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])], dtype=torch.float64), right=True))
    return min(i, probs.shape[0] - 1)


def proposal(q: Tensor, support: int = PROPOSAL_SUPPORT) -> tuple[Tensor, Tensor]:
    """The draft's distribution ``q`` (V,) as the verifier gets it: its ``support`` most likely token ids
    and weights floor(q * 2^24) (int32 each; q(x) = w_x / sum w). The most likely token always keeps
    weight >= 1 (q's maximum is >= 1/V)."""
    vals, ids = torch.topk(q, min(support, q.shape[0]))
    weights = torch.floor(vals * Q_SCALE).to(torch.int32)
    keep = weights > 0
    return ids[keep].to(torch.int32), weights[keep]


def draw_proposal(ids: Tensor, weights: Tensor, u: float) -> int:
    """A draft token from the integer weights, exactly (integer CDF, floor(u * W))."""
    cdf = weights.long().cumsum(0)
    target = int(u * int(cdf[-1]))
    return int(ids[int(torch.searchsorted(cdf, torch.tensor([target]), right=True))])


def stack_proposals(props: list[tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """Proposals of one round as (1, R, M) tensors ``q_ids``, ``q_weights``, padded with weight 0."""
    m = max(len(i) for i, _ in props)
    ids = torch.zeros(1, len(props), m, dtype=torch.int32)
    weights = torch.zeros(1, len(props), m, dtype=torch.int32)
    for r, (i, w) in enumerate(props):
        ids[0, r, : len(i)], weights[0, r, : len(w)] = i, w
    return {"q_ids": ids, "q_weights": weights}


def verify(p: Tensor, drafts: list[int], q_ids: Tensor, q_weights: Tensor, seed: int, first: int) -> tuple[int, int]:
    """The rejection rule over R drafted positions (``first`` .. ``first + R - 1``): p (R, V) the target's
    processed probabilities, drafts (R,), q as (R, M) ids and weights. Returns (accepted, token): the
    number of drafts kept and, at the first rejection, the token drawn from norm(max(0, p - q)) there
    (-1 when all are kept)."""
    for i, x in enumerate(drafts):
        total = int(q_weights[i].long().sum())
        w_x = int(q_weights[i][q_ids[i] == x].long().sum())
        if w_x == 0:
            raise ValueError(f"draft token {x} at row {i} has weight 0 in its q: the draft never proposes it")
        q_x = w_x / total
        if uniform(seed, "accept", first + i) * q_x < float(p[i, x]):  # kept with probability min(1, p/q)
            continue
        q = torch.zeros_like(p[i]).index_add_(0, q_ids[i].long(), q_weights[i].double() / total)
        residual = (p[i] - q).clamp(min=0.0)
        # a rejection leaves mass where p > q; float rounding of p alone can empty it (then p itself)
        return i, draw(residual if float(residual.sum()) > 0 else p[i], uniform(seed, "sample", first + i))
    return len(drafts), -1


def parse_meta(raw: Any) -> tuple[Sampling, int, int, str]:
    """(parameters, at, rows, draw) of a request's ``sampling`` metadata; ``ValueError`` naming the field."""
    if not isinstance(raw, dict):
        raise ValueError("'sampling' must be an object {temperature, top_p, top_k, seed, at, rows, draw}")
    at, rows, kind = raw.get("at"), raw.get("rows", 1), raw.get("draw", "sample")
    if (type(at) is not int or at < 1 or type(rows) is not int or not 1 <= rows <= at
            or kind not in ("sample", "draft") or (kind == "draft" and rows != 1)):
        raise ValueError("'at' must be an integer >= 1 (the position the last row predicts), 'rows' an integer in "
                         "[1, at] (1 for a draft) and 'draw' sample or draft")
    s = Sampling(**{k: raw[k] for k in ("temperature", "top_p", "top_k", "seed") if k in raw})
    return s, at, rows, kind


def at_head(logits: Tensor, raw: Any, tensors: dict[str, Tensor], greedy: dict[str, Tensor]) -> dict[str, Tensor]:
    """A head's answer to a sampling request, from its (1, T, V) logits and its greedy answer: the last
    ``rows`` rows of ``token_ids`` sampled (``top_prob`` stays the model's own confidence, the largest
    probability at temperature 1, which escalation compares with its thresholds); a draft adds its q
    (``q_ids``, ``q_weights``, (1, M)); with ``draft_ids`` and their q, the verifier adds ``accepted`` and
    ``resampled`` (1, 1) by the rejection rule."""
    s, at, rows, kind = parse_meta(raw)
    if logits.shape[0] != 1 or rows > logits.shape[1]:
        raise ValueError(f"sampling serves one sequence of >= {rows} rows; got logits of shape {tuple(logits.shape[:2])}")
    probs = process(logits[0, -rows:], s)  # (rows, V)
    first = at - rows + 1  # the position the first sampled row predicts
    token_ids = greedy["token_ids"].clone()
    if kind == "draft":  # one row: the next draft token, drawn from exactly the q the verifier will read
        ids, weights = proposal(probs[-1])
        token_ids[0, -1] = draw_proposal(ids, weights, uniform(s.seed, "draft", at))
        return {**greedy, "token_ids": token_ids, "q_ids": ids[None], "q_weights": weights[None]}
    for r in range(rows):
        token_ids[0, -rows + r] = draw(probs[r], uniform(s.seed, "sample", first + r))
    out = {**greedy, "token_ids": token_ids}
    if "draft_ids" in tensors:
        out.update(verify_request(probs, tensors, s.seed, first))
    return out


def verify_request(probs: Tensor, tensors: dict[str, Tensor], seed: int, first: int) -> dict[str, Tensor]:
    """``accepted`` and ``resampled`` for the drafts and proposals a verification request carries (its
    last rows - 1 input tokens must be the drafts but the last: the rows after them are their p)."""
    rows, vocab = probs.shape
    drafts, q_ids, q_weights = (tensors.get(k, torch.zeros(0)) for k in ("draft_ids", "q_ids", "q_weights"))
    ints = [not t.dtype.is_floating_point and t.numel() > 0 for t in (drafts, q_ids, q_weights)]
    if (not all(ints) or tuple(drafts.shape) != (1, rows) or q_ids.dim() != 3 or tuple(q_ids.shape[:2]) != (1, rows)
            or q_weights.shape != q_ids.shape or int(q_weights.min()) < 0 or bool((q_weights.long().sum(-1) == 0).any())):
        raise ValueError(f"verification needs integer 'draft_ids' (1, {rows}) and 'q_ids', 'q_weights' (1, {rows}, M) "
                         f"with non-negative weights, some > 0 per row")
    if min(int(q_ids.min()), int(drafts.min())) < 0 or max(int(q_ids.max()), int(drafts.max())) >= vocab:
        raise ValueError(f"draft and q token ids must lie in [0, {vocab})")
    fed = tensors.get("input_ids")
    if fed is not None and rows > 1 and not torch.equal(fed[0, -(rows - 1):].long(), drafts[0, :-1].long()):
        raise ValueError("the last input tokens must be the drafts (all but the last) that 'draft_ids' lists")
    n, token = verify(probs, drafts[0].tolist(), q_ids[0], q_weights[0], seed, first)
    return {"accepted": torch.tensor([[n]]), "resampled": torch.tensor([[token]])}
