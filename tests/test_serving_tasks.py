"""Serving goes through the Task seam: a run's adapter folder carries its task card, and
`edgelam serve` rebuilds the trained model from it (classifier head included) and answers as
the task does, over HTTP in its own process."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
import torch

from edgelam.config_load import load_config
from edgelam.data.classification import build_classification
from edgelam.infer.launch import start_service, wait_ready
from edgelam.infer.modules import ModuleError, ModuleHost, ModuleSpec
from edgelam.models.load import byte_tokenizer
from edgelam.tasks.serving import CARD, load_served


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    """A 2-round federated classification run on the tiny encoder (seed 3: the base is seeded by it)."""
    from edgelam.lifecycle import run

    out = tmp_path_factory.mktemp("cls") / "run"
    cfg = load_config("configs/tiny_fl_classification.yaml", ["data.source=synthetic_sentiment", "fl.rounds=2", "seed=3",
                                                               "data.max_length=512", "eval.max_per_task=48"])
    summary = run(cfg, out)
    cd = build_classification(cfg.data, byte_tokenizer(), cfg.seed, cfg.eval.max_per_task)
    return out / "adapter", summary, cd


def test_a_run_writes_its_task_card_beside_the_adapter(classifier_run) -> None:
    adapter, _, cd = classifier_run
    card = json.loads((adapter / CARD).read_text())
    assert card == {"task": "classification", "model": "tiny-encoder", "base_seed": 3, "classes": list(cd.classes)}


def test_the_served_classifier_reproduces_the_runs_evaluation(classifier_run) -> None:
    adapter, summary, cd = classifier_run
    host = ModuleHost(None, ModuleSpec("full"), {"sst": str(adapter)})
    assert (host.model_name, host.task.name, host.info()["classes"]) == ("tiny-encoder", "classification", list(cd.classes))
    answers = host.predict(list(cd.test_text), "sst")
    labels = [cd.classes[ex.label] for ex in cd.test]
    accuracy = sum(a["label"] == y for a, y in zip(answers, labels)) / len(labels)
    assert accuracy == summary["final_eval_accuracy"]
    loss = -sum(torch.log(torch.tensor(a["scores"][y])) for a, y in zip(answers, labels)) / len(labels)
    assert float(loss) == pytest.approx(summary["final_eval_loss"], rel=1e-4)
    assert all(a["score"] == max(a["scores"].values()) for a in answers)
    with pytest.raises(ModuleError, match="no base to serve"):
        host.predict(["fine"], None)
    with pytest.raises(ValueError, match="served whole"):
        ModuleHost(None, ModuleSpec("blocks", 0, 1), {"sst": str(adapter)})


def test_cards_are_checked_before_anything_loads(classifier_run, tmp_path) -> None:
    adapter, _, _ = classifier_run
    with pytest.raises(ValueError, match="trained on model 'tiny-encoder', not 'minilm'"):
        load_served("minilm", {"a": str(adapter)})
    other = tmp_path / "other"
    shutil.copytree(adapter, other)
    card = json.loads((other / CARD).read_text())
    (other / CARD).write_text(json.dumps({**card, "classes": ["x", "y"]}))
    with pytest.raises(ValueError, match="'a' and 'b' were trained for different tasks or models \\(classes differ\\)"):
        load_served(None, {"a": str(adapter), "b": str(other)})
    (other / CARD).write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_served(None, {"b": str(other)})
    (other / CARD).unlink()
    with pytest.raises(ValueError, match="have no edgelam_task.json"):
        load_served(None, {"a": str(adapter), "b": str(other)})
    with pytest.raises(ValueError, match="is an encoder"):
        load_served("tiny-encoder", {"b": str(other)})
    with pytest.raises(ValueError, match="'b' .* does not load on this model: Target modules"):
        load_served(None, {"b": str(other)})  # a bare folder is taken for a causal LM (tiny-varied)
    with pytest.raises(ValueError, match="not a PEFT adapter folder"):
        load_served(None, {"c": str(tmp_path)})


def test_a_causal_lm_adapter_is_served_on_the_base_it_was_trained_on(tmp_path) -> None:
    from edgelam.lifecycle import run
    from edgelam.tasks.causal_lm import CausalLM

    cfg = load_config("configs/tiny.yaml", ["fl.rounds=1", "seed=5", "data.num_clients=2", "eval.generate=0"])
    run(cfg, tmp_path / "run")
    adapter = tmp_path / "run" / "adapter"
    assert json.loads((adapter / CARD).read_text()) == {"task": "causal_lm", "model": "tiny", "base_seed": 5}
    host = ModuleHost(None, ModuleSpec("full"), {"ft": str(adapter)})
    texts = ["hello there", "a"]
    got = host.predict(texts, "ft")
    # the same adapter on the same base (seed 5), loaded by hand with PEFT
    from peft import PeftModel

    from edgelam.models.load import tiny_model

    tok = byte_tokenizer()
    model = PeftModel.from_pretrained(tiny_model(len(tok), seed=5), str(adapter)).eval()
    task = CausalLM(int(tok.pad_token_id))
    batch = task.request(tok, texts, 512)
    with torch.no_grad():
        want = task.answers(task.predict(task.output(model, batch)), batch, tok)
    assert got == want
    assert got[0]["token_id"] == int(model(input_ids=batch["input_ids"][:1, :11]).logits[0, -1].argmax())
    with pytest.raises(ModuleError, match="needs the whole model|predictions need the whole model"):
        ModuleHost(None, ModuleSpec("embed"), {"ft": str(adapter)}).predict(texts)


def test_predict_over_http_in_its_own_process(classifier_run) -> None:
    adapter, _, cd = classifier_run
    svc = start_service("tiny-encoder", "full", "edge", extra=["--adapter", f"sst={adapter}"])
    try:
        wait_ready([svc])
        url = svc.url
        ready = httpx.get(f"{url}/ready").json()
        assert ready["task"] == "classification" and ready["model"] == "tiny-encoder"
        texts = list(cd.test_text[:5])
        r = httpx.post(f"{url}/v1/predict", json={"inputs": texts, "adapter": "sst"})
        assert r.status_code == 200, r.text
        body = r.json()
        host = ModuleHost(None, ModuleSpec("full"), {"sst": str(adapter)})
        assert body["task"] == "classification" and body["predictions"] == host.predict(texts, "sst")
        one = httpx.post(f"{url}/v1/predict", json={"inputs": texts[0], "adapter": "sst"}).json()["predictions"]
        # alone, a text is not padded: the same answer, its scores equal to float32 rounding
        assert one[0]["label"] == body["predictions"][0]["label"]
        assert one[0]["scores"] == pytest.approx(body["predictions"][0]["scores"], rel=1e-5)
        for req, status, message in [
            ({"inputs": []}, 400, "non-empty"),
            ({"inputs": "x", "adapter": "nope"}, 400, "'nope' is not loaded"),
            ({"inputs": "x", "temperature": 1}, 400, "unknown fields"),
            ({"inputs": "x" * 600, "adapter": "sst"}, 413, "more than 512 tokens"),
        ]:
            r = httpx.post(f"{url}/v1/predict", json=req)
            assert r.status_code == status and message in r.json()["error"], (req, r.text)
        r = httpx.post(f"{url}/v1/predict", content=b"{oops", headers={"content-type": "application/json"})
        assert r.status_code == 400 and "must be JSON" in r.json()["error"]
        r = httpx.post(f"{url}/v1/predict", json={"inputs": "x" * 600, "adapter": "sst", "truncate": True})
        assert r.status_code == 200 and len(r.json()["predictions"]) == 1
    finally:
        svc.kill()
