"""Vertical cloud-edge-end collaboration: speculative decoding and confidence escalation.

**Speculative decoding** (Leviathan et al. 2023; greedy verification as Petals does): the device
drafts gamma tokens with a small model or the first K blocks of the same model with its LM head
(``full:K``, self-speculative), the upstream target (edge or cloud, a ``full`` module service)
scores the accepted sequence's unseen tail plus the drafts in one call, and the device keeps the
drafts up to the first disagreement plus the target's own token there. Every emitted token is the
target's greedy choice given the true prefix, so the answer equals upstream-only greedy decoding.
Both sides keep KV caches per session and roll back to the accepted prefix (``position`` below
their length). Only token ids cross the link.

The draft length adapts: with per-token acceptance rate a (moving average), draft time per token
t_d and verification round trip T_v (moving averages of what was measured), the expected tokens
per round are (1 - a^(g+1)) / (1 - a) for g drafts, and gamma maximises that per second of
g t_d + T_v, over 0..gamma_max (0: no draft, plain upstream decoding).

**With sampling** (``sampling.py``) verification is the rejection rule (Leviathan et al. 2023; Chen
et al. 2023), so every emitted token is distributed exactly as the target's processed distribution p:
the device draws each draft x from its q (temperature, top-k, top-p applied; cut to its
``PROPOSAL_SUPPORT`` most likely tokens as integer weights, sent with the drafts: 8 bytes per kept
token), the target keeps x with probability min(1, p(x)/q(x)) and draws from norm(max(0, p - q)) at the
first rejection. A round drafts g + 1 tokens and the target scores the g + 1 positions from the same
call as the greedy round (its input is unchanged: the tail and the first g drafts), so the token that
greedy verification takes as a bonus is a drafted and tested one here. Each position's token then
depends only on (p, q, the seed's three uniforms at that position), never on how the adaptive gamma
split the answer into rounds: the same seed gives the same tokens whatever the timings.

**Escalation by confidence**: each token is taken from the first tier (device, edge, cloud, ...)
whose greedy choice has probability >= its threshold; the last tier always answers. Each tier's
session catches up on the tokens it has not seen when it is next asked. With sampling the tiers
are chosen the same way, by the model's own confidence (its largest probability at temperature 1,
whatever the request's temperature, top-k or top-p: a hotter request is not sent further up), and
the token is the one the answering tier drew from its processed distribution (every tier draws with
the same uniform of (seed, position)).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from edgelam.infer.client import Transport
from edgelam.infer.sampling import Sampling, stack_proposals


@dataclass
class SpecStats:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    gammas: list[int] = field(default_factory=list)
    draft_s: float = 0.0
    verify_s: float = 0.0
    token_times: list[float] = field(default_factory=list)  # wall time at which each token was emitted (from start)
    tokens: list[int] = field(default_factory=list)
    q_bytes: int = 0  # the drafts' q sent to the target with sampling (ids + weights, int32 each)

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")

    def record(self, drafted: int, accepted: int, draft_s: float, verify_s: float) -> None:
        """One draft-and-verify round."""
        self.rounds += 1
        self.drafted += drafted
        self.accepted += accepted
        self.gammas.append(drafted)
        self.draft_s += draft_s
        self.verify_s += verify_s


class AdaptiveGamma:
    """Chooses the draft length from measured acceptance and timings (module docstring)."""

    def __init__(self, gamma_max: int = 8, fixed: int | None = None, smoothing: float = 0.3, prior_acceptance: float = 0.6,
                 probe_every: int = 8) -> None:
        self.gamma_max, self.fixed, self.w, self.probe_every = gamma_max, fixed, smoothing, probe_every
        self.a = prior_acceptance
        self.t_draft: float | None = None
        self.t_verify: float | None = None
        self.idle_rounds = 0  # rounds since the last draft: the estimates go stale when no draft runs

    def best(self) -> int:
        assert self.t_draft is not None and self.t_verify is not None
        a, td, tv = min(self.a, 0.999), self.t_draft, self.t_verify
        return max(range(self.gamma_max + 1), key=lambda g: ((1 - a ** (g + 1)) / (1 - a) / (g * td + tv), g))

    def choose(self) -> int:
        if self.fixed is not None:
            return self.fixed
        if self.t_draft is None or self.t_verify is None:
            return min(4, self.gamma_max)  # measure first
        g = self.best()
        if g == 0 and self.idle_rounds >= self.probe_every:
            return min(2, self.gamma_max)  # a probe keeps acceptance and draft time current
        return g

    def observe(self, drafted: int, accepted: int, draft_s: float, verify_s: float) -> None:
        def ema(old: float | None, new: float) -> float:
            return new if old is None else (1 - self.w) * old + self.w * new

        self.idle_rounds = 0 if drafted else self.idle_rounds + 1
        if drafted:
            # a prefix ending in a rejection says the (accepted+1)-th was rejected: MLE of a per token
            trials = accepted + (1 if accepted < drafted else 0)
            self.a = ema(self.a, accepted / trials if trials else self.a)
            self.t_draft = ema(self.t_draft, draft_s / drafted)
        self.t_verify = ema(self.t_verify, verify_s)


class Speculative:
    def __init__(self, draft: Transport, target: Transport, gamma: AdaptiveGamma | None = None, adapter: str | None = None) -> None:
        self.draft, self.target, self.gamma, self.adapter = draft, target, gamma or AdaptiveGamma(), adapter

    def stream(self, prompt_ids: list[int], max_new_tokens: int, eos_id: int | None = None,
               stats: SpecStats | None = None, sampling: Sampling | None = None) -> Iterator[int]:
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        st = stats if stats is not None else SpecStats()
        sd, stg = uuid.uuid4().hex, uuid.uuid4().hex
        seq = list(prompt_ids)
        d_len = t_len = 0  # tokens of seq each side's cache holds
        t0 = time.perf_counter()
        produced = 0
        try:
            while produced < max_new_tokens:
                g = min(self.gamma.choose(), max_new_tokens - produced - 1)
                if sampling is None:
                    drafts, d_len, draft_s = self._draft(seq, d_len, g, sd)
                    preds, verify_s = self._verify(seq, t_len, drafts, stg)
                    n = 0
                    while n < g and drafts[n] == preds[n]:
                        n += 1
                    new, drafted = drafts[:n] + [preds[n]], g
                else:
                    new, n, d_len, draft_s, verify_s = self._sampled_round(seq, d_len, t_len, g, sd, stg, sampling, st)
                    drafted = g + 1
                t_len = len(seq) + min(n, g)  # the target holds seq and the accepted drafts among its inputs
                d_len = min(d_len, len(seq) + n)
                self.gamma.observe(drafted, n, draft_s, verify_s)
                st.record(drafted, n, draft_s, verify_s)
                for tok in new:
                    seq.append(tok)
                    produced += 1
                    st.tokens.append(tok)
                    st.token_times.append(time.perf_counter() - t0)
                    yield tok
                    if (eos_id is not None and tok == eos_id) or produced >= max_new_tokens:
                        return
        finally:
            for tr, sid in ((self.draft, sd), (self.target, stg)):
                tr.close_session(sid)

    def _draft(self, seq: list[int], d_len: int, g: int, session: str, sampling: Sampling | None = None,
               proposals: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> tuple[list[int], int, float]:
        """g draft tokens, the first call catching the draft up on what it has not seen:
        (drafts, tokens the draft's cache then holds, seconds). With ``sampling`` each is drawn from the
        draft's q, appended to ``proposals`` as (ids, weights)."""
        drafts: list[int] = []
        t = time.perf_counter()
        feed, pos = seq[d_len:], d_len
        for _ in range(g):
            meta = {"session": session, "position": pos, "adapter": self.adapter}
            if sampling is not None:
                meta["sampling"] = sampling.meta(pos + len(feed), draw="draft")
            out, _ = self.draft.call({"input_ids": torch.tensor([feed])}, meta)
            pos += len(feed)
            drafts.append(int(out["token_ids"][0, -1]))
            if proposals is not None:
                proposals.append((out["q_ids"][0], out["q_weights"][0]))
            feed = [drafts[-1]]
        return drafts, (pos if g else d_len), time.perf_counter() - t

    def _sampled_round(self, seq: list[int], d_len: int, t_len: int, g: int, sd: str, stg: str, s: Sampling,
                       st: SpecStats) -> tuple[list[int], int, int, float, float]:
        """g + 1 drafts from q, verified by the rejection rule at the target (module docstring):
        (new tokens, drafts kept, tokens the draft's cache holds, draft seconds, verify seconds)."""
        proposals: list[tuple[torch.Tensor, torch.Tensor]] = []
        drafts, d_len, draft_s = self._draft(seq, d_len, g + 1, sd, s, proposals)
        q = stack_proposals(proposals)
        st.q_bytes += sum(v.numel() * v.element_size() for v in q.values())
        t = time.perf_counter()
        tensors = {"input_ids": torch.tensor([seq[t_len:] + drafts[:g]]), "draft_ids": torch.tensor([drafts]), **q}
        out, _ = self.target.call(tensors, {"session": stg, "position": t_len, "adapter": self.adapter,
                                            "sampling": s.meta(len(seq) + g, rows=g + 1)})
        n, resampled = int(out["accepted"][0, 0]), int(out["resampled"][0, 0])
        new = drafts if n == g + 1 else drafts[:n] + [resampled]
        return new, n, d_len, draft_s, time.perf_counter() - t

    def _verify(self, seq: list[int], t_len: int, drafts: list[int], session: str) -> tuple[list[int], float]:
        """The target's greedy token after seq's last token and after each draft, from one call on its
        unseen tail of seq and the drafts: (predictions, seconds)."""
        t = time.perf_counter()
        tail = seq[t_len:] + drafts
        out, _ = self.target.call({"input_ids": torch.tensor([tail])}, {"session": session, "position": t_len,
                                                                        "adapter": self.adapter})
        return out["token_ids"][0].tolist()[len(seq) - t_len - 1:], time.perf_counter() - t

    def generate(self, prompt_ids: list[int], max_new_tokens: int, eos_id: int | None = None,
                 sampling: Sampling | None = None) -> SpecStats:
        st = SpecStats()
        for _ in self.stream(prompt_ids, max_new_tokens, eos_id, st, sampling):
            pass
        return st


@dataclass
class EscalationStats:
    tiers: list[str]
    served: list[int]  # tokens answered by each tier
    tokens: list[int] = field(default_factory=list)
    tier_of_token: list[int] = field(default_factory=list)

    def shares(self) -> dict[str, float]:
        total = max(sum(self.served), 1)
        return {name: n / total for name, n in zip(self.tiers, self.served)}


class Escalation:
    """Tiers in order (device first); ``thresholds[i]`` is the confidence tier i must reach to answer
    (the last tier always answers)."""

    def __init__(self, tiers: list[tuple[str, Transport]], thresholds: list[float], adapter: str | None = None) -> None:
        if len(thresholds) != len(tiers) - 1:
            raise ValueError(f"{len(tiers)} tiers need {len(tiers) - 1} thresholds (the last tier always answers)")
        self.tiers, self.thresholds, self.adapter = tiers, thresholds, adapter

    def stream(self, prompt_ids: list[int], max_new_tokens: int, eos_id: int | None = None,
               stats: EscalationStats | None = None, sampling: Sampling | None = None) -> Iterator[int]:
        st = stats if stats is not None else EscalationStats([n for n, _ in self.tiers], [0] * len(self.tiers))
        sids = [uuid.uuid4().hex for _ in self.tiers]
        seen = [0] * len(self.tiers)
        seq = list(prompt_ids)
        try:
            for _ in range(max_new_tokens):
                for i, (_, tr) in enumerate(self.tiers):
                    meta = {"session": sids[i], "position": seen[i], "adapter": self.adapter}
                    if sampling is not None:
                        meta["sampling"] = sampling.meta(len(seq))
                    out, _ = tr.call({"input_ids": torch.tensor([seq[seen[i]:]])}, meta)
                    seen[i] = len(seq)
                    tok, prob = int(out["token_ids"][0, -1]), float(out["top_prob"][0, -1])
                    if i == len(self.tiers) - 1 or prob >= self.thresholds[i]:
                        break
                st.served[i] += 1
                st.tokens.append(tok)
                st.tier_of_token.append(i)
                seq.append(tok)
                yield tok
                if eos_id is not None and tok == eos_id:
                    return
        finally:
            for (_, tr), sid in zip(self.tiers, sids):
                tr.close_session(sid)

    def generate(self, prompt_ids: list[int], max_new_tokens: int, eos_id: int | None = None,
                 sampling: Sampling | None = None) -> EscalationStats:
        st = EscalationStats([n for n, _ in self.tiers], [0] * len(self.tiers))
        for _ in self.stream(prompt_ids, max_new_tokens, eos_id, st, sampling):
            pass
        return st
