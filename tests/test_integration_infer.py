"""Inference topologies on the real SmolLM2-135M-Instruct: the answer equals single-process greedy decoding."""

import pytest
import torch

from edgelam.models.load import load_base

pytestmark = pytest.mark.integration


def test_smollm2_pipeline_and_speculative_are_exact():
    from edgelam.infer.client import LocalTransport, Stage
    from edgelam.infer.modules import ModuleHost, ModuleSpec
    from edgelam.infer.pipeline import Pipeline, prompt_ids
    from edgelam.infer.speculative import AdaptiveGamma, Speculative

    base = load_base("smollm2", "float32", 0)
    ids = prompt_ids(base.tokenizer, "What is the capital of France?")
    seq = list(ids)  # the reference: the whole sequence through the HF model each step, no cache
    with torch.no_grad():
        for _ in range(10):
            seq.append(int(base.model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    want = seq[len(ids):]
    assert "Paris" in base.tokenizer.decode(want)
    local = lambda spec: Stage(str(spec), [LocalTransport(ModuleHost("smollm2", spec))])  # noqa: E731
    pipe = Pipeline(local(ModuleSpec("embed")), [local(ModuleSpec("blocks", 0, 12)), local(ModuleSpec("blocks", 12, 30))],
                    local(ModuleSpec("head")))
    assert pipe.generate(ids, 10).tokens == want
    spec = Speculative(LocalTransport(ModuleHost("smollm2", ModuleSpec("full", 0, 20))),
                       LocalTransport(ModuleHost("smollm2", ModuleSpec("full"))), AdaptiveGamma(fixed=3)).generate(ids, 10)
    assert spec.tokens == want and spec.drafted > 0
