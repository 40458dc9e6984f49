"""Stop sequences (OpenAI's ``stop``): generation ends before the first one, which is not returned.

The gateway decodes the whole answer after each token and shows only what no stop sequence can still
claim: text up to the first complete stop sequence, and short of a tail that could be the start of one
(held back until the next tokens tell), so a stream never leaks part of a stop sequence.
"""

from __future__ import annotations

import json
from typing import Any

MAX_STOPS = 4  # OpenAI's limit


def parse_stops(value: Any) -> tuple[str, ...]:
    """``stop`` as a tuple: a string or a list of at most 4 non-empty strings (null, "" or []: none);
    ``ValueError`` naming what is allowed."""
    if value is None or value == "" or value == []:
        return ()
    stops = [value] if isinstance(value, str) else value
    if (not isinstance(stops, list) or not 1 <= len(stops) <= MAX_STOPS
            or not all(isinstance(s, str) and s for s in stops)):
        raise ValueError(f"stop must be a string or a list of at most {MAX_STOPS} non-empty strings, "
                         f"got {json.dumps(value)[:200]}")
    return tuple(stops)


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of some stop sequence."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


def visible(text: str, stops: tuple[str, ...], final: bool = False) -> tuple[int, bool]:
    """(how many leading characters of ``text`` may be shown, whether a stop sequence ends the answer
    there); ``final``: no more tokens will come, so nothing is held back."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    if found:
        return min(found), True
    return len(text) - (0 if final else held_back(text, stops)), False
