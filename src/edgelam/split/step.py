"""One split-learning step, for real and as a plan of what it will cost.

The exchange of one mini-batch (SplitFed; Thapa et al. 2022, and arXiv 2407.02924's system):

  device  front forward (embeddings, first blocks)       -> activations up (+ padding mask)
  server  middle forward (the heavy blocks, LoRA)        -> features down
  device  back forward + backward (task module, labels)  -> feature gradients up
  server  middle backward                                -> activation gradients down (only when
  device  front backward                                    the front has trainable tensors)

``step`` does it with autograd cut at each link (the receiver gets a detached, codec-decoded copy,
exactly what would arrive), so with float32 links the gradients equal the unsplit model's.
``plan`` lists the same exchange as phases (compute FLOPs, bytes up, bytes down) from the batch's
shape alone, so the scheduler knows a round's cost before it runs; ``step`` checks the bytes agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from edgelam.models.flops import backward_flops, forward_flops, lora_train_flops
from edgelam.models.split import Params, SplitModel, call
from edgelam.split.wire import encode, mask_bytes, wire_bytes
from edgelam.tasks.base import Task, add_sums
from edgelam.tasks.causal_lm import CausalLM
from edgelam.tasks.classification import Classification

# phase kinds: device compute (FLOPs), server compute (FLOPs), uplink bytes, downlink bytes
DEV, SRV, UP, DOWN = "dev", "srv", "up", "down"


@dataclass(frozen=True)
class Phase:
    kind: str
    amount: float  # FLOPs or bytes


@dataclass(frozen=True)
class StepPlan:
    phases: tuple[Phase, ...]

    def total(self, kind: str) -> float:
        return sum(p.amount for p in self.phases if p.kind == kind)


@dataclass
class StepResult:
    loss: float
    bytes: dict[str, int] = field(default_factory=dict)  # act_up, mask_up, feat_down, grad_up, grad_down
    correct: int = 0  # classification: right answers in the batch


def front_trainable(sm: SplitModel) -> bool:
    return bool(sm.trainable("front"))


def plan(sm: SplitModel, batch: dict[str, Tensor], act_codec: str, grad_codec: str) -> StepPlan:
    """The phases of one step on ``batch``: what each side computes and what crosses each link."""
    b, t = sm.inputs(batch)[1].shape
    n = b * t
    fm_front, fm_mid, fm_back = sm.flops("front"), sm.flops("middle"), sm.flops("back")
    if sm.cut[0] == sm.cut[1]:  # nothing on the server: plain on-device LoRA training
        total = lora_train_flops(fm_front, n, t) + lora_train_flops(fm_back, n, t)
        return StepPlan((Phase(DEV, total),))
    act = wire_bytes((b, t, sm.hidden), act_codec)
    grad = wire_bytes((b, t, sm.hidden), grad_codec)
    trainable_front = front_trainable(sm)
    phases = [
        Phase(DEV, forward_flops(fm_front, n, t)),
        Phase(UP, act + _mask_bytes(sm, (b, t))),
        Phase(SRV, forward_flops(fm_mid, n, t)),
        Phase(DOWN, act),
        Phase(DEV, lora_train_flops(fm_back, n, t)),
        Phase(UP, grad),
        Phase(SRV, backward_flops(fm_mid, n, t)),
    ]
    if trainable_front:
        phases += [Phase(DOWN, grad), Phase(DEV, backward_flops(fm_front, n, t))]
    return StepPlan(tuple(phases))


def step(sm: SplitModel, device: dict[str, Params], server: Params, batch: dict[str, Tensor],
         act_codec: str, grad_codec: str, task: Task | None = None) -> StepResult:
    """Forward and backward of one batch across the cut; gradients land in the given leaf tensors.

    ``device`` maps "front" and "back" to that device's trainable tensors, ``server`` holds the
    server copy's middle tensors (segment-relative names)."""
    task = task or task_of(sm)
    inputs, mask = sm.inputs(batch)
    res = StepResult(loss=0.0)
    x = call(sm.front, device["front"], inputs, mask)
    if sm.cut[0] == sm.cut[1]:
        logits = call(sm.back, device["back"], x, mask, inputs)
        loss = task.head_loss(logits, batch)
        loss.backward()
        return _finish(task, res, loss, logits, batch)
    up = encode(x, act_codec)  # activations up, with the padding mask
    xs = up.decoded.requires_grad_(x.requires_grad)
    res.bytes["act_up"], res.bytes["mask_up"] = up.nbytes, _mask_bytes(sm, tuple(mask.shape))
    h = call(sm.middle, server, xs, mask)
    down = encode(h, act_codec)  # features down
    hd = down.decoded.requires_grad_(True)
    res.bytes["feat_down"] = down.nbytes
    logits = call(sm.back, device["back"], hd, mask, inputs)
    loss = task.head_loss(logits, batch)
    loss.backward()
    assert hd.grad is not None
    g = encode(hd.grad, grad_codec)  # feature gradients up
    res.bytes["grad_up"] = g.nbytes
    h.backward(g.decoded)
    if x.requires_grad:
        assert xs.grad is not None
        gx = encode(xs.grad, grad_codec)  # activation gradients down
        res.bytes["grad_down"] = gx.nbytes
        x.backward(gx.decoded)
    return _finish(task, res, loss, logits, batch)


def _mask_bytes(sm: SplitModel, shape: tuple[int, ...]) -> int:
    """The padding mask goes up with token activations; a task's own inputs have no padding."""
    return mask_bytes(shape) if sm.parts is None else 0


def _finish(task: Task, res: StepResult, loss: Tensor, logits: Tensor, batch: dict[str, Tensor]) -> StepResult:
    res.loss = float(loss.detach())
    with torch.no_grad():
        res.correct = int(task.head_sums(logits.detach(), batch).get("correct", 0))
    return res


def task_of(sm: SplitModel) -> Task:
    """The task a split model's head serves (its loss and metrics)."""
    pad = int(sm.tokenizer.pad_token_id)
    return CausalLM(pad) if sm.decoder else Classification(pad, sm.num_classes)


def leaves(state: Params, prefix: str) -> Params:
    """Fresh leaf tensors (requires_grad) for the names of ``state`` under ``prefix.``."""
    return {k[len(prefix) + 1:]: v.detach().clone().requires_grad_(True) for k, v in state.items()
            if k.startswith(prefix + ".")}


@torch.no_grad()
def evaluate(sm: SplitModel, device_state: Params, server_state: Params, batches: list[dict[str, Tensor]],
             task: Task | None = None) -> dict[str, float]:
    """The task's metrics (loss, and accuracy for a classifier) of the composed model."""
    task = task or task_of(sm)
    dev = {s: {k[len(s) + 1:]: v for k, v in device_state.items() if k.startswith(s + ".")} for s in ("front", "back")}
    srv = {k[len("middle") + 1:]: v for k, v in server_state.items()}
    sums: dict[str, float] = {}
    for batch in batches:
        inputs, mask = sm.inputs(batch)
        h = call(sm.middle, srv, call(sm.front, dev["front"], inputs, mask), mask)
        sums = add_sums(sums, task.head_sums(call(sm.back, dev["back"], h, mask, inputs), batch))
    return task.metrics(sums)
