"""Task draft_distill (tasks/draft.py): the loss is the KL to the full model, LoRA sits on the draft's
blocks only, a batch's FLOPs by hand, the saved adapter serves as ``full:K`` with the student's logits,
and speculative decoding with the trained draft stays exact and accepts far more drafted tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from edgelam.config import ConfigError
from edgelam.config_load import load_config
from edgelam.infer.client import LocalTransport
from edgelam.infer.modules import ModuleHost, ModuleSpec
from edgelam.infer.speculative import AdaptiveGamma, Speculative
from edgelam.infer.topology import PinnedAdapter, device_draft, load_topology, open_topology
from edgelam.lifecycle import run
from edgelam.models.flops import flop_model
from edgelam.models.load import fresh_base
from edgelam.models.lora import load_adapters, set_adapter_state
from edgelam.tasks import setup_task
from edgelam.tasks.draft import prompt_of

MODEL, K = "tiny-varied", 2
CONFIG = "configs/tiny_draft.yaml"
TEACHER_RUN = ["model.name=tiny-varied", "fl.rounds=5", "train.local_steps=20", "train.lr=0.005", "data.max_length=128",
               "model.lora={r: 16, alpha: 32, dropout: 0.0, target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, "
               "up_proj, down_proj]}", "eval.generate=0"]


def _setup(repo: Path, *overrides: str):
    cfg = load_config(repo / CONFIG, list(overrides))
    ts = setup_task(cfg)  # the task's own (fresh) copy of the base: wrapping it leaves the cached one alone
    return cfg, ts, ts.task.wrap(ts.base, cfg.model.lora, cfg.seed)


@pytest.fixture(scope="module")
def draft_run(tmp_path_factory) -> Path:
    """configs/tiny_draft.yaml as shipped: the teacher is the bare base."""
    out = tmp_path_factory.mktemp("draft")
    run(load_config(Path(__file__).parents[1] / CONFIG), out)
    return out


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory) -> Path:
    """A causal-LM LoRA of tiny-varied trained by EdgeLAM on the synthetic set: a target with structured answers."""
    out = tmp_path_factory.mktemp("teacher")
    run(load_config(Path(__file__).parents[1] / "configs/tiny.yaml", TEACHER_RUN), out)
    return out


@pytest.fixture(scope="module")
def taught_run(tmp_path_factory, teacher_run) -> Path:
    """The draft distilled from that trained target (its adapter merged into the teacher)."""
    out = tmp_path_factory.mktemp("taught")
    run(load_config(Path(__file__).parents[1] / CONFIG, [f"draft.teacher_adapter={teacher_run / 'adapter'}",
                                                         "fl.rounds=8"]), out)
    return out


def test_loss_is_the_kl_to_the_full_model(repo) -> None:
    tau = 2.0
    cfg, ts, model = _setup(repo, f"draft.temperature={tau}", "draft.data=text")
    batch = ts.task.collate(ts.data.clients[0].train[:4])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert int((mask == 0).sum()) > 0  # padding is masked out of the loss
    drafted = torch.zeros_like(mask, dtype=torch.bool)  # where a draft drafts: the next token is an answer token
    drafted[:, :-1] = batch["labels"][:, 1:] != -100
    full = fresh_base(MODEL).model
    short_cfg = full.config.__class__(**{**full.config.to_dict(), "num_hidden_layers": K})
    short = LlamaForCausalLM(short_cfg).eval()
    short.load_state_dict(full.state_dict(), strict=False)  # blocks 0..K-1, norm, head (tied): the untrained exit
    with torch.no_grad():
        teacher = full(input_ids=ids, attention_mask=mask).logits / tau  # (B, T, V)
        student = short(input_ids=ids, attention_mask=mask).logits / tau
    p = torch.softmax(teacher, -1)
    kl = (p * (torch.log_softmax(teacher, -1) - torch.log_softmax(student, -1))).sum(-1) * tau ** 2  # (B, T)
    want = float(kl[drafted].sum() / drafted.sum())
    assert want > 0.01
    assert float(ts.task.loss(model, batch).detach()) == pytest.approx(want, rel=1e-4)
    ts.task.positions = "all"  # draft.positions all: every real token
    assert float(ts.task.loss(model, batch).detach()) == pytest.approx(float(kl[mask.bool()].sum() / mask.sum()), rel=1e-4)
    # trained LoRA and norm copy change the student, never the teacher (the adapter is off for it)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if prm.requires_grad:
                prm.add_(0.05 * torch.randn_like(prm))
        assert not torch.allclose(ts.task.output(model, batch), student * tau, atol=1e-3)
        assert torch.allclose(ts.task.teacher(model, batch), teacher * tau, atol=1e-5)


def test_only_the_draft_blocks_carry_lora(repo) -> None:
    cfg, ts, model = _setup(repo, "draft.data=text")
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    blocks = {int(n.split(".layers.")[1].split(".")[0]) for n in trained if ".layers." in n}
    assert blocks == set(range(K))
    assert sum(".lora_A." in n for n in trained) == K * len(cfg.model.lora.target_modules)
    assert [n for n in trained if ".layers." not in n] == ["base_model.model.model.norm.modules_to_save.default.weight"]
    _, _, bare_norm = _setup(repo, "draft.data=text", "draft.train_norm=false")
    assert all(".layers." in n for n, p in bare_norm.named_parameters() if p.requires_grad)


def test_work_flops_by_hand(repo) -> None:
    """tiny-varied: d = 64, MLP 128, 4 heads of 16, 2 KV heads (K, V: 32 wide), vocabulary V, LoRA r = 8 on all
    seven linear layers. Teacher: forward of 4 frozen blocks and the head; draft: forward + backward of 2 blocks
    (frozen weights: activation gradients only; LoRA: both), the norm and the head."""
    cfg, ts, model = _setup(repo, "draft.data=text")
    batch = ts.task.collate(ts.data.clients[0].train[:3])
    b, t = batch["input_ids"].shape
    v = model.config.vocab_size
    block = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128  # q, k, v, o, gate, up, down: 36,864 MACs
    lora = 8 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 2 + (128 + 64))  # r (d_in + d_out) per layer: 8,192
    attn = 4 * t * 64  # scores + weighted sum per token per layer (d_attn 64)
    teacher = 2 * (4 * block + 64 * v) + 4 * attn
    draft_fwd = 2 * (2 * block + 64 * v) + 2 * 2 * lora + 2 * attn
    draft_bwd = 2 * (2 * block + 64 * v) + 4 * 2 * lora + 2 * 2 * attn
    assert ts.task.work_flops(flop_model(model), batch) == pytest.approx((teacher + draft_fwd + draft_bwd) * b * t)


def test_federated_training_shrinks_the_kl(draft_run) -> None:
    rows = [json.loads(x) for x in (draft_run / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0], rows[-1]
    # the bare random target's answers are noise to a 2-block draft (measured 0.75 -> 0.52, agreement 0.17 -> 0.27)
    assert last["eval_loss"] < 0.8 * first["eval_loss"]
    assert last["eval_agreement"] > first["eval_agreement"] + 0.05
    card = json.loads((draft_run / "adapter" / "edgelam_task.json").read_text())
    assert (card["task"], card["model"], card["exit_layer"]) == ("draft_distill", MODEL, K)


def test_served_full_k_gives_the_students_logits(repo, draft_run) -> None:
    cfg, ts, model = _setup(repo, "draft.data=text")
    set_adapter_state(model, load_file(str(draft_run / "adapter" / "adapter_model.safetensors")))
    ids = torch.tensor([prompt_of(ts.data.global_eval["arithmetic"][0])])
    student = ts.task.output(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    meta = {"session": "s", "position": 0, "return_logits": True}
    host = ModuleHost(None, ModuleSpec.parse(f"full:{K}"), {"d": str(draft_run / "adapter")})
    served, _ = host.forward({"input_ids": ids}, {**meta, "adapter": "d"})
    assert host.task.name == "draft_distill"
    assert torch.allclose(served["logits"], student, atol=1e-5)
    untrained, _ = ModuleHost(MODEL, ModuleSpec.parse(f"full:{K}")).forward({"input_ids": ids}, meta)
    assert not torch.allclose(untrained["logits"], student, atol=1e-2)


def test_teacher_adapter_is_the_teacher(repo, teacher_run, draft_run) -> None:
    cfg, ts, model = _setup(repo, f"draft.teacher_adapter={teacher_run / 'adapter'}", "draft.data=text")
    batch = ts.task.collate(ts.data.clients[0].train[:2])
    target = load_adapters(fresh_base(MODEL).model, {"t": teacher_run / "adapter"})
    with torch.no_grad():
        want = target(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(ts.task.teacher(model, batch), want, atol=1e-4)
    with pytest.raises(ConfigError, match="needs a causal_lm adapter"):
        _setup(repo, f"draft.teacher_adapter={draft_run / 'adapter'}")


def test_trained_draft_stays_exact_and_accepts_more(taught_run, teacher_run, repo) -> None:
    """Greedy verification: every answer equals upstream-only decoding, whatever the draft. The trained draft
    (measured: 0.60 of drafted tokens accepted) against the target's own untrained first 2 blocks (0.07)."""
    teacher = str(teacher_run / "adapter")
    target = PinnedAdapter(LocalTransport(ModuleHost(MODEL, ModuleSpec.parse("full"), {"t": teacher}), "edge"), "t")
    untrained = PinnedAdapter(LocalTransport(ModuleHost(MODEL, ModuleSpec.parse(f"full:{K}"), {"t": teacher})), "t")
    trained = device_draft(MODEL, f"full:{K}", str(taught_run / "adapter"))
    cfg = load_config(repo / CONFIG)
    held = [e for xs in setup_task(cfg).data.global_eval.values() for e in xs]  # held-out prompts (not trained on)
    eos = target.inner.host.served.tokenizer.eos_token_id
    acceptance = {}
    for name, draft in (("trained", trained), ("untrained", untrained)):
        accepted = drafted = 0
        for e in held:
            ids = prompt_of(e)
            upstream = Speculative(draft, target, AdaptiveGamma(fixed=0)).generate(ids, 24, eos).tokens
            spec = Speculative(draft, target, AdaptiveGamma(fixed=4)).generate(ids, 24, eos)
            assert spec.tokens == upstream
            accepted, drafted = accepted + spec.accepted, drafted + spec.drafted
        acceptance[name] = accepted / drafted
    print(acceptance)
    assert acceptance["trained"] > max(acceptance["untrained"] + 0.15, 3 * acceptance["untrained"]), acceptance


