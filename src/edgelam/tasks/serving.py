"""A trained model back from its adapter folders, for serving: the task card and ``load_served``.

Every run writes ``edgelam_task.json`` (the card) into each adapter folder it saves:

    {"task": "classification", "model": "minilm", "base_seed": 0, "classes": ["negative", "positive"]}

``task``, ``model`` and ``base_seed`` rebuild the base the adapter was trained on; the rest is the
task's own ``card()`` (a classifier's class names). ``load_served`` reads the cards of the adapters
a service is given, checks they agree, and builds the served model through the task. An adapter
folder without a card (runs before cards, or a PEFT folder from elsewhere) is served as a causal
LM on the model the service names.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from edgelam.models.split import is_encoder
from edgelam.store import atomic_write_text
from edgelam.tasks import TASKS
from edgelam.tasks.base import Task

CARD = "edgelam_task.json"
DEFAULT_MODEL = "tiny-varied"


def write_card(folder: Path, task: Task, model: str, base_seed: int) -> None:
    """The card of an adapter saved from a run on ``model`` (built with ``base_seed``)."""
    card = {"task": task.name, "model": model, "base_seed": base_seed, **task.card()}
    atomic_write_text(folder / CARD, json.dumps(card, indent=2) + "\n")


def read_card(folder: Path) -> dict[str, Any] | None:
    """The card in an adapter folder, None when it has none; a damaged card is a ``ValueError``."""
    if not (folder / "adapter_config.json").is_file():
        raise ValueError(f"{folder} is not a PEFT adapter folder (no adapter_config.json)")
    path = folder / CARD
    if not path.is_file():
        return None
    try:
        card = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); rerun or delete it to serve the folder as a causal LM") from None
    ok = isinstance(card, dict) and card.get("task") in TASKS and isinstance(card.get("model"), str) \
        and isinstance(card.get("base_seed"), int)
    if not ok:
        raise ValueError(f"{path} must hold 'task' (one of {sorted(TASKS)}), 'model' (a name) and 'base_seed' "
                         f"(an integer); got {card!r}")
    return card


def agreed_card(model: str | None, adapters: dict[str, Path]) -> dict[str, Any]:
    """The one card the adapters share, completed for ``model`` when none has a card."""
    cards = {n: read_card(p) for n, p in sorted(adapters.items())}
    known = {n: c for n, c in cards.items() if c is not None}
    plain: dict[str, Any] = {"task": "causal_lm", "model": model or DEFAULT_MODEL, "base_seed": 0}
    card = next(iter(known.values()), plain)
    for n, c in known.items():
        if c != card:
            first = next(iter(known))
            diff = sorted(k for k in c.keys() | card.keys() if c.get(k) != card.get(k))
            raise ValueError(f"adapters '{first}' and '{n}' were trained for different tasks or models "
                             f"({', '.join(diff)} differ); serve them from separate services")
    if card["task"] != "causal_lm" and len(known) < len(cards):
        bare = sorted(set(cards) - set(known))
        raise ValueError(f"adapters {bare} have no {CARD} but the others are {card['task']} adapters; "
                         f"serve them from separate services")
    if model is not None and model != card["model"]:
        raise ValueError(f"the adapters were trained on model '{card['model']}', not '{model}': "
                         f"drop --model or pass --model {card['model']}")
    if card["task"] == "causal_lm" and is_encoder(card["model"]):
        raise ValueError(f"model '{card['model']}' is an encoder: serve it with the adapter of a classification run "
                         f"(edgelam serve --adapter NAME=RUN/adapter)")
    return card


@dataclass
class Served:
    """A task's trained model ready to answer: the base (its modules carry the adapters' LoRA layers)
    and ``model``, the task's model with every adapter loaded under its name."""

    task: Task
    card: dict[str, Any]
    base: nn.Module
    model: nn.Module
    tokenizer: Any
    adapters: list[str]

    @property
    def model_name(self) -> str:
        return str(self.card["model"])

    def check(self, adapter: str | None) -> None:
        """A ``LookupError`` naming what is loaded when ``adapter`` cannot be used here."""
        if adapter in (None, "", "base"):
            if self.adapters and not self.task.generates:
                raise LookupError(f"a {self.task.name} model has no base to serve; name an adapter: {self.adapters}")
        elif adapter not in self.adapters:
            loaded = f"loaded: {self.adapters}" if self.adapters else "this service serves the base model only"
            raise LookupError(f"adapter '{adapter}' is not loaded here; {loaded}")

    @contextlib.contextmanager
    def use(self, adapter: str | None) -> Iterator[None]:
        """Run the model with ``adapter`` (None, '' or 'base': the base model, for a task that has one)."""
        self.check(adapter)
        if adapter not in (None, "", "base"):
            self.model.set_adapter(adapter)  # type: ignore[operator]
            yield
        elif self.adapters:
            with self.model.disable_adapter():  # type: ignore[operator]
                yield
        else:
            yield


def load_served(model: str | None, adapters: dict[str, str] | None = None, dtype: str = "float32") -> Served:
    """The model a service hosts: the adapters' task and base (from their cards), with the adapters."""
    folders = {n: Path(p) for n, p in (adapters or {}).items()}
    card = agreed_card(model, folders)
    factory = TASKS[card["task"]]
    # adapters are loaded into the base in place: give them their own copy, not the process's cached one
    base, tok = factory.load(card["model"], dtype, card["base_seed"], fresh=bool(folders))
    task = factory.from_card(card, tok)
    served = task.serve_model(base, folders)
    served.eval()
    return Served(task, card, base, served, tok, sorted(folders))
