"""Readers for the instruction-data formats EdgeLAM uses, from any folder or the Hugging Face Hub.

Formats (auto-detected from the first record's keys):
  dolly   {instruction, context, response, category}
  alpaca  {instruction, input, output}
  gsm8k   {question, answer}
  fingpt  {context, target}   (context is the whole prompt)
Files are a JSON array or JSON lines. Relative paths resolve against $EDGELAM_DATA
(default ../shared/data) when they do not exist as given.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """A data file or folder is missing or malformed."""


@dataclass(frozen=True)
class Example:
    instruction: str
    context: str
    response: str
    task: str


FORMAT_KEYS: dict[str, tuple[str, ...]] = {
    "dolly": ("instruction", "context", "response"),
    "alpaca": ("instruction", "input", "output"),
    "gsm8k": ("question", "answer"),
    "fingpt": ("context", "target"),
}


def data_root() -> Path:
    return Path(os.environ.get("EDGELAM_DATA", "../shared/data"))


def resolve_path(path: str) -> Path:
    """``path`` as given if it exists, else under $EDGELAM_DATA; a clear error if neither."""
    given = Path(os.path.expanduser(path))
    if given.exists():
        return given
    under_root = data_root() / path
    if under_root.exists():
        return under_root
    raise DataError(
        f"data path '{path}' not found (tried '{given}' and '{under_root}'); "
        f"set EDGELAM_DATA to the folder holding the data sets or give an existing path"
    )


def read_records(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON array or JSON-lines file."""
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    try:
        if stripped.startswith("["):
            rows = json.loads(stripped)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON or JSON lines ({exc})") from None
    if not all(isinstance(r, dict) for r in rows):
        raise DataError(f"{path}: every record must be a JSON object")
    return rows


def detect_format(record: dict[str, Any], where: str) -> str:
    for name, keys in FORMAT_KEYS.items():
        if all(k in record for k in keys):
            return name
    raise DataError(
        f"{where}: cannot tell the format from keys {sorted(record)}; "
        f"expected one of {{{'; '.join(f'{n}: {list(k)}' for n, k in FORMAT_KEYS.items())}}}"
    )


def to_example(record: dict[str, Any], fmt: str, task: str | None) -> Example:
    def s(key: str) -> str:
        value = record.get(key, "")
        return "" if value is None else str(value)

    if fmt == "dolly":
        return Example(s("instruction"), s("context"), s("response"), task or s("category") or "dolly")
    if fmt == "alpaca":
        return Example(s("instruction"), s("input"), s("output"), task or "alpaca")
    if fmt == "gsm8k":
        return Example(s("question"), "", s("answer"), task or "math")
    if fmt == "fingpt":
        return Example(s("context"), "", s("target"), task or "finance")
    raise DataError(f"unknown data format '{fmt}'; allowed: {list(FORMAT_KEYS)}")


def convert(rows: list[dict[str, Any]], fmt: str, task: str | None, where: str) -> list[Example]:
    if not rows:
        raise DataError(f"{where}: no records")
    fmt = detect_format(rows[0], where) if fmt == "auto" else fmt
    missing = [k for k in FORMAT_KEYS[fmt] if k not in rows[0]]
    if missing:
        raise DataError(f"{where}: format '{fmt}' needs keys {list(FORMAT_KEYS[fmt])}; missing {missing}")
    return [to_example(r, fmt, task) for r in rows]


def load_file(path: str | Path, fmt: str = "auto", task: str | None = None) -> list[Example]:
    """Examples from one file; ``task`` names them (default: the category, or the format's name)."""
    p = resolve_path(str(path))
    if p.is_dir():
        raise DataError(f"data path '{p}' is a folder; name a .json or .jsonl file")
    return convert(read_records(p), fmt, task, str(p))


def task_from_filename(path: str) -> str:
    """'finance/fpb_test.jsonl' -> 'fpb'; 'gsm8k/train.jsonl' -> 'gsm8k'."""
    p = Path(path)
    stem = re.sub(r"(_|-)?(train|test|dev|small|\d+k?)$", "", p.stem)
    return stem or p.parent.name


def load_hf(name: str, split: str, fmt: str = "auto") -> list[Example]:
    """A Hugging Face Hub dataset (needs the `datasets` package and internet)."""
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        raise DataError("data.source 'hf' needs the `datasets` package: pip install datasets") from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # the hub raises many types; report them all the same way
        raise DataError(f"could not load Hugging Face dataset '{name}' split '{split}': {exc}") from None
    return convert([dict(r) for r in ds], fmt, None, f"hf:{name}")


@dataclass(frozen=True)
class DollySplit:
    clients: list[list[Example]]  # the pre-split client files, in order
    global_test: list[Example]


def load_dolly(path: str) -> DollySplit:
    """Dolly-15k as FedIT splits it: local_training_<i>.json per client and global_test.json."""
    root = resolve_path(path)
    if root.is_file():
        rows = load_file(root, "dolly")
        return DollySplit(clients=[rows], global_test=[])
    files = sorted(root.glob("local_training_*.json"), key=lambda p: int(p.stem.rsplit("_", 1)[-1]))
    if not files:
        raise DataError(f"{root}: no local_training_<i>.json client files (the FedIT Dolly split)")
    clients = [load_file(f, "dolly") for f in files]
    test_file = root / "global_test.json"
    global_test = load_file(test_file, "dolly") if test_file.exists() else []
    return DollySplit(clients=clients, global_test=global_test)
