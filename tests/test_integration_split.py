"""Split learning on the real embedded models: all-MiniLM-L6-v2 (encoder) and SmolLM2-135M (decoder)."""

import pytest

from edgelam.config_load import load_config

from test_split import _model, _split_vs_unsplit

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("name,targets,cut", [("minilm", ("query", "value"), (1, 5)),
                                              ("smollm2", ("q_proj", "v_proj"), (2, 28))])
def test_real_models_split_gradients_equal_unsplit(name, targets, cut):
    sm = _model(name, targets, cut, embedding_lora=False)
    try:
        assert sm.num_layers == (6 if name == "minilm" else 30)
        loss, ref, worst = _split_vs_unsplit(sm, "float32")
        assert loss == pytest.approx(ref, rel=1e-5)
        assert worst < 1e-4
    finally:
        sm.peft.unload()


def test_minilm_split_run_learns(tmp_path, split_source):
    """SST-2 where it is found, else the synthetic sentiment set: either way the loss must fall."""
    from edgelam.lifecycle import run

    cfg = load_config("configs/split_sst2.yaml", ["fl.rounds=4", "eval.every=4", "eval.max_per_task=200",
                                                  "split.schedule.policy=all", "data.num_clients=4",
                                                  f"data.source={split_source}"])
    summary = run(cfg, tmp_path / "run")
    assert summary["final_eval_loss"] < summary["first_eval_loss"]
    assert summary["bytes_up_total"] > 0 and summary["final_eval_accuracy"] is not None