def test_speculative_topology_serves_the_trained_draft(repo, draft_run, tmp_path) -> None:
    base = fresh_base(MODEL)
    text = (repo / "configs/tiny_speculative.yaml").read_text().replace("emulate_links: true", "emulate_links: false")
    topo_file = tmp_path / "topo.yaml"
    topo_file.write_text(text + f"draft_adapter: {draft_run / 'adapter'}\n")
    topo = load_topology(topo_file)
    ids = prompt_of(setup_task(load_config(repo / CONFIG, ["draft.data=text"])).data.global_eval["capital"][0])
    want = Speculative(device_draft(MODEL, "full"), device_draft(MODEL, "full"), AdaptiveGamma(fixed=0)).generate(ids, 10)
    with open_topology(topo, base.model.config) as runner:
        got = list(runner.stream(ids, 10, None))
        report = runner.report()
    assert got == want.tokens and report["drafted"] > 0
    topo_file.write_text(text.replace('"full:2"', '"full:3"') + f"draft_adapter: {draft_run / 'adapter'}\n")
    with pytest.raises(ConfigError, match='draft: "full:2"'):
        load_topology(topo_file)


@pytest.mark.parametrize("overrides,match", [
    (["draft.exit_layer=null"], "draft.exit_layer is required"),
    (["task=causal_lm"], "draft applies to task draft_distill only"),
    (["fl.strategy=flora"], "flora merges"),
    (["runtime.batch_clients=2"], "runtime.batch_clients must be 1"),
    (["data.source=synthetic_sentiment"], "does not fit"),
])
def test_config_refusals(repo, overrides, match) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(repo / CONFIG, overrides)


def test_exit_layer_must_leave_blocks_to_the_target(repo) -> None:
    with pytest.raises(ConfigError, match=r"draft.exit_layer must be in \[1, 3\]"):
        setup_task(load_config(repo / CONFIG, ["draft.exit_layer=4", "draft.data=text"]))
