"""Sensing experiment: Wi-Fi CSI activity recognition with the LAM reading sensor tokens (patch
summaries or codebook codes) against a CNN and a GRU trained from scratch on the raw windows;
what a window costs on the uplink as raw CSI, embeddings or tokens; the codebook's size; tokens
lost on the link; and the 24 real recordings, held out by recording.

    .venv/bin/python experiments/sensing/run.py            # the full run: results.md and plots here
    .venv/bin/python experiments/sensing/run.py --quick    # a smoke test (tiny sizes, one seed; /tmp)

Every number in results.md is computed by this script from the runs it makes."""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "air_interface"))
from common import ROOT, THREADS, Results, git_rev, lam_run, line_plot, machine, mean, results, table  # noqa: E402

from edgelam.config import RunConfig  # noqa: E402
from edgelam.infer.modules import ModuleHost, ModuleSpec  # noqa: E402
from edgelam.sensing.baselines import CNNClassifier, GRUClassifier, count_parameters, evaluate, fit  # noqa: E402
from edgelam.sensing.data import build_sensing_data  # noqa: E402
from edgelam.sensing.tokens import uplink_bytes  # noqa: E402
from edgelam.tasks.sensing import ActivityRecognition  # noqa: E402
from edgelam.net import channel  # noqa: E402
from edgelam.net.topology import LinkState, expected_link, place_devices  # noqa: E402
from edgelam.store import Purpose, rng_for  # noqa: E402

CONFIG = "tiny_sensing.yaml"
LAMS = ("LAM patch tokens", "LAM codes (K = 64)")
SPLIT = "LAM patch tokens, split after the encoder (SFL-V2)"
BASELINES = ("CNN (raw CSI)", "GRU (raw CSI)")
CODEBOOKS = (8, 16, 32, 64, 128)
ERROR_RATES = (0.0, 0.1, 0.2, 0.4)


@dataclass(frozen=True)
class Sizes:
    seeds: tuple[int, ...]
    per_class: int
    eval_per_class: int
    rounds: int
    local_steps: int
    epochs: int
    folds: int


FULL = Sizes(seeds=(0, 1, 2), per_class=32, eval_per_class=40, rounds=8, local_steps=20, epochs=30, folds=4)
QUICK = Sizes(seeds=(0,), per_class=4, eval_per_class=4, rounds=1, local_steps=2, epochs=1, folds=4)


def overrides(sz: Sizes, seed: int, *extra: str) -> list[str]:
    return [f"seed={seed}", "threads=2", f"sensing.per_class={sz.per_class}", f"sensing.eval_per_class={sz.eval_per_class}",
            f"fl.rounds={sz.rounds}", f"train.local_steps={sz.local_steps}", f"eval.every={sz.rounds}", *extra]


def stacked(samples: list) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([s.window for s in samples]), torch.tensor([s.label for s in samples])


def lam_scores(out: Path, held: list, rate: float = 0.0) -> dict[str, float]:
    """The trained adapter served as EdgeLAM serves it, scored on ``held`` with tokens lost at ``rate``."""
    host = ModuleHost(None, ModuleSpec("full"), {"s": str(out / "adapter")})
    task: ActivityRecognition = host.task  # type: ignore[assignment]
    task.token_error_rate = rate
    with torch.no_grad(), host.served.use("s"):
        batch = task.collate(held)
        return task.metrics(task.eval_sums(host.served.model, batch))


def lam_cost(out: Path, held: list) -> tuple[int, float]:
    """(trained parameters in the adapter, median ms to classify one window on this CPU)."""
    from safetensors.torch import load_file

    params = sum(t.numel() for t in load_file(str(out / "adapter" / "adapter_model.safetensors")).values())
    host = ModuleHost(None, ModuleSpec("full"), {"s": str(out / "adapter")})
    batch = host.task.collate(held[:1])
    times = []
    with torch.inference_mode(), host.served.use("s"):
        for _ in range(21):
            t0 = time.perf_counter()
            host.task.output(host.served.model, batch)
            times.append(time.perf_counter() - t0)
    return params, 1e3 * statistics.median(times[1:])


