"""Readers for the instruction-data formats EdgeLAM uses, from any folder or the Hugging Face Hub.

Formats (auto-detected from the first record's keys; every record is then checked against it):
  dolly              {instruction, context, response, category}
  alpaca             {instruction, input, output}
  gsm8k              {question, answer}
  fingpt             {context, target}   (context is the whole prompt)
  messages           {messages: [{role, content}, ...]}   (system/user/assistant; loss on assistant turns)
  prompt_completion  {prompt, completion}
  text               {text}   (plain causal LM: loss on every token)
Files are a JSON array or JSON lines. Relative paths resolve against $EDGELAM_DATA
(default ../shared/data) when they do not exist as given.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
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
    # chat (messages format): every (role, content) turn; the last is the assistant answer in ``response``
    turns: tuple[tuple[str, str], ...] = ()
    plain: bool = False  # text format: no chat template, loss on every token of ``response``
    origin: str = field(default="", compare=False)  # 'file line 21', for messages about this record

    @property
    def is_empty(self) -> bool:
        """No answer to learn: a blank response (for a chat, every assistant turn blank)."""
        if self.turns:
            return not any(c.strip() for r, c in self.turns if r == "assistant")
        return not self.response.strip()


FORMAT_KEYS: dict[str, tuple[str, ...]] = {
    "dolly": ("instruction", "context", "response"),
    "alpaca": ("instruction", "input", "output"),
    "gsm8k": ("question", "answer"),
    "fingpt": ("context", "target"),
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),  # last: the most generic keys
}
ROLES = ("system", "user", "assistant")

Record = tuple[str, dict[str, Any]]  # (where in its file: 'line 21' or 'record 3', the record)


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


def read_records(path: Path) -> list[Record]:
    """Records of a JSON array ('record 3') or a JSON-lines file ('line 21'), each with where it is."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    records: list[tuple[str, Any]] = []
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg})") from None
        except RecursionError:
            raise DataError(f"{path}: JSON nested too deep to read") from None
        records = [(f"record {i}", r) for i, r in enumerate(rows, start=1)]
    else:
        # split on '\n' only: str.splitlines() also breaks at U+2028, which JSON strings may hold
        for n, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                records.append((f"line {n}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {n}: not valid JSON ({exc.msg} at column {exc.colno}); "
                                f"a JSON-lines file holds one JSON object per line") from None
            except RecursionError:
                raise DataError(f"{path} line {n}: JSON nested too deep to read") from None
    for where, r in records:
        if not isinstance(r, dict):
            raise DataError(f"{path} {where}: every record must be a JSON object {{...}}, got a {type(r).__name__}")
    return records


def detect_format(record: dict[str, Any], where: str) -> str:
    for name, keys in FORMAT_KEYS.items():
        if all(k in record for k in keys):
            return name
    raise DataError(
        f"{where}: cannot tell the format from keys {sorted(record)}; "
        f"expected one of {{{'; '.join(f'{n}: {list(k)}' for n, k in FORMAT_KEYS.items())}}}"
    )


def _check_messages(msgs: Any, where: str) -> None:
    """A chat: a list of {role, content} with roles in ROLES, a user turn first (after any
    system turns) and an assistant turn last."""
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(msgs, start=1):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {i} must be {{\"role\": one of {list(ROLES)}, \"content\": text}}, "
                            f"got {json.dumps(m)[:120]}")
    roles = [m["role"] for m in msgs if m["role"] != "system"]
    if not roles or roles[0] != "user" or roles[-1] != "assistant":
        raise DataError(f"{where}: a chat must start with a user message (after any system messages) and end with "
                        f"an assistant message, the answer to learn; got roles {[m['role'] for m in msgs]}")


def check_record(record: dict[str, Any], fmt: str, where: str, detected: bool) -> None:
    """Raise a DataError naming ``where``, the record's keys and the expected ones unless it fits ``fmt``."""
    keys = FORMAT_KEYS[fmt]
    missing = [k for k in keys if k not in record]
    if missing:
        how = "detected from the first record" if detected else "set by data.format"
        raise DataError(f"{where}: keys {sorted(record)} do not fit format '{fmt}' ({how}), which expects "
                        f"{list(keys)} (missing {missing}); every record of a file must have the same format")
    if fmt == "messages":
        _check_messages(record["messages"], where)
        return
    for k in keys:
        if isinstance(record[k], (list, dict)):
            hint = "; a chat goes in the 'messages' format" if isinstance(record[k], list) else ""
            raise DataError(f"{where}: '{k}' must be text, got a JSON {type(record[k]).__name__}{hint}")


def to_example(record: dict[str, Any], fmt: str, task: str | None, origin: str = "") -> Example:
    def s(key: str) -> str:
        value = record.get(key, "")
        return "" if value is None else str(value)

    if fmt == "dolly":
        return Example(s("instruction"), s("context"), s("response"), task or s("category") or "dolly", origin=origin)
    if fmt == "alpaca":
        return Example(s("instruction"), s("input"), s("output"), task or "alpaca", origin=origin)
    if fmt == "gsm8k":
        return Example(s("question"), "", s("answer"), task or "math", origin=origin)
    if fmt == "fingpt":
        return Example(s("context"), "", s("target"), task or "finance", origin=origin)
    if fmt == "prompt_completion":
        return Example(s("prompt"), "", s("completion"), task or "completion", origin=origin)
    if fmt == "text":
        return Example("", "", s("text"), task or "text", plain=True, origin=origin)
    if fmt == "messages":
        turns = tuple((str(m["role"]), str(m["content"])) for m in record["messages"])
        user = [c for r, c in turns if r == "user"]
        return Example(user[-1] if user else "", "", turns[-1][1], task or "chat", turns=turns, origin=origin)
    raise AssertionError(f"convert() checks the format first (got '{fmt}')")


def convert(records: Sequence[Record], fmt: str, task: str | None, where: str) -> list[Example]:
    """Examples of ``records``; the format is ``fmt`` or, for 'auto', the first record's, and
    every record is checked against it."""
    if not records:
        raise DataError(f"{where}: no records")
    if fmt != "auto" and fmt not in FORMAT_KEYS:
        raise DataError(f"unknown data format '{fmt}'; allowed: {list(FORMAT_KEYS)}")
    detected = fmt == "auto"
    if detected:
        fmt = detect_format(records[0][1], f"{where} {records[0][0]}")
    out = []
    for loc, record in records:
        check_record(record, fmt, f"{where} {loc}", detected)
        out.append(to_example(record, fmt, task, f"{where} {loc}"))
    return out


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
        raise DataError(f"could not load Hugging Face dataset '{name}' split '{split}': {exc}; without internet, "
                        f"HF_HUB_OFFLINE=1 uses the local cache only (and fails at once), or save the data as "
                        f"JSON lines and use data.source files") from None
    return convert([(f"record {i}", dict(r)) for i, r in enumerate(ds, start=1)], fmt, None, f"hf:{name}")


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
