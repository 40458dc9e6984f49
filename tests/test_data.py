"""Loaders of every format, synthetic tasks, chat formatting with response-only loss."""

import json
from pathlib import Path

import pytest

from edgelam.config import DataConfig
from edgelam.data import synthetic
from edgelam.data.build import build_federated_data, resolve_auto
from edgelam.data.format import IGNORE, collate, encode
from edgelam.data.sources import DataError, Example, load_dolly, load_file, task_from_filename

from conftest import data_dir


@pytest.mark.parametrize("row, expected", [
    ({"instruction": "i", "context": "c", "response": "r", "category": "open_qa"}, Example("i", "c", "r", "open_qa")),
    ({"instruction": "i", "input": "x", "output": "o"}, Example("i", "x", "o", "alpaca")),
    ({"question": "q", "answer": "a #### 4"}, Example("q", "", "a #### 4", "math")),
    ({"context": "prompt", "target": "positive"}, Example("prompt", "", "positive", "finance")),
])
def test_formats_autodetected_json_and_jsonl(tmp_path: Path, row, expected):
    (tmp_path / "a.json").write_text(json.dumps([row, row]))
    (tmp_path / "b.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    assert load_file(tmp_path / "a.json") == [expected, expected]
    assert load_file(tmp_path / "b.jsonl") == [expected, expected]


def test_unknown_format_names_the_keys(tmp_path: Path):
    (tmp_path / "x.json").write_text(json.dumps([{"foo": 1}]))
    with pytest.raises(DataError, match=r"cannot tell the format from keys \['foo'\]"):
        load_file(tmp_path / "x.json")


def test_malformed_json(tmp_path: Path):
    (tmp_path / "x.json").write_text("[{oops")
    with pytest.raises(DataError, match="not valid JSON"):
        load_file(tmp_path / "x.json")


def test_task_names_from_files():
    assert task_from_filename("finance/fpb_test.jsonl") == "fpb"
    assert task_from_filename("gsm8k/train.jsonl") == "gsm8k"
    assert task_from_filename("code_alpaca/code_alpaca_2k.json") == "code_alpaca"


def test_synthetic_is_deterministic_and_checkable():
    a = synthetic.generate("arithmetic", 5, seed=3)
    assert a == synthetic.generate("arithmetic", 5, seed=3)
    assert a != synthetic.generate("arithmetic", 5, seed=4)
    for ex in a:
        x, y = ex.instruction.split("What is ")[1].split("?")[0].split(" + ")
        assert ex.response == str(int(x) + int(y))
        assert synthetic.is_correct(ex, f" {ex.response}.")
    rev = synthetic.generate("reverse", 3, seed=0)
    assert all(r.response[::-1] in r.instruction for r in rev)


def test_encode_masks_the_prompt(tiny):
    tok = tiny.tokenizer
    ex = Example("Say hi", "", "hello", "t")
    enc = encode(ex, tok, 128)
    answer = [i for i, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE]
    assert tok.decode(answer).startswith("hello")
    assert enc.labels[0] == IGNORE
    assert len(enc.input_ids) == len(enc.labels)


def test_encode_truncates_long_prompts_keeping_the_answer(tiny):
    ex = Example("x" * 500, "", "answer", "t")
    enc = encode(ex, tiny.tokenizer, 64)
    assert len(enc.input_ids) == 64
    assert tiny.tokenizer.decode([i for i, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE]).startswith("answer")


def test_collate_pads_right(tiny):
    a = encode(Example("a", "", "b", "t"), tiny.tokenizer, 64)
    b = encode(Example("a longer prompt", "", "b", "t"), tiny.tokenizer, 64)
    batch = collate([a, b], pad_id=0)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert int(batch["attention_mask"][0].sum()) == len(a.input_ids)
    assert (batch["labels"][0, len(a.input_ids):] == IGNORE).all()


def test_build_by_task_and_global_eval(tiny):
    cfg = DataConfig(source="synthetic", tasks=("arithmetic", "reverse"), examples_per_task=20, num_clients=2,
                     partition="by_task", global_eval_per_task=4)
    data = build_federated_data(cfg, tiny.tokenizer, seed=0)
    assert [c.tasks for c in data.clients] == [["arithmetic"], ["reverse"]]
    assert sorted(data.global_eval) == ["arithmetic", "reverse"]
    assert all(len(v) == 4 for v in data.global_eval.values())
    assert all(c.heldout for c in data.clients)


def test_auto_falls_back_to_synthetic(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGELAM_DATA", str(tmp_path))
    cfg, line = resolve_auto(DataConfig(source="auto", partition="presplit"))
    assert cfg.source == "synthetic" and cfg.partition == "dirichlet"
    assert "synthetic" in line


@pytest.mark.skipif(not (data_dir() / "dolly15k").is_dir(), reason="real Dolly split not found; set EDGELAM_DATA")
def test_real_dolly_presplit(tiny):
    split = load_dolly("dolly15k")
    assert len(split.clients) == 10 and len(split.global_test) == 80
    cfg = DataConfig(source="dolly", partition="presplit", num_clients=10, max_examples_per_client=20)
    data = build_federated_data(cfg, tiny.tokenizer, seed=0)
    assert len(data.global_eval) == 8 and all(len(v) == 10 for v in data.global_eval.values())
    # FedIT's split is non-IID: each client holds 1-3 categories
    assert all(1 <= len({e.task for e in c.train + c.heldout}) <= 3 for c in data.clients)
