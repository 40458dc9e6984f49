"""Text classification data for split learning with an encoder: SST-2 and AG News (TSV files), or synthetic.

Layout under $EDGELAM_DATA (see its README): ``sst2_agnews/SST-2/{train,test}.tsv`` with a
``sentence<TAB>label`` header and 0/1 labels (test.tsv is the labelled GLUE dev set), and
``sst2_agnews/agnews/{dev,test}.tsv`` without a header, ``text<TAB>class name`` (dev.tsv is a
balanced sample of the training set). Clients draw from the training file, evaluation uses test.tsv.
Without those files, ``synthetic_sentiment`` (2 classes, like SST-2) and ``synthetic_topics``
(4, like AG News) generate a seeded set whose labels follow from cue words.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from edgelam.config import ConfigError, DataConfig
from edgelam.data import partition
from edgelam.data.build import partition_or_explain
from edgelam.data.poison import DataPoison
from edgelam.data.sources import DataError, resolve_path
from edgelam.store import Purpose, rng_for


@dataclass(frozen=True)
class Source:
    folder: str
    train: str
    test: str
    header: bool
    classes: tuple[str, ...]
    labels: dict[str, str]  # label as written in the file -> class name


SYNTHETIC_TEST = 500  # test examples of a synthetic source when eval.max_per_task is null

SOURCES = {
    "sst2": Source("sst2_agnews/SST-2", "train.tsv", "test.tsv", True, ("negative", "positive"),
                   {"0": "negative", "1": "positive"}),
    "agnews": Source("sst2_agnews/agnews", "dev.tsv", "test.tsv", False, ("World", "Sports", "Business", "Sci/Tech"),
                     {c: c for c in ("World", "Sports", "Business", "Sci/Tech")}),
}


@dataclass(frozen=True)
class Synthetic:
    """A seeded classification set whose label follows from its words: every sentence holds two
    cue words of its class (the classes' cue lists are disjoint) in a neutral template."""
    classes: tuple[str, ...]
    cues: tuple[tuple[str, ...], ...]  # per class
    neutral: tuple[str, ...]  # the {w} slot, shared by every class
    templates: tuple[str, ...]  # with {a} and {b} (cue words) and {w}


def _words(*groups: str) -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(g.split()) for g in groups)


# Offline stand-ins with the shapes of SST-2 (2 classes) and AG News (4 topics).
SYNTHETIC = {
    "synthetic_sentiment": Synthetic(
        ("negative", "positive"),
        _words("dull boring awful weak clumsy tedious bland messy painful lifeless",
               "great moving clever warm brilliant charming lovely gripping funny superb"),
        _words("film story plot cast ending script score movie sequel director")[0],
        ("the {w} was {a} and {b} .", "a {a} , {b} {w} .", "i found the {w} {a} , even {b} .",
         "{a} from start to end : a {b} {w} ."),
    ),
    "synthetic_topics": Synthetic(
        ("sports", "weather", "food", "music"),
        _words("goal match coach league striker referee stadium tournament",
               "rain storm forecast snow wind sunshine thunder humidity",
               "recipe soup bread pasta spice oven dessert flavor",
               "guitar concert album melody drummer chorus singer rhythm"),
        _words("today yesterday tonight lately downtown again abroad locally")[0],
        ("news {w} : the {a} and the {b} .", "people talked about the {a} {w} , then the {b} .",
         "a report on the {a} and a {b} {w} .", "{w} , the {b} came before the {a} ."),
    ),
}


def synthetic_rows(name: str, n: int, seed: int, stream: int) -> list[tuple[str, int]]:
    """``n`` (sentence, class index) rows of ``SYNTHETIC[name]``; the same for the same
    (seed, stream): stream 0 trains, stream 1 tests."""
    spec = SYNTHETIC[name]
    rng = rng_for(seed, Purpose.CLASS_POOL, list(SYNTHETIC).index(name), stream)
    rows = []
    for _ in range(n):
        label = int(rng.integers(len(spec.classes)))
        a, b = (str(w) for w in rng.choice(spec.cues[label], size=2, replace=False))
        w = spec.neutral[int(rng.integers(len(spec.neutral)))]
        rows.append((spec.templates[int(rng.integers(len(spec.templates)))].format(a=a, b=b, w=w), label))
    return rows


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
    test_text: tuple[str, ...] = ()  # the test examples' texts, in the order of ``test``
    backdoor: tuple[Labeled, ...] = ()  # triggered test examples labelled with the target (fl.attack backdoor)


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


