"""Client trips in flight, reported without plumbing: an executor calls ``trips_started(len(works))``
when a batch of works begins and ``trip_done(client)`` after each; a display ``listen``s (the CLI's
"clients" line). With nobody listening a report costs one empty loop.

Listeners are process-wide (a module-level registry) and called on the reporting thread; a
listener that raises is logged and skipped, never allowed to stop a run.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

log = logging.getLogger("edgelam.progress")

Event = Literal["started", "done"]
Callback = Callable[[Event, int], None]  # ("started", n trips) or ("done", client)

_listeners: list[Callback] = []
_lock = threading.Lock()


@contextmanager
def listen(callback: Callback) -> Iterator[Callback]:
    """Call ``callback`` with every report made while the block runs."""
    with _lock:
        _listeners.append(callback)
    try:
        yield callback
    finally:
        with _lock:
            _listeners.remove(callback)


def trips_started(n: int) -> None:
    """``n`` client trips begin (one executor batch)."""
    _emit("started", n)


def trip_done(client: int) -> None:
    """Client ``client``'s trip has come back."""
    _emit("done", client)


def _emit(event: Event, value: int) -> None:
    with _lock:
        listeners = tuple(_listeners)
    for callback in listeners:
        try:
            callback(event, value)
        except Exception:  # noqa: BLE001 - a broken display must not stop a run
            log.exception("a progress listener failed on %s %d", event, value)


@dataclass
class TripCount:
    """Trips of the current round: ``done`` of ``started`` (done + in flight). A listener itself;
    ``new_round`` keeps the trips still in flight (asynchronous schemes) and zeroes the rest."""

    started: int = 0
    done: int = 0

    def __call__(self, event: Event, value: int) -> None:
        if event == "started":
            self.started += value
        else:
            self.done += 1

    @property
    def in_flight(self) -> int:
        return self.started - self.done

    def new_round(self) -> None:
        self.started, self.done = self.in_flight, 0
