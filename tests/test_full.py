"""Full-parameter training (``model.train: full``, ``models/full.py``): the chosen decoder blocks'
own weights train, travel and are saved as the adapter; everything else stays bit for bit; schemes
that need LoRA factors are refused; the FLOP count matches PyTorch's and the executor's plan."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode

from edgelam.config import ConfigError
from edgelam.config_load import load_config
from edgelam.fl.driver import FLDriver
from edgelam.fl.evaluate import evaluate_tasks
from edgelam.fl.executor import plan_trip
from edgelam.fl.rounds import make_work, uplink
from edgelam.lifecycle import run
from edgelam.models.flops import flop_model, lora_train_flops
from edgelam.models.full import attach_full
from edgelam.models.load import fresh_base, tiny_model
from edgelam.models.lora import get_adapter_state, serialize, set_adapter_state
from edgelam.tasks import setup_task

PREFIX = "base_model.model."  # PEFT's prefix of the base model's own names in the adapter state


def _cfg(repo, *extra: str):
    return load_config(repo / "configs" / "tiny.yaml", ["model.train=full", "eval.generate=0", *extra])


def _block_weights(i: int) -> dict[str, tuple[int, ...]]:
    """Block i of the tiny model: 7 projections and 2 RMSNorm weights, by the name PEFT saves them under."""
    model = tiny_model(260)
    return {f"{PREFIX}model.layers.{i}.{n}": tuple(p.shape) for n, p in model.model.layers[i].named_parameters()}


def test_only_the_chosen_block_trains_is_sent_and_priced(repo):
    drv = FLDriver(_cfg(repo, "model.full_blocks=[1]"))
    try:
        ctx, st = drv.ctx, drv.initial_state()
        before = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
        work = make_work(ctx, st.state, 1, 0, 7)
        res = ctx.executor.run([work])[0]
        after = dict(ctx.model.named_parameters())
        changed = {n for n in before if not torch.equal(before[n], after[n])}
        assert changed and all(".layers.1.modules_to_save." in n for n in changed)  # block 0, embeddings, norm: equal
        assert len(changed) == 9 and not any(p.requires_grad for n, p in after.items() if n not in changed)
        sent = uplink(ctx, st.state, 0, 1, res.update.state, res.start)
        assert {k: tuple(v.shape) for k, v in sent.items()} == _block_weights(1)
        plan = plan_trip(ctx, work, uplink(ctx, st.state, 0, 1, work.start, work.start))
        assert plan.bytes_up == len(serialize(sent)) and plan.bytes_down == len(serialize(work.payload))
        assert plan.flops == res.update.flops > 0
    finally:
        drv.close()


def test_fedavg_of_full_states_end_to_end_and_the_saved_adapter_loads(repo, tmp_path):
    cfg = _cfg(repo)  # full_blocks null: both blocks and the final norm
    summary = run(cfg, tmp_path / "run")
    expected = _block_weights(0) | _block_weights(1) | {f"{PREFIX}model.norm.weight": (64,)}
    one = len(serialize({k: torch.zeros(s) for k, s in expected.items()}))  # float32 zeros: the bytes of one state
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][1:]
    assert [r["bytes_up"] for r in rows] == [3 * one] * cfg.fl.rounds  # 3 clients, every round
    assert [r["bytes_down"] for r in rows] == [3 * one] * cfg.fl.rounds
    assert summary["final_eval_loss"] < summary["first_eval_loss"]
    saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in saved.items()} == expected
    ts = setup_task(cfg)  # a fresh tiny base (the same seed) and the run's evaluation data
    peft = PeftModel.from_pretrained(ts.base, str(tmp_path / "run" / "adapter")).eval()
    sums = evaluate_tasks(ts.task, peft, ts.data.global_eval, cfg.eval.batch_size, cfg.eval.max_per_task)["sums"]
    assert ts.task.metrics(sums)["loss"] == pytest.approx(summary["final_eval_loss"], rel=1e-6)
    assert peft.get_base_model().lm_head.weight is peft.get_base_model().model.embed_tokens.weight  # still tied
    again = setup_task(cfg)  # the run's own path: wrap a fresh base, load the state
    mine = again.task.wrap(again.base, cfg.model.lora, cfg.seed)
    set_adapter_state(mine, saved)
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(peft(input_ids=ids).logits, mine.eval()(input_ids=ids).logits)


@pytest.mark.parametrize("override", ["fl.strategy=hetlora", "fl.strategy=flora", "fl.strategy=flexlora",
                                      "runtime.batch_clients=2"])
def test_schemes_that_need_lora_factors_are_refused(repo, override):
    with pytest.raises(ConfigError, match="model.train"):
        _cfg(repo, override)


def test_bad_full_settings_name_their_key(repo):
    with pytest.raises(ConfigError, match="model.full_blocks"):
        load_config(repo / "configs" / "tiny.yaml", ["model.full_blocks=[1]"])  # train lora
    with pytest.raises(ConfigError, match="model.train"):
        _cfg(repo, "model.train=partial")
    with pytest.raises(ConfigError, match="model.full_blocks"):
        attach_full(fresh_base("tiny", "float32", 0).model, (2,))  # the tiny model has blocks 0 and 1


@pytest.mark.parametrize("blocks", [None, (1,), (0,)])
def test_full_training_flops_match_flop_counter(tiny, blocks):
    # eager attention: PyTorch's FLOP counter does not see inside the CPU SDPA kernel. Block 1 alone:
    # block 0 has no backward at all; weight gradients only in the trained blocks
    model = attach_full(tiny_model(len(tiny.tokenizer), attn_implementation="eager"), blocks)
    model.train()
    ids = torch.randint(0, 200, (2, 48))
    counter = FlopCounterMode(display=False)
    with counter:
        model(input_ids=ids, labels=ids).loss.backward()
    assert lora_train_flops(flop_model(model), 2 * 48, 48) == pytest.approx(counter.get_total_flops(), rel=0.02)
    assert len(get_adapter_state(model)) == (19 if blocks is None else 9)