def _train_test(cfg: DataConfig, seed: int, want: int, eval_max: int | None
                ) -> tuple[list[tuple[str, int]], list[tuple[str, int]], tuple[str, ...], str]:
    """(training rows, test rows, class names, where they come from)."""
    if cfg.source in SYNTHETIC:
        spec = SYNTHETIC[cfg.source]
        test = synthetic_rows(cfg.source, eval_max or SYNTHETIC_TEST, seed, stream=1)
        return synthetic_rows(cfg.source, want, seed, stream=0), test, spec.classes, f"EdgeLAM synthetic, seed {seed}"
    src = SOURCES[cfg.source]
    folder = resolve_path(cfg.path or src.folder)
    return read_tsv(folder / src.train, src), read_tsv(folder / src.test, src), src.classes, str(folder / src.train)


def build_classification(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int, eval_max: int | None,
                         poison: DataPoison | None = None) -> ClassData:
    """Sample ``num_clients * max_examples_per_client`` training examples, partition them (iid or
    Dirichlet over labels) and tokenize; the test set is ``eval_max`` examples of test.tsv (all if None).
    ``poison`` edits the malicious clients' rows (fl.attack label_flip / backdoor) before tokenizing.

    There is no per-client held-out share: the split driver evaluates on the test set, so a
    ``data.heldout_fraction`` other than its default or 0 is a ConfigError rather than ignored."""
    if cfg.heldout_fraction not in (0.0, DataConfig.heldout_fraction):
        raise ConfigError(f"data.heldout_fraction does not apply to classification data ({cfg.source}): split runs "
                          f"evaluate on the source's test set (eval.max_per_task examples) and keep no per-client "
                          f"held-out share; remove the key or set it to 0 (got {cfg.heldout_fraction})")
    per_client = cfg.max_examples_per_client or 64
    want = cfg.num_clients * per_client
    train, test, classes, where = _train_test(cfg, seed, want, eval_max)
    if want > len(train):
        raise DataError(f"{cfg.num_clients} clients x {per_client} examples = {want} > the {len(train)} in {where}; "
                        f"lower data.max_examples_per_client")
    rng = rng_for(seed, Purpose.CLASS_POOL)
    pool = [train[int(i)] for i in rng.choice(len(train), size=want, replace=False)]
    labels = [classes[lab] for _, lab in pool]
    part_rng = rng_for(seed, Purpose.CLASS_PARTITION)
    if cfg.partition == "dirichlet":
        parts = partition_or_explain(lambda: partition.dirichlet(labels, cfg.num_clients, cfg.dirichlet_alpha, part_rng), cfg)
    elif cfg.partition == "iid":
        parts = partition.iid(len(pool), cfg.num_clients, part_rng)
    else:
        raise DataError(f"data.partition '{cfg.partition}' does not apply to {cfg.source}; use iid or dirichlet")
    if eval_max is not None and eval_max < len(test):
        test = [test[int(i)] for i in sorted(rng_for(seed, Purpose.CLASS_TEST).choice(len(test), size=eval_max, replace=False))]
    rows = [[pool[i] for i in part] for part in parts]
    if poison is not None:
        rows = [poison.rows(k, len(rows), r, classes) for k, r in enumerate(rows)]
    clients = [tokenize(r, tokenizer, cfg.max_length, cfg.source) for r in rows]
    backdoor = (tuple(tokenize(poison.trigger_rows(test, classes), tokenizer, cfg.max_length, cfg.source))
                if poison is not None and poison.kind == "backdoor" else ())
    desc = (f"{cfg.source} ({where}): {want} training examples over {cfg.num_clients} clients ({cfg.partition}), "
            f"{len(test)} test examples, {len(classes)} classes")
    return ClassData(clients, tokenize(test, tokenizer, cfg.max_length, cfg.source), classes, desc,
                     tuple(text for text, _ in test), backdoor)


def collate_labeled(batch: list[Labeled], pad_id: int) -> dict[str, Tensor]:
    """Right-pad: input_ids and attention_mask (B, T), labels (B,)."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[i, : len(e.input_ids)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([e.label for e in batch], dtype=torch.long)}
