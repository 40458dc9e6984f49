"""Split learning: the cut model's gradients, the wire, and the split runs end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.nn import functional as F

from edgelam.config import ConfigError, LoraConfig
from edgelam.config_load import load_config
from edgelam.models.split import build_split
from edgelam.split.step import leaves, plan, step
from edgelam.split.wire import encode, wire_bytes
from conftest import needs_sst2

TEXTS = ["hello world, this is a test", "short", "another sentence that is rather longer than the others"]


def _model(name: str, targets: tuple[str, ...], cut: tuple[int, int], embedding_lora: bool):
    sm = build_split(name, LoraConfig(4, 8, 0.0, targets), cut, 3, embedding_lora, seed=1)
    with torch.no_grad():  # non-zero B so every LoRA tensor gets a gradient
        gen = torch.Generator().manual_seed(0)
        for n, p in sm.peft.named_parameters():
            if "lora_B" in n or "lora_embedding_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return sm


def _batch(sm):
    enc = sm.tokenizer(TEXTS, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    labels = ids.masked_fill(mask == 0, -100) if sm.decoder else torch.tensor([0, 2, 1])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _split_vs_unsplit(sm, codec: str) -> tuple[float, float, float]:
    """(split loss, Hugging Face loss, worst relative gradient difference over all trainable tensors)."""
    batch = _batch(sm)
    dev_state, srv_state = sm.initial_state()
    device = {s: leaves(dev_state, s) for s in ("front", "back")}
    server = leaves(srv_state, "middle")
    res = step(sm, device, server, batch, codec, codec)
    assert plan(sm, batch, codec, codec).total("up") == sum(v for k, v in res.bytes.items() if k.endswith("_up"))
    sm.peft.zero_grad()
    sm.back.zero_grad()
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    if sm.decoder:  # the reference: the unsplit model's own forward pass and loss
        ref_loss = sm.peft(input_ids=ids, attention_mask=mask, labels=labels).loss
    else:
        hidden = sm.peft(input_ids=ids, attention_mask=mask).last_hidden_state
        ref_loss = F.cross_entropy(sm.back.head(hidden, mask), labels)
    ref_loss.backward()
    worst, count = 0.0, 0
    for seg, got in (("front", device["front"]), ("back", device["back"]), ("middle", server)):
        ref = sm.trainable(seg)
        for name, t in got.items():
            assert t.grad is not None, f"{seg}.{name} got no gradient"
            diff = (t.grad - ref[name].grad).abs().max() / ref[name].grad.abs().max().clamp_min(1e-12)
            worst, count = max(worst, float(diff)), count + 1
    assert count > 0
    return res.loss, float(ref_loss.detach()), worst


@pytest.mark.parametrize("name,targets", [("tiny-encoder", ("query", "value")), ("tiny", ("q_proj", "v_proj"))])
def test_split_gradients_equal_unsplit(name: str, targets: tuple[str, ...]) -> None:
    sm = _model(name, targets, (1, 2), embedding_lora=True)  # a block on each side, LoRA on the embeddings too
    try:
        loss, ref, worst = _split_vs_unsplit(sm, "float32")
        assert loss == pytest.approx(ref, rel=1e-6)
        assert worst < 1e-5
        # int8 activations and gradients change them measurably (the comparison can fail)
        _, _, worst_int8 = _split_vs_unsplit(sm, "int8")
        assert worst_int8 > 1e-4
    finally:
        sm.peft.unload()


def test_cut_outside_the_model_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"0 <= a <= b <= 2"):
        build_split("tiny-encoder", LoraConfig(4, 8, 0.0, ("query",)), (1, 3), 2, False, seed=0)


@pytest.mark.parametrize("codec,per_value", [("float32", 4), ("float16", 2), ("int8", 1)])
def test_wire_bytes_are_read_off_the_encoded_tensors(codec: str, per_value: int) -> None:
    x = torch.randn(3, 5, 16)
    w = encode(x, codec)
    assert w.nbytes == wire_bytes((3, 5, 16), codec)
    scales = 3 * 5 * 4 if codec == "int8" else 0  # one float32 scale per token vector
    assert w.nbytes == 3 * 5 * 16 * per_value + scales
    err = (w.decoded - x).abs()
    if codec == "float32":
        assert float(err.max()) == 0.0
    elif codec == "int8":  # rounding error at most half a quantization step per row
        step_size = x.abs().amax(-1, keepdim=True) / 127
        assert bool((err <= step_size / 2 + 1e-7).all())


def _cfg(source: str, *overrides: str):
    return load_config("configs/tiny_split.yaml", ["fl.rounds=2", f"data.source={source}", *overrides])


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_tiny_split_run_end_to_end(tmp_path, split_source: str) -> None:
    from edgelam.data.classification import build_classification
    from edgelam.lifecycle import run
    from edgelam.tasks.serving import load_served

    out = tmp_path / "run"
    summary = run(_cfg(split_source), out)
    rows = _rows(out)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        sched = r["schedule"]
        assert sched["policy"] == "lyapunov" and len(sched["queues"]) == 6
        assert sorted(r["clients"]) == sched["scheduled"] and sched["scheduled"]
        assert sum(sched["shares"].values()) == pytest.approx(1.0, abs=1e-6)
        kinds = r["bytes_by_kind"]
        assert kinds["act_up"] == kinds["feat_down"] == kinds["grad_up"] > 0
        assert r["bytes_up"] == kinds["act_up"] + kinds["mask_up"] + kinds["grad_up"] + kinds["adapters_up"]
        # the virtual queues follow Q(t+1) = max(Q + spent - budget, 0)
        spent = {c["client"]: c["energy_j"] for c in r["client_stats"]}
        want = [max(q + spent.get(k, 0.0) - 0.05, 0.0) for k, q in enumerate(sched["queues_before"])]
        assert sched["queues"] == pytest.approx(want)
        assert r["eval_accuracy"] is not None
    assert summary["final_eval_accuracy"] is not None and len(summary["energy_per_round_j"]) == 6
    # the queue bound: time-averaged spending <= budget + Q_k(T) / T, for every device
    final_q = rows[-1]["schedule"]["queues"]
    for k, spent in enumerate(summary["spent_per_round"]):
        assert spent <= 0.05 + final_q[k] / 2 + 1e-12
    assert (out / "plots" / "curves.png").stat().st_size > 0
    # the saved adapter (the classification task's format, with its card) served through the task
    # reproduces the run's final evaluation
    served = load_served(None, {"split": str(out / "adapter")})
    assert served.card == {"task": "classification", "model": "tiny-encoder", "base_seed": 0,
                           "classes": ["negative", "positive"]}
    cfg = _cfg(split_source)
    test = build_classification(cfg.data, served.tokenizer, cfg.seed, cfg.eval.max_per_task).test
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(test), 32):
            b = served.task.collate(test[i: i + 32])
            total += served.task.head_sums(served.task.output(served.model, b), b)["loss_sum"]
            n += len(b["labels"])
    assert total / n == pytest.approx(rows[-1]["eval_loss"], rel=1e-4)


def test_sfl_v2_queues_for_the_shared_server_copy(tmp_path, split_source: str) -> None:
    from edgelam.lifecycle import run

    run(_cfg(split_source, "fl.strategy=sfl_v2", "split.schedule.policy=all"), tmp_path / "v2")
    run(_cfg(split_source, "split.schedule.policy=all"), tmp_path / "v1")
    v1, v2 = _rows(tmp_path / "v1"), _rows(tmp_path / "v2")
    assert v1[1]["clients"] == v2[1]["clients"] == list(range(6))
    # V2 serialises the server: somebody waits, the round is longer, and the trained model differs
    assert max(c["server_wait_s"] for c in v2[1]["client_stats"]) > 0
    assert all(c["server_wait_s"] == 0 for c in v1[1]["client_stats"])
    assert sum(c["finish_s"] for c in v2[1]["client_stats"]) > sum(c["finish_s"] for c in v1[1]["client_stats"])
    assert v2[1]["round_time_s"] >= v1[1]["round_time_s"]
    assert v2[-1]["eval_loss"] != v1[-1]["eval_loss"]
    assert v2[1]["bytes_up"] == v1[1]["bytes_up"]


def test_int8_and_no_split(tmp_path, split_source: str) -> None:
    from edgelam.lifecycle import run

    run(_cfg(split_source, "split.schedule.policy=all", "split.act_codec=int8"), tmp_path / "int8")
    run(_cfg(split_source, "split.schedule.policy=all"), tmp_path / "f32")
    run(_cfg(split_source, "split.schedule.policy=all", "split.cut=[0, 0]"), tmp_path / "nosplit")
    i8, f32, ns = (_rows(tmp_path / d)[1]["bytes_by_kind"] for d in ("int8", "f32", "nosplit"))
    assert f32["act_up"] / i8["act_up"] == pytest.approx(4 * 64 / (64 + 4))  # 1 byte/value + a float32 scale per token
    assert i8["grad_up"] == f32["grad_up"]
    assert "act_up" not in ns and ns["adapters_up"] > f32["adapters_up"]  # the whole adapter travels, nothing else


def test_resume_after_a_crash_gives_the_same_run(tmp_path, split_source: str) -> None:
    from edgelam.lifecycle import run

    cfg = _cfg(split_source, "fl.rounds=3")
    run(cfg, tmp_path / "straight")

    def crash(row: dict) -> None:
        if row["round"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path / "crashed", on_round=crash)
    run(cfg, tmp_path / "crashed", resume=True)
    a, b = _rows(tmp_path / "straight"), _rows(tmp_path / "crashed")
    strip = [{k: v for k, v in r.items() if k != "wall_s"} for r in a]
    assert strip == [{k: v for k, v in r.items() if k != "wall_s"} for r in b]


def test_classification_data_takes_the_classification_task() -> None:
    # federated (non-split) strategies train classification data too, through tasks/classification.py
    assert load_config("configs/tiny_split.yaml", ["fl.strategy=fedavg"]).task == "classification"
    with pytest.raises(ConfigError, match="task does not fit data.source 'sst2'"):
        load_config("configs/tiny_split.yaml", ["task=causal_lm"])
    with pytest.raises(ConfigError, match="split.schedule.policy"):
        load_config("configs/tiny_split.yaml", ["split.schedule.policy=best"])


def test_rounds_without_a_feasible_device_are_reported(tmp_path, split_source: str) -> None:
    from edgelam.lifecycle import run

    run(_cfg(split_source, "split.schedule.t_max_s=1e-6"), tmp_path / "never")
    rows = _rows(tmp_path / "never")
    for r in rows[1:]:
        assert r["schedule"]["status"] == "infeasible" and r["schedule"]["scheduled"] == []
        assert r["schedule"]["infeasible"] == list(range(6)) and r["train_loss"] is None
    assert rows[-1]["eval_loss"] == pytest.approx(rows[0]["eval_loss"])
    assert math.isfinite(rows[-1]["sim_time_s"])


@needs_sst2
def test_classification_data_sst2_and_agnews() -> None:
    from edgelam.config import DataConfig
    from edgelam.data.classification import build_classification
    from edgelam.data.sources import DataError
    from edgelam.models.load import byte_tokenizer

    tok = byte_tokenizer()
    ag = build_classification(DataConfig(source="agnews", num_clients=4, max_examples_per_client=10, partition="iid",
                                         max_length=32), tok, seed=0, eval_max=20)
    assert ag.classes == ("World", "Sports", "Business", "Sci/Tech") and len(ag.test) == 20
    assert [len(c) for c in ag.clients] == [10, 10, 10, 10]
    assert all(0 <= e.label < 4 and 0 < len(e.input_ids) <= 32 for c in ag.clients for e in c)
    assert len({e.label for c in ag.clients for e in c}) > 1
    sst = build_classification(DataConfig(source="sst2", num_clients=3, max_examples_per_client=8, partition="dirichlet",
                                          dirichlet_alpha=0.1), tok, seed=0, eval_max=None)
    assert len(sst.test) == 872 and sum(len(c) for c in sst.clients) == 24  # the labelled GLUE dev set
    with pytest.raises(DataError, match="lower data.max_examples_per_client"):
        build_classification(DataConfig(source="agnews", num_clients=2, max_examples_per_client=10**6), tok, 0, None)


def test_malformed_tsv_line_is_named(tmp_path) -> None:
    from edgelam.data.classification import SOURCES, read_tsv
    from edgelam.data.sources import DataError

    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\na fine line\t1\nno label here\n")
    with pytest.raises(DataError, match=r"bad.tsv:3: expected 'text<TAB>label'"):
        read_tsv(bad, SOURCES["sst2"])


def test_synthetic_classification_is_seeded_and_labelled_by_its_words() -> None:
    from edgelam.config import CLASSIFICATION_SOURCES
    from edgelam.data.classification import SOURCES, SYNTHETIC, synthetic_rows

    assert set(CLASSIFICATION_SOURCES) == set(SOURCES) | set(SYNTHETIC)
    for name, spec in SYNTHETIC.items():
        rows = synthetic_rows(name, 200, seed=0, stream=0)
        assert rows == synthetic_rows(name, 200, seed=0, stream=0)
        assert rows != synthetic_rows(name, 200, seed=1, stream=0) and rows != synthetic_rows(name, 200, seed=0, stream=1)
        assert {lab for _, lab in rows} == set(range(len(spec.classes)))
        for text, lab in rows:  # two cue words of its own class, none of another: a bag of words decides
            words = text.split()
            assert [sum(w in cues for w in words) for cues in spec.cues] == [2 if c == lab else 0 for c in range(len(spec.classes))]


def test_synthetic_classification_builds_like_sst2_and_agnews() -> None:
    from edgelam.config import ConfigError, DataConfig
    from edgelam.data.classification import build_classification
    from edgelam.models.load import byte_tokenizer

    tok = byte_tokenizer()
    topics = build_classification(DataConfig(source="synthetic_topics", num_clients=4, max_examples_per_client=10,
                                              partition="dirichlet", dirichlet_alpha=0.3, max_length=32), tok, seed=0, eval_max=20)
    assert topics.classes == ("sports", "weather", "food", "music") and len(topics.test) == 20
    assert sum(len(c) for c in topics.clients) == 40 and all(c for c in topics.clients)
    assert all(0 <= e.label < 4 and 0 < len(e.input_ids) <= 32 for c in topics.clients for e in c)
    sentiment = build_classification(DataConfig(source="synthetic_sentiment", num_clients=2, max_examples_per_client=8,
                                                heldout_fraction=0.0), tok, seed=0, eval_max=None)
    assert sentiment.classes == ("negative", "positive") and len(sentiment.test) == 500
    with pytest.raises(ConfigError, match="data.heldout_fraction does not apply to classification data"):
        build_classification(DataConfig(source="synthetic_sentiment", heldout_fraction=0.2), tok, seed=0, eval_max=None)
