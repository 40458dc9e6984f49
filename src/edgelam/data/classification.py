"""Text classification data for split learning with an encoder: SST-2 and AG News (TSV files).

Layout under $EDGELAM_DATA (see its README): ``sst2_agnews/SST-2/{train,test}.tsv`` with a
``sentence<TAB>label`` header and 0/1 labels (test.tsv is the labelled GLUE dev set), and
``sst2_agnews/agnews/{dev,test}.tsv`` without a header, ``text<TAB>class name`` (dev.tsv is a
balanced sample of the training set). Clients draw from the training file, evaluation uses test.tsv.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from edgelam.config import DataConfig
from edgelam.data import partition
from edgelam.data.sources import DataError, resolve_path
from edgelam.store import rng_for


@dataclass(frozen=True)
class Source:
    folder: str
    train: str
    test: str
    header: bool
    classes: tuple[str, ...]
    labels: dict[str, str]  # label as written in the file -> class name


SOURCES = {
    "sst2": Source("sst2_agnews/SST-2", "train.tsv", "test.tsv", True, ("negative", "positive"),
                   {"0": "negative", "1": "positive"}),
    "agnews": Source("sst2_agnews/agnews", "dev.tsv", "test.tsv", False, ("World", "Sports", "Business", "Sci/Tech"),
                     {c: c for c in ("World", "Sports", "Business", "Sci/Tech")}),
}


@dataclass(frozen=True)
class Labeled:
    input_ids: tuple[int, ...]
    label: int
    task: str


@dataclass(frozen=True)
class ClassData:
    clients: list[list[Labeled]]
    test: list[Labeled]
    classes: tuple[str, ...]
    description: str


def read_tsv(path: Path, src: Source) -> list[tuple[str, int]]:
    """(text, class index) rows; a malformed line is an error naming the file and line."""
    if not path.is_file():
        raise DataError(f"{path} not found; set EDGELAM_DATA to the folder holding sst2_agnews/ or data.path to the data folder")
    rows = []
    index = {name: i for i, name in enumerate(src.classes)}
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if n == 1 and src.header:
                continue
            line = line.rstrip("\n")
            if not line.strip():
                continue
            text, sep, label = line.rpartition("\t")
            if not sep or label.strip() not in src.labels:
                raise DataError(f"{path}:{n}: expected 'text<TAB>label' with label in {sorted(src.labels)}, got {line[:80]!r}")
            rows.append((text.strip(), index[src.labels[label.strip()]]))
    if not rows:
        raise DataError(f"{path} holds no examples")
    return rows


def tokenize(rows: list[tuple[str, int]], tokenizer: PreTrainedTokenizerBase, max_length: int, task: str) -> list[Labeled]:
    ids = tokenizer([t for t, _ in rows], truncation=True, max_length=max_length)["input_ids"]
    return [Labeled(tuple(i), lab, task) for i, (_, lab) in zip(ids, rows)]


def build_classification(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int, eval_max: int | None) -> ClassData:
    """Sample ``num_clients * max_examples_per_client`` training examples, partition them (iid or
    Dirichlet over labels) and tokenize; the test set is ``eval_max`` examples of test.tsv (all if None)."""
    src = SOURCES[cfg.source]
    folder = resolve_path(cfg.path or src.folder)
    train = read_tsv(folder / src.train, src)
    test = read_tsv(folder / src.test, src)
    per_client = cfg.max_examples_per_client or 64
    want = cfg.num_clients * per_client
    if want > len(train):
        raise DataError(f"{cfg.num_clients} clients x {per_client} examples = {want} > the {len(train)} in {folder / src.train}; "
                        f"lower data.max_examples_per_client")
    rng = rng_for(seed, 20)
    pool = [train[int(i)] for i in rng.choice(len(train), size=want, replace=False)]
    labels = [src.classes[lab] for _, lab in pool]
    if cfg.partition == "dirichlet":
        parts = partition.dirichlet(labels, cfg.num_clients, cfg.dirichlet_alpha, rng_for(seed, 21))
    elif cfg.partition == "iid":
        parts = partition.iid(len(pool), cfg.num_clients, rng_for(seed, 21))
    else:
        raise DataError(f"data.partition '{cfg.partition}' does not apply to {cfg.source}; use iid or dirichlet")
    if eval_max is not None and eval_max < len(test):
        test = [test[int(i)] for i in sorted(rng_for(seed, 22).choice(len(test), size=eval_max, replace=False))]
    clients = [tokenize([pool[i] for i in part], tokenizer, cfg.max_length, cfg.source) for part in parts]
    desc = (f"{cfg.source} ({folder}): {want} training examples over {cfg.num_clients} clients ({cfg.partition}), "
            f"{len(test)} test examples, {len(src.classes)} classes")
    return ClassData(clients, tokenize(test, tokenizer, cfg.max_length, cfg.source), src.classes, desc)


def collate_labeled(batch: list[Labeled], pad_id: int) -> dict[str, Tensor]:
    """Right-pad: input_ids and attention_mask (B, T), labels (B,)."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[i, : len(e.input_ids)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([e.label for e in batch], dtype=torch.long)}
