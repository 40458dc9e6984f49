"""EdgeLAM's own multi-task instruction set: distinct task families with checkable answers.

Deterministic by seed: ``generate(task, n, seed)`` returns the same examples every time.
Used offline when no real data is present, and by the tests (clearly different task families
are what clustering must recover).
"""

from __future__ import annotations

import numpy as np

from edgelam.data.sources import Example
from edgelam.store import Purpose, rng_for

WORDS = (
    "apple river stone cloud tiger window garden silver planet candle forest orange rocket "
    "violin pepper marble island dragon bridge mirror castle ribbon anchor meadow falcon "
    "lantern harbor copper willow thunder"
).split()

CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Egypt": "Cairo",
    "Kenya": "Nairobi", "Peru": "Lima", "Canada": "Ottawa", "Norway": "Oslo", "Greece": "Athens",
    "Chile": "Santiago", "Cuba": "Havana", "Poland": "Warsaw", "Portugal": "Lisbon",
    "Austria": "Vienna", "Ireland": "Dublin", "Thailand": "Bangkok", "Vietnam": "Hanoi",
    "Sweden": "Stockholm", "Finland": "Helsinki", "Germany": "Berlin", "Russia": "Moscow",
    "China": "Beijing", "India": "New Delhi", "Mexico": "Mexico City", "Turkey": "Ankara",
}


def _arithmetic(rng: np.random.Generator) -> tuple[str, str]:
    a, b = (int(x) for x in rng.integers(10, 100, size=2))
    return f"What is {a} + {b}? Answer with the number only.", str(a + b)


def _reverse(rng: np.random.Generator) -> tuple[str, str]:
    w = WORDS[int(rng.integers(len(WORDS)))]
    return f"Reverse the letters of the word '{w}'.", w[::-1]


def _sort(rng: np.random.Generator) -> tuple[str, str]:
    xs = [int(x) for x in rng.integers(0, 50, size=int(rng.integers(3, 6)))]
    return f"Sort in ascending order: {', '.join(map(str, xs))}", ", ".join(map(str, sorted(xs)))


def _count(rng: np.random.Generator) -> tuple[str, str]:
    w = WORDS[int(rng.integers(len(WORDS)))]
    ch = w[int(rng.integers(len(w)))]
    return f"How many times does the letter '{ch}' appear in '{w}'?", str(w.count(ch))


def _uppercase(rng: np.random.Generator) -> tuple[str, str]:
    ws = [WORDS[int(i)] for i in rng.integers(len(WORDS), size=3)]
    text = " ".join(ws)
    return f"Rewrite in capital letters: {text}", text.upper()


def _capital(rng: np.random.Generator) -> tuple[str, str]:
    country = list(CAPITALS)[int(rng.integers(len(CAPITALS)))]
    return f"What is the capital of {country}?", CAPITALS[country]


TASKS = {
    "arithmetic": _arithmetic,
    "reverse": _reverse,
    "sort": _sort,
    "count": _count,
    "uppercase": _uppercase,
    "capital": _capital,
}


def generate(task: str, n: int, seed: int, stream: int = 0) -> list[Example]:
    """``n`` examples of ``task``; ``stream`` separates independent draws (train vs eval)."""
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task '{task}'; allowed: {sorted(TASKS)}")
    rng = rng_for(seed, Purpose.SYNTHETIC, list(TASKS).index(task), stream)
    out = []
    for _ in range(n):
        prompt, answer = TASKS[task](rng)
        out.append(Example(instruction=prompt, context="", response=answer, task=task))
    return out


def is_correct(example: Example, generated: str) -> bool:
    """Exact match after trimming whitespace and a trailing full stop."""
    return generated.strip().rstrip(".").strip() == example.response.strip()
