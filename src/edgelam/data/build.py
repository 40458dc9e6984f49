"""Turn a DataConfig into federated data: per-client train and held-out sets, global eval per task."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from edgelam.config import DataConfig
from edgelam.data import partition, synthetic
from edgelam.data.format import encode
from edgelam.data.poison import DataPoison
from edgelam.data.sources import (
    DataError,
    Example,
    convert,
    data_root,
    load_dolly,
    load_hf,
    read_records,
    resolve_path,
    task_from_filename,
)
from edgelam.store import Purpose, rng_for


@dataclass(frozen=True)
class ClientData:
    """A client's samples, of the run's task's kind (tasks/): ``Encoded`` here (causal LM),
    ``data.classification.Labeled`` for classification; each has ``input_ids`` and ``task``."""

    id: int
    train: list[Any]
    heldout: list[Any]

    @property
    def tasks(self) -> list[str]:
        return sorted({e.task for e in self.train})


@dataclass(frozen=True)
class FederatedData:
    clients: list[ClientData]
    global_eval: dict[str, list[Any]]  # data task -> encoded eval examples (the task's samples)
    eval_examples: dict[str, list[Example]]  # the same, as text (for generation)
    description: str
    backdoor: list[Any] = dataclasses.field(default_factory=list)  # triggered eval samples (fl.attack backdoor)


def _load_files(files: Sequence[str], fmt: str) -> list[Example]:
    out: list[Example] = []
    for spec in files:
        path, _, task = spec.partition("::")
        p = resolve_path(path)
        records = read_records(p)
        examples = convert(records, fmt, task or None, str(p))
        if not task and "category" not in records[0][1]:
            name = task_from_filename(path)
            examples = [dataclasses.replace(e, task=name) for e in examples]
        out.extend(examples)
    return out


def _drop_empty(examples: list[Example]) -> tuple[list[Example], list[Example]]:
    """(examples with an answer, those without): an empty answer has nothing to train on."""
    return [e for e in examples if not e.is_empty], [e for e in examples if e.is_empty]


def _empty_note(dropped: list[Example]) -> str:
    if not dropped:
        return ""
    where = ", ".join(e.origin for e in dropped[:3]) + (", ..." if len(dropped) > 3 else "")
    return f"; {len(dropped)} records with an empty answer skipped ({where})"


def _hold_out_global(pool: list[Example], per_task: int, seed: int) -> tuple[list[Example], list[Example]]:
    """Take ``per_task`` examples of each task out of ``pool`` as the global eval set."""
    rng = rng_for(seed, Purpose.EVAL_SPLIT)
    labels = [e.task for e in pool]
    held: set[int] = set()
    for task in sorted(set(labels)):
        idx = [i for i, t in enumerate(labels) if t == task]
        k = min(per_task, len(idx) // 2)
        held.update(int(i) for i in rng.permutation(idx)[:k])
    rest = [e for i, e in enumerate(pool) if i not in held]
    return rest, [pool[i] for i in sorted(held)]


def _partition(cfg: DataConfig, pool: list[Example], seed: int) -> list[list[Example]]:
    rng = rng_for(seed, Purpose.PARTITION)
    labels = [e.task for e in pool]
    if cfg.partition == "iid":
        parts = partition.iid(len(pool), cfg.num_clients, rng)
    elif cfg.partition == "dirichlet":
        parts = partition_or_explain(lambda: partition.dirichlet(labels, cfg.num_clients, cfg.dirichlet_alpha, rng), cfg)
    elif cfg.partition == "by_task":
        tasks = sorted(set(labels))
        client_tasks = [list(t) for t in cfg.client_tasks] or partition.default_client_tasks(tasks, cfg.num_clients)
        parts = partition_or_explain(lambda: partition.by_task(labels, client_tasks, rng), cfg)
    else:
        raise DataError(f"data.partition '{cfg.partition}' is not available for data.source '{cfg.source}'")
    return [[pool[i] for i in p] for p in parts]


def partition_or_explain(fn: Callable[[], list[list[int]]], cfg: DataConfig) -> list[list[int]]:
    """Run a partitioner; its ValueError (too few examples, a task nobody has) becomes a DataError with a fix."""
    fix = {"dirichlet": "lower data.num_clients, give more examples or raise data.dirichlet_alpha",
           "by_task": "name tasks the data holds in data.client_tasks"}.get(cfg.partition, "lower data.num_clients")
    try:
        return fn()
    except ValueError as exc:
        raise DataError(f"data.partition '{cfg.partition}' over {cfg.num_clients} clients: {exc}; {fix}") from None


def _source(cfg: DataConfig, seed: int) -> tuple[list[list[Example]] | None, list[Example], list[Example], str]:
    """(pre-split client lists or None, pool, global eval examples, description)."""
    if cfg.source == "synthetic":
        tasks = list(cfg.tasks) or sorted(synthetic.TASKS)
        pool = [e for t in tasks for e in synthetic.generate(t, cfg.examples_per_task, seed, stream=0)]
        evals = [e for t in tasks for e in synthetic.generate(t, cfg.global_eval_per_task, seed, stream=1)]
        return None, pool, evals, f"EdgeLAM synthetic multi-task set ({', '.join(tasks)})"
    if cfg.source == "dolly":
        split = load_dolly(cfg.path or "dolly15k")
        desc = f"Dolly-15k from {resolve_path(cfg.path or 'dolly15k')}"
        if cfg.partition == "presplit":
            if cfg.num_clients > len(split.clients):
                raise DataError(f"data.num_clients {cfg.num_clients} > {len(split.clients)} pre-split Dolly client files")
            clients = split.clients[: cfg.num_clients]
            if split.global_test:
                return clients, [], split.global_test, desc
            rest, evals = _hold_out_global([e for c in clients for e in c], cfg.global_eval_per_task, seed)
            kept = set(map(id, rest))
            return [[e for e in c if id(e) in kept] for c in clients], [], evals, desc
        pool = [e for c in split.clients for e in c]
        if split.global_test:
            return None, pool, split.global_test, desc
        rest, evals = _hold_out_global(pool, cfg.global_eval_per_task, seed)
        return None, rest, evals, desc
    pool = _load_files(cfg.files, cfg.format) if cfg.source == "files" else load_hf(cfg.hf_name or "", cfg.hf_split, cfg.format)
    rest, evals = _hold_out_global(pool, cfg.global_eval_per_task, seed)
    return None, rest, evals, f"{cfg.source}: {', '.join(cfg.files) if cfg.files else cfg.hf_name}"


def resolve_auto(cfg: DataConfig) -> tuple[DataConfig, str]:
    """Pick Dolly-15k if its client files are found, else the synthetic set; say which, in one line."""
    if cfg.source != "auto":
        return cfg, ""
    try:
        root = resolve_path(cfg.path or "dolly15k")
        found = root.is_dir() and any(root.glob("local_training_*.json"))
    except DataError:
        found, root = False, data_root() / (cfg.path or "dolly15k")
    if found:
        return dataclasses.replace(cfg, source="dolly"), f"data: Dolly-15k from {root}"
    partition = "dirichlet" if cfg.partition == "presplit" else cfg.partition
    line = f"data: Dolly-15k not found at {root} (set EDGELAM_DATA); using EdgeLAM's synthetic multi-task set"
    return dataclasses.replace(cfg, source="synthetic", partition=partition, path=None), line


def build_federated_data(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int,
                         poison: DataPoison | None = None) -> FederatedData:
    """Load, partition, split held-out data and tokenize, all determined by ``seed``; ``poison``
    edits the malicious clients' examples (fl.attack label_flip / backdoor) before tokenizing."""
    if cfg.source == "auto":
        raise ValueError("resolve data.source 'auto' with data.build.resolve_auto() first")
    presplit, pool, evals, desc = _source(cfg, seed)
    pool, dropped = _drop_empty(pool)
    evals, dropped_eval = _drop_empty(evals)
    if presplit is not None:
        kept = [_drop_empty(c) for c in presplit]
        presplit = [c for c, _ in kept]
        dropped += [e for _, d in kept for e in d]
    desc += _empty_note(dropped + dropped_eval)
    client_examples = presplit if presplit is not None else _partition(cfg, pool, seed)
    clients = []
    for k, examples in enumerate(client_examples):
        rng = rng_for(seed, Purpose.HELDOUT, k)
        if cfg.max_examples_per_client is not None and len(examples) > cfg.max_examples_per_client:
            keep = sorted(int(i) for i in rng.permutation(len(examples))[: cfg.max_examples_per_client])
            examples = [examples[i] for i in keep]
        if not examples:
            raise DataError(f"client {k} received no examples; use fewer clients or another partition")
        if poison is not None:
            examples = poison.examples(k, len(client_examples), examples)
        labels = [e.task for e in examples]
        train_idx, held_idx = partition.heldout_split(range(len(examples)), labels, cfg.heldout_fraction, rng)
        clients.append(ClientData(
            id=k,
            train=[encode(examples[i], tokenizer, cfg.max_length) for i in train_idx],
            heldout=[encode(examples[i], tokenizer, cfg.max_length) for i in held_idx],
        ))
    eval_examples: dict[str, list[Example]] = {}
    for e in evals:
        eval_examples.setdefault(e.task, []).append(e)
    global_eval = {t: [encode(e, tokenizer, cfg.max_length) for e in xs] for t, xs in sorted(eval_examples.items())}
    backdoor = ([encode(e, tokenizer, cfg.max_length) for e in poison.trigger_examples(evals)]
                if poison is not None and poison.kind == "backdoor" else [])
    return FederatedData(clients=clients, global_eval=global_eval, eval_examples=eval_examples, description=desc,
                         backdoor=backdoor)