def baseline_runs(cfg: RunConfig, sz: Sizes, seed: int, res: Results, table_name: str) -> None:
    data, shape = build_sensing_data(cfg.sensing, cfg.data, cfg.seed)
    x, y = stacked([s for c in data.clients for s in c.train])
    hx, hy = stacked([s for xs in data.global_eval.values() for s in xs])
    for name, make in (("CNN (raw CSI)", CNNClassifier), ("GRU (raw CSI)", GRUClassifier)):
        torch.manual_seed(seed)
        model = make(shape.features, len(shape.classes))
        fit(model, x, y, epochs=sz.epochs, batch_size=16, lr=3e-3, seed=seed)
        m = evaluate(model, hx, hy, shape.classes)
        res[(table_name, name, "accuracy")].append(m["accuracy"])
        res[(table_name, name, "macro_f1")].append(m["macro_f1"])
        if table_name == "sim":
            res[("cost", name, "params")].append(count_parameters(model))
            t = []
            with torch.inference_mode():
                for _ in range(21):
                    t0 = time.perf_counter()
                    model(hx[:1])
                    t.append(time.perf_counter() - t0)
            res[("cost", name, "ms")].append(1e3 * statistics.median(t[1:]))


def generated_seed(sz: Sizes, seed: int, tmp: Path, res: Results) -> None:
    cfg, _ = lam_run(CONFIG, overrides(sz, seed), tmp / "patch")
    lam_run(CONFIG, overrides(sz, seed, "sensing.tokenizer=vq", "sensing.codebook=64"), tmp / "vq64")
    data, _ = build_sensing_data(cfg.sensing, cfg.data, cfg.seed)
    held = [s for xs in data.global_eval.values() for s in xs]
    for name, folder in zip(LAMS, ("patch", "vq64")):
        for rate in ERROR_RATES:
            m = lam_scores(tmp / folder, held, rate)
            res[("lossy", name, str(rate))].append(m["accuracy"])
            if rate == 0.0:
                res[("sim", name, "accuracy")].append(m["accuracy"])
                res[("sim", name, "macro_f1")].append(m["macro_f1"])
        params, ms = lam_cost(tmp / folder, held)
        res[("cost", name, "params")].append(params)
        res[("cost", name, "ms")].append(ms)
    for k in CODEBOOKS:
        folder = tmp / f"vq{k}"
        if k != 64:
            lam_run(CONFIG, overrides(sz, seed, "sensing.tokenizer=vq", f"sensing.codebook={k}"), folder)
        res[("codebook", "LAM codes", str(k))].append(lam_scores(folder, held)["accuracy"])
    split_run(sz, seed, tmp, res)
    baseline_runs(cfg, sz, seed, res, "sim")


def split_run(sz: Sizes, seed: int, tmp: Path, res: Results) -> None:
    """Split learning cut after the modality encoder (SFL-V2, ``split.cut: [0, L]``): the device
    tokenizes and embeds, the edge server runs every block; the activations it sends up are counted
    by the run (per window: the round's act_up bytes over the windows its devices trained on)."""
    cfg, summary = lam_run(CONFIG, overrides(sz, seed, "fl.strategy=sfl_v2", "split.cut=[0,2]",
                                             "split.schedule.policy=all"), tmp / "split")
    res[("sim", SPLIT, "accuracy")].append(summary["final_eval_accuracy"])
    res[("sim", SPLIT, "macro_f1")].append(summary["final_eval_macro_f1"])
    last = json.loads((tmp / "split" / "metrics.jsonl").read_text().splitlines()[-1])
    windows = cfg.data.num_clients * cfg.train.local_steps * cfg.train.batch_size
    res[("split", "act_up", "bytes")].append(last["bytes_by_kind"]["act_up"] / windows)


def real_folds(sz: Sizes, tmp: Path, res: Results) -> None:
    """Seed 0, each of the folds held out in turn (recordings dealt by activity), 4 clients by recording."""
    for fold in range(sz.folds):
        extra = ["data.source=wifi", "data.partition=by_task", "data.num_clients=4", f"sensing.folds={sz.folds}",
                 f"sensing.fold={fold}"]
        cfg, _ = lam_run(CONFIG, overrides(sz, 0, *extra), tmp / f"real_patch{fold}")
        lam_run(CONFIG, overrides(sz, 0, *extra, "sensing.tokenizer=vq"), tmp / f"real_vq{fold}")
        data, _ = build_sensing_data(cfg.sensing, cfg.data, cfg.seed)
        held = [s for xs in data.global_eval.values() for s in xs]
        for name, folder in zip(LAMS, (f"real_patch{fold}", f"real_vq{fold}")):
            m = lam_scores(tmp / folder, held)
            res[("real", name, "accuracy")].append(m["accuracy"])
            res[("real", name, "macro_f1")].append(m["macro_f1"])
        baseline_runs(cfg, sz, 0, res, "real")


