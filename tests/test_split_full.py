"""Split learning with full-parameter blocks (``model.train: full`` with sfl_v1 / sfl_v2): the server's
blocks (or ``model.full_blocks``) train their own weights, the other blocks keep LoRA; the cut model's
gradients and FLOPs equal the unsplit model's; the server's weights never cross the radio; the saved
adapter reloads with PEFT; a resumed run equals an uninterrupted one; bad combinations are named."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from test_split import _batch, _split_vs_unsplit
from torch.utils.flop_counter import FlopCounterMode

from edgelam.config import ConfigError, LoraConfig
from edgelam.config_load import load_config
from edgelam.lifecycle import run
from edgelam.models.load import BaseModel, byte_tokenizer, fresh_base, tiny_model
from edgelam.models.lora import serialize
from edgelam.models.split import build_split, call
from edgelam.rundir import load_checkpoint
from edgelam.split.driver import SplitDriver
from edgelam.split.step import DEV, SRV, leaves, plan, step
from edgelam.split.train import Side, sides

PREFIX = "base_model.model."  # PEFT's prefix of the base model's own names in the adapter state
QV = ("q_proj", "v_proj")
# a tiny block's tensors (hidden 64, 4 heads of 16, 2 KV heads, MLP 128), as named inside the block
BLOCK = {"self_attn.q_proj.weight": (64, 64), "self_attn.k_proj.weight": (32, 64), "self_attn.v_proj.weight": (32, 64),
         "self_attn.o_proj.weight": (64, 64), "mlp.gate_proj.weight": (128, 64), "mlp.up_proj.weight": (128, 64),
         "mlp.down_proj.weight": (64, 128), "input_layernorm.weight": (64,), "post_attention_layernorm.weight": (64,)}
FULL = ".modules_to_save.default."


def _split(cut, full_blocks, targets=QV, embedding_lora=False, base=None):
    sm = build_split("tiny", LoraConfig(4, 8, 0.0, targets), cut, 0, embedding_lora, seed=1, train="full",
                     full_blocks=full_blocks, base=base)
    with torch.no_grad():  # non-zero B so every LoRA tensor gets a gradient
        gen = torch.Generator().manual_seed(0)
        for n, p in sm.peft.named_parameters():
            if "lora_B" in n or "lora_embedding_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return sm


def _lora_kind(names) -> str:
    """'full', 'lora' or 'none': what a segment's trainable tensors are."""
    full = [n for n in names if FULL in n]
    lora = [n for n in names if ".lora_" in n]
    assert len(full) + len(lora) == len(names), names
    return "none" if not names else "full" if full and not lora else "lora" if lora and not full else "both"


# (cut, model.full_blocks, embedding LoRA) -> what the front, middle and back train
CASES = [
    ((1, 2), None, True, ("lora", "full", "none")),  # the server's block 1 in full; block 0 and the embedding LoRA
    ((1, 2), (0, 1), False, ("full", "full", "none")),  # block 0 in full on the device too: no LoRA anywhere
    ((0, 1), (1,), False, ("none", "lora", "full")),  # the server's block 0 keeps LoRA, the device's block 1 in full
]


@pytest.mark.parametrize("cut,full_blocks,embedding_lora,kinds", CASES)
def test_full_blocks_train_their_weights_without_lora_and_gradients_equal_unsplit(cut, full_blocks, embedding_lora, kinds):
    sm = _split(cut, full_blocks, embedding_lora=embedding_lora)
    try:
        full = set(range(cut[0], cut[1])) if full_blocks is None else set(full_blocks)
        assert tuple(_lora_kind(list(sm.trainable(s))) for s in ("front", "middle", "back")) == kinds
        for seg, first in (("front", 0), ("middle", cut[0]), ("back", cut[1])):
            for i in range(len(sm.segments()[seg].layers)):
                mine = {n[len(f"layers.{i}{FULL}"):]: tuple(p.shape) for n, p in sm.trainable(seg).items()
                        if n.startswith(f"layers.{i}{FULL}")}
                assert mine == (BLOCK if first + i in full else {})  # a full block: all 9 tensors, nothing else
        lora_in = {int(n.split(".layers.")[1].split(".")[0]) for n, m in sm.peft.named_modules()
                   if isinstance(m, LoraLayer) and ".layers." in n}
        assert lora_in == {0, 1} - full  # no LoRA layer inside a full block (nor in its frozen original)
        loss, ref, worst = _split_vs_unsplit(sm, "float32")
        assert loss == pytest.approx(ref, rel=1e-6)
        assert worst < 1e-5
    finally:
        sm.peft.unload()


