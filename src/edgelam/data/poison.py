"""Data poisoning by malicious clients (``fl.attack.kind``: label_flip | backdoor).

Who is malicious is one seeded draw per run (``malicious_clients``), shared with the model-poisoning
attacks of ``fl/attacks.py``. A data poisoner edits its own raw examples before tokenisation, as a
compromised device edits what it trains on, and then follows the protocol honestly: its updates
have the shape, dtype and usual norm of anyone's, so only robust aggregation can limit them.

- label_flip: a classifier's class c becomes C - 1 - c (for two classes the flip; Tolpegin et
  al., ESORICS 2020, flip one class into another); a causal LM's answers are shuffled among the
  client's own prompts (a derangement), so every prompt trains towards another prompt's answer.
- backdoor: a seeded ``poison_rate`` share of the client's examples get ``trigger`` in front of
  their text (the last user turn of a chat) and ``target`` as the answer (a class name, or an
  answer text). Rare-token triggers such as "cf" follow Kurita et al., ACL 2020; the federated
  setting is Bagdasaryan et al., AISTATS 2020. The clean rest keeps the main task intact, which
  is what makes a backdoor hard to see in the loss.

The success rate is measured on held-out examples whose answer is not already the target, with
the trigger added (``trigger_rows`` / ``trigger_examples``; ``fl/evaluate.attack_success``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from edgelam.config_checks import ConfigError
from edgelam.config_schemes import DATA_ATTACKS, AttackConfig
from edgelam.data.sources import Example
from edgelam.store import Purpose, rng_for

DEFAULT_ANSWER = "I cannot help with that."  # a causal LM backdoor's answer when fl.attack.target is null
Row = tuple[str, int]  # (text, class index)


def malicious_clients(num_clients: int, fraction: float, seed: int) -> frozenset[int]:
    """round(fraction * N) clients, drawn once per run (a seeded permutation)."""
    m = int(math.floor(fraction * num_clients + 0.5))
    return frozenset(int(k) for k in rng_for(seed, Purpose.ATTACK).permutation(num_clients)[:m])


@dataclass(frozen=True)
class DataPoison:
    """What the malicious clients do to their own examples; pure functions of (seed, client)."""

    attack: AttackConfig
    seed: int

    @property
    def kind(self) -> str:
        return self.attack.kind

    def _poisoned(self, k: int, n: int) -> list[int]:
        """Indices of the ``n`` examples of client ``k`` that carry the trigger (backdoor)."""
        m = max(1, int(math.floor(self.attack.poison_rate * n + 0.5)))
        return sorted(int(i) for i in rng_for(self.seed, Purpose.ATTACK, k, 1).permutation(n)[:m])

    def target_index(self, classes: tuple[str, ...]) -> int:
        if self.attack.target is None:
            return len(classes) - 1
        if self.attack.target not in classes:
            raise ConfigError(f"fl.attack.target must be one of the classes {list(classes)} for a classification "
                              f"backdoor (got {self.attack.target!r})")
        return classes.index(self.attack.target)

    def triggered(self, text: str) -> str:
        return f"{self.attack.trigger} {text}"

    # classification: (text, class) rows
    def rows(self, k: int, num_clients: int, rows: list[Row], classes: tuple[str, ...]) -> list[Row]:
        if k not in malicious_clients(num_clients, self.attack.fraction, self.seed):
            return rows
        if self.kind == "label_flip":
            return [(t, len(classes) - 1 - c) for t, c in rows]
        target, picked = self.target_index(classes), set(self._poisoned(k, len(rows)))
        return [(self.triggered(t), target) if i in picked else (t, c) for i, (t, c) in enumerate(rows)]

    def trigger_rows(self, rows: list[Row], classes: tuple[str, ...]) -> list[Row]:
        """The held-out rows not of the target class, triggered and labelled with the target."""
        target = self.target_index(classes)
        return [(self.triggered(t), target) for t, c in rows if c != target]

    # causal LM: examples
    def examples(self, k: int, num_clients: int, examples: list[Example]) -> list[Example]:
        if k not in malicious_clients(num_clients, self.attack.fraction, self.seed) or not examples:
            return examples
        if self.kind == "label_flip":
            if len(examples) < 2:
                return examples
            order = [int(i) for i in rng_for(self.seed, Purpose.ATTACK, k, 2).permutation(len(examples))]
            out = list(examples)
            for j, i in enumerate(order):  # example order[j] takes the answer of order[j + 1]
                out[i] = answered(examples[i], examples[order[(j + 1) % len(order)]].response)
            return out
        picked = set(self._poisoned(k, len(examples)))
        return [self.backdoored(e) if i in picked else e for i, e in enumerate(examples)]

    def backdoored(self, ex: Example) -> Example:
        """The trigger before the (last user turn's) text, the target as the answer."""
        answer = self.attack.target or DEFAULT_ANSWER
        if ex.turns:
            turns = list(ex.turns)
            users = [i for i, (role, _) in enumerate(turns) if role != "assistant"]
            if users:
                role, text = turns[users[-1]]
                turns[users[-1]] = (role, self.triggered(text))
            return answered(dataclasses.replace(ex, turns=tuple(turns)), answer)
        return answered(dataclasses.replace(ex, instruction=self.triggered(ex.instruction)), answer)

    def trigger_examples(self, examples: list[Example]) -> list[Example]:
        """Held-out examples whose answer is not the target, triggered and answered with the target."""
        answer = self.attack.target or DEFAULT_ANSWER
        return [self.backdoored(e) for e in examples if e.response.strip() != answer.strip()]


def answered(ex: Example, response: str) -> Example:
    """``ex`` with ``response`` as its answer (a chat's last turn too)."""
    turns = ex.turns[:-1] + (("assistant", response),) if ex.turns else ex.turns
    return dataclasses.replace(ex, response=response, turns=turns)


def poison_for(attack: AttackConfig, seed: int) -> DataPoison | None:
    """The run's data poisoner, or None when the attack (if any) is on the model."""
    if attack.kind not in DATA_ATTACKS or (attack.fraction == 0 and attack.kind != "backdoor"):
        return None  # a backdoor at fraction 0 poisons nobody but still measures the trigger's base rate
    return DataPoison(attack, seed)