def links(cfg: RunConfig, count: int = 500) -> tuple[LinkState, LinkState, float]:
    """(the median device's uplink, the 10th-percentile (cell-edge) one, device transmit power W) of
    ``count`` devices placed as the run places its clients, each sharing the band with the run's
    clients, without fading (``net.topology.expected_link``)."""
    topo = place_devices(cfg.net, count, rng_for(cfg.seed, Purpose.PLACEMENT))
    ls = sorted((expected_link(cfg.net, d, cfg.data.num_clients) for d in topo.devices), key=lambda x: x.up_bps)
    return ls[count // 2], ls[count // 10], topo.devices[0].tx_power_w


def bytes_rows(cfg: RunConfig) -> list[str]:
    s = cfg.sensing
    rows = [("raw CSI (Intel 5300 payload, 2x2)", uplink_bytes("raw", s.window, 2, 2, s.tokens, 64, s.codebook))]
    for d, what in ((64, "tiny"), (576, "SmolLM2")):
        rows.append((f"embeddings, or split activations ({s.tokens} x {d} float32, {what})",
                     uplink_bytes("embedding", s.window, 2, 2, s.tokens, d, s.codebook)))
    for k in CODEBOOKS:
        rows.append((f"codes ({s.tokens} of K = {k})", uplink_bytes("tokens", s.window, 2, 2, s.tokens, 64, k)))
    mid, edge, power = links(cfg)
    out = ["| representation | bytes per window | airtime, median device (ms) | energy, median device (mJ) | "
           "airtime, cell edge (ms) | energy, cell edge (mJ) |", "|---|---|---|---|---|---|"]
    for n, b in rows:
        cells = []
        for link in (mid, edge):
            t = channel.transfer_time_s(b, link.up_bps)
            cells += [f"{1e3 * t:.3g}", f"{1e3 * channel.tx_energy_j(power, t):.3g}"]
        out.append(f"| {n} | {b:,} | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} |")
    net = cfg.net
    return out + ["", (f"The modelled link (`net` of `configs/{CONFIG}`): {net.uplink_bandwidth_hz / 1e6:g} MHz uplink shared "
                       f"by the {cfg.data.num_clients} clients, {net.device_tx_power_dbm[0]:g} dBm, path loss "
                       f"'{net.path_loss}' with {net.shadowing_db:g} dB shadowing in a {net.cell_radius_m:g} m cell; the "
                       f"median of 500 placed devices gets {mid.up_bps / 1e6:.1f} Mbit/s, the 10th percentile "
                       f"{edge.up_bps / 1e6:.2f} Mbit/s. Energy is transmit power x airtime. The airtime is the payload's only: headers, the "
                       "scheduling grant and a minimum transport block per transmission are not modelled, and for the "
                       "few bytes of codes they, not the payload, would set the cost (batch many windows' codes per "
                       "transmission). A window is "
                       f"{s.window / 100:g} s of CSI: raw CSI at the cell edge takes "
                       f"{channel.transfer_time_s(rows[0][1], edge.up_bps) / (s.window / 100):.0%} of the device's "
                       "share of the uplink just to keep up.")]


def plots(res: Results, out: Path, cfg: RunConfig) -> None:
    import matplotlib.pyplot as plt

    s = cfg.sensing
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    points = [("CNN (raw CSI)", uplink_bytes("raw", s.window, 2, 2, s.tokens, 64, 64)),
              ("GRU (raw CSI)", uplink_bytes("raw", s.window, 2, 2, s.tokens, 64, 64)),
              ("LAM patch tokens", uplink_bytes("embedding", s.window, 2, 2, s.tokens, 64, 64))]
    points += [(f"LAM codes (K = {k})", uplink_bytes("tokens", s.window, 2, 2, s.tokens, 64, k)) for k in CODEBOOKS]
    for name, b in points:
        key = ("codebook", "LAM codes", name.split("= ")[1].rstrip(")")) if name.startswith("LAM codes") \
            else ("sim", name, "accuracy")
        vals = res.get(key, [])
        if vals:
            ax.errorbar([b], [mean(vals)], yerr=[statistics.stdev(vals) if len(vals) > 1 else 0.0], marker="o",
                        capsize=3, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("uplink bytes per window (log)")
    ax.set_ylabel("held-out accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_bytes.png", dpi=120)
    plt.close(fig)
    line_plot(res, "codebook", ["LAM codes"], [str(k) for k in CODEBOOKS], list(CODEBOOKS), "codebook size K",
              "held-out accuracy", out / "accuracy_vs_codebook.png")
    line_plot(res, "lossy", LAMS, [str(r) for r in ERROR_RATES], list(ERROR_RATES), "tokens lost on the uplink",
              "held-out accuracy", out / "accuracy_vs_token_loss.png")


def report(res: Results, sz: Sizes, cfg: RunConfig, wall_s: float) -> list[str]:
    cmd = shlex.join([".venv/bin/python", "experiments/sensing/run.py", *sys.argv[1:]])
    s = cfg.sensing
    rows = (*BASELINES, *LAMS)
    ms = ["accuracy", "macro_f1"]
    cost = [f"| {r} | {mean(res[('cost', r, 'params')]):,.0f} | {mean(res[('cost', r, 'ms')]):.2f} |" for r in rows]
    return [
        "# Sensing: Wi-Fi CSI activity recognition with sensor tokens", "",
        f"- Machine: {machine()}", f"- Date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- Command: `{cmd}` (from the repository root, git {git_rev()})", f"- Wall time: {wall_s / 60:.1f} min",
        f"- Seeds: {list(sz.seeds)} (mean ± std over seeds) for the generated set; the real recordings: seed 0, "
        f"each of {sz.folds} folds held out in turn (mean ± std over folds)", "",
        "## Generated windows (5 activities)", "",
        (f"`configs/{CONFIG}`: {cfg.data.num_clients} clients, each with {sz.per_class} generated windows of each of "
         f"{', '.join(s.classes)} ({s.window} frames, 2x2 antennas, 30 subcarriers, SNR {s.snr_db:g} dB); "
         f"{sz.eval_per_class} held-out windows per activity. LAM: the tiny backbone, FedAvg, {sz.rounds} rounds x "
         f"{sz.local_steps} local steps; {s.tokens} tokens per window (patches of {s.patch} frames). CNN / GRU: "
         f"trained from scratch centrally on the union of the clients' windows, {sz.epochs} epochs (what a server "
         "receiving raw CSI could do)."), "",
        *table(res, "sim", (*rows, SPLIT), ms, ["model", "accuracy", "macro-F1"], 3), "",
        ("Split: the device holds the sensor tokenizer and embedding, the edge server both blocks of the tiny "
         "backbone; the head is back on the device. The run measured "
         f"{mean(res[('split', 'act_up', 'bytes')]):,.0f} bytes of activations up per training window (and as many of "
         "gradients down), the size of the embeddings below."), "",
        "Parameters trained and inference time (one window, batch 1, this CPU, median of 20):", "",
        "| model | parameters trained | ms per window |", "|---|---|---|", *cost, "",
        "### What a window costs on the uplink: bytes, airtime and energy", "", *bytes_rows(cfg), "",
        "![accuracy vs bytes](accuracy_vs_bytes.png)", "",
        "### Codebook size (held-out accuracy)", "",
        *table(res, "codebook", ["LAM codes"], [str(k) for k in CODEBOOKS], ["", *[f"K = {k}" for k in CODEBOOKS]], 3), "",
        "![accuracy vs codebook](accuracy_vs_codebook.png)", "",
        "### Tokens lost on the uplink (held-out accuracy)", "",
        ("The trained models evaluated with each token lost at the given rate (a code replaced by a random one; a "
         "continuous patch zeroed), the same draws for both."), "",
        *table(res, "lossy", LAMS, [str(r) for r in ERROR_RATES], ["model", *[f"{r:.0%} lost" for r in ERROR_RATES]], 3),
        "", "![accuracy vs token loss](accuracy_vs_token_loss.png)", "",
        "## The real recordings (Intel 5300, 24 recordings, 6 activities)", "",
        (f"Recordings dealt into {sz.folds} folds stratified by activity; each fold held out in turn, whole "
         "recordings only (no window of a held-out recording is trained on); 4 clients holding whole recordings. "
         "The set is tiny (one 'sleeping' recording, which no other fold can learn; several recordings are "
         "consecutive captures of the same session): this is a pipeline check, not a benchmark."), "",
        *table(res, "real", rows, ms, ["model", "accuracy", "macro-F1"], 3), ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one seed, written to /tmp (smoke test)")
    parser.add_argument("--out", type=Path, default=None, help="where results.md and plots go")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    sz = QUICK if args.quick else FULL
    out = args.out or (Path(tempfile.gettempdir()) / "sensing_quick" if args.quick else HERE)
    out.mkdir(parents=True, exist_ok=True)
    t0, res = time.perf_counter(), results()
    for seed in sz.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            generated_seed(sz, seed, Path(tmp), res)
            print(f"seed {seed} done at {time.perf_counter() - t0:.0f} s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        real_folds(sz, Path(tmp), res)
    from edgelam.config_load import load_config

    cfg = load_config(ROOT / "configs" / CONFIG, overrides(sz, sz.seeds[0]))
    plots(res, out, cfg)
    (out / "results.md").write_text("\n".join(report(res, sz, cfg, time.perf_counter() - t0)), encoding="utf-8")
    print(f"wrote {out / 'results.md'} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