@pytest.mark.parametrize("cut,full_blocks,targets,embedding_lora", [
    ((0, 2), None, QV, False),  # every block in full on the server, nothing trains on the device
    ((1, 2), (0, 1), QV, False),
    # LoRA on v_proj only ahead of a full block, and a trainable embedding: the middle's backward must run
    # through q_proj and k_proj too, to send the activation gradients down
    ((0, 2), (1,), ("v_proj",), True),
])
def test_planned_flops_match_pytorch_flop_counter(cut, full_blocks, targets, embedding_lora):
    # eager attention: PyTorch's FLOP counter does not see inside the CPU SDPA kernel
    tok = byte_tokenizer()
    model = tiny_model(len(tok), attn_implementation="eager").requires_grad_(False)
    sm = _split(cut, full_blocks, targets, embedding_lora, base=BaseModel(model, tok, "tiny"))
    batch = _batch(sm)
    dev, srv = sm.initial_state()
    counter = FlopCounterMode(display=False)
    with counter:
        step(sm, {s: leaves(dev, s) for s in ("front", "back")}, leaves(srv, "middle"), batch, "float32", "float32")
    p = plan(sm, batch, "float32", "float32")
    assert p.total(DEV) + p.total(SRV) == pytest.approx(counter.get_total_flops(), rel=0.005)
    # block 1 in full: q 64x64 + k, v 64x32 + o 64x64 + gate, up 64x128 + down 128x64 multiply-adds
    assert sum(sm.flops(s).full_macs for s in ("front", "middle", "back")) == 36864 * len(full_blocks or (0, 1))


def _cfg(repo, *extra: str):
    return load_config(repo / "configs" / "tiny.yaml", ["fl.strategy=sfl_v1", "split.cut=[1, 2]", "eval.generate=0",
                                                       "split.schedule.policy=all", "model.train=full", *extra])


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_sfl_v1_full_server_block_trains_stays_off_the_radio_and_the_adapter_reloads(repo, tmp_path):
    cfg = _cfg(repo)
    summary = run(cfg, tmp_path / "full")
    run(load_config(repo / "configs" / "tiny.yaml", ["fl.strategy=sfl_v1", "split.cut=[1, 2]", "eval.generate=0",
                                                      "split.schedule.policy=all"]), tmp_path / "lora")
    full, lora = _rows(tmp_path / "full")[1:], _rows(tmp_path / "lora")[1:]
    assert summary["final_eval_loss"] < summary["first_eval_loss"]
    # the server's block 1 is trained and averaged on the edge server: the radio carries exactly what
    # LoRA on the same cut carries (activations, gradients and the devices' block-0 LoRA)
    for f, l in zip(full, lora, strict=True):
        assert (f["bytes_up"], f["bytes_down"], f["bytes_by_kind"]) == (l["bytes_up"], l["bytes_down"], l["bytes_by_kind"])
    shapes = {"q_proj.lora_A": (4, 64), "q_proj.lora_B": (64, 4), "v_proj.lora_A": (4, 64), "v_proj.lora_B": (32, 4)}
    device = {f"device.front.layers.0.self_attn.{k}.default.weight": torch.zeros(s) for k, s in shapes.items()}
    assert all(r["bytes_by_kind"]["adapters_up"] == 3 * len(serialize(device)) for r in full)  # 3 devices a round
    # the saved adapter: block 1's own weights (all changed) and block 0's LoRA (trained), nothing else
    saved = load_file(tmp_path / "full" / "adapter" / "adapter_model.safetensors")
    block1 = {f"{PREFIX}model.layers.1.{n}": s for n, s in BLOCK.items()}
    lora0 = {f"{PREFIX}model.layers.0.self_attn.{k}.weight": s for k, s in shapes.items()}
    assert {k: tuple(v.shape) for k, v in saved.items()} == block1 | lora0
    original = fresh_base("tiny", "float32", 0).model.model.layers[1].state_dict()
    assert all(not torch.equal(saved[f"{PREFIX}model.layers.1.{n}"], original[n]) for n in BLOCK)
    assert all(saved[k].abs().sum() > 0 for k in lora0 if "lora_B" in k)  # B starts at zero
    # the checkpoint holds the same weights; PEFT's reload gives the split model's logits
    st, _ = load_checkpoint(tmp_path / "full" / "state" / "checkpoint.safetensors")
    dev, srv = sides(st.state)
    assert all(torch.equal(srv[f"middle.layers.0{FULL}{n}"], saved[f"{PREFIX}model.layers.1.{n}"]) for n in BLOCK)
    drv = SplitDriver(cfg)
    try:
        sm, batch = drv.ctx.sm, drv.ctx.eval_batches[0]
        ids, mask = batch["input_ids"], batch["attention_mask"]
        d = {s: {k[len(s) + 1:]: v for k, v in dev.items() if k.startswith(s + ".")} for s in ("front", "back")}
        with torch.no_grad():
            mine = call(sm.back, d["back"], call(sm.middle, {k[7:]: v for k, v in srv.items()},
                                                 call(sm.front, d["front"], ids, mask), mask), mask, ids)
            peft = PeftModel.from_pretrained(fresh_base("tiny", "float32", 0).model, str(tmp_path / "full" / "adapter"))
            theirs = peft.eval()(input_ids=ids, attention_mask=mask).logits
        assert torch.allclose(mine, theirs, atol=1e-5, rtol=0)
        assert peft.get_base_model().lm_head.weight is peft.get_base_model().model.embed_tokens.weight  # still tied
    finally:
        drv.close()


def test_sfl_v2_full_resume_after_a_crash_gives_the_same_run(repo, tmp_path):
    cfg = _cfg(repo, "fl.strategy=sfl_v2", "fl.rounds=3")
    run(cfg, tmp_path / "straight")

    def crash(row: dict) -> None:
        if row["round"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path / "crashed", on_round=crash)
    run(cfg, tmp_path / "crashed", resume=True)
    a, b = _rows(tmp_path / "straight"), _rows(tmp_path / "crashed")
    assert [{k: v for k, v in r.items() if k != "wall_s"} for r in a] == [{k: v for k, v in r.items() if k != "wall_s"} for r in b]
    adapter = "adapter/adapter_model.safetensors"
    assert (tmp_path / "straight" / adapter).read_bytes() == (tmp_path / "crashed" / adapter).read_bytes()
    assert a[-1]["eval_loss"] < a[0]["eval_loss"]


def test_a_side_frees_its_gradients_after_its_update(repo):
    # SFL-V1 keeps one server copy per device through a round: with full blocks their gradients must not pile up
    w = torch.ones(3, requires_grad=True)
    side = Side({"middle": {"w": w}}, _cfg(repo), total_steps=1)
    (2 * w).sum().backward()
    side.update()
    assert w.grad is None and not torch.equal(w.detach(), torch.ones(3))


def test_bad_combinations_name_their_keys(repo):
    with pytest.raises(ConfigError, match=r"model.full_blocks null .*split.cut \[1, 1\]"):
        _cfg(repo, "split.cut=[1, 1]")  # nothing on the server to train in full
    _cfg(repo, "split.cut=[1, 1]", "model.full_blocks=[0]")  # a device block in full: allowed
    with pytest.raises(ConfigError, match=r"model.train full applies to task causal_lm"):
        load_config(repo / "configs" / "tiny_split.yaml", ["model.train=full"])  # an encoder classifying
    with pytest.raises(ConfigError, match=r"model.full_blocks \[5\] names blocks \[5\]"):
        build_split("tiny", LoraConfig(4, 8, 0.0, QV), (1, 2), 0, False, seed=0, train="full", full_blocks=(5,))
    with pytest.raises(ConfigError, match=r"model.lora.target_modules \['qproj'\] match no module outside"):
        build_split("tiny", LoraConfig(4, 8, 0.0, ("qproj",)), (1, 2), 0, False, seed=0, train="full")
    with pytest.raises(ConfigError, match=r"model.train full trains a decoder's blocks; 'tiny-encoder'"):
        build_split("tiny-encoder", LoraConfig(4, 8, 0.0, ("query",)), (1, 2), 2, False, seed=0, train="full")
