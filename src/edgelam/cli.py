"""The ``edgelam`` command: run | sweep | unlearn | ls | plot | serve | infer | gateway | keys | data. Each subcommand is a
typed function, usable from Python too."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from edgelam.config import ConfigError, RunConfig
from edgelam.config_load import load_config

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="EdgeLAM: federated LoRA fine-tuning over a simulated wireless edge network.")
from edgelam.cli_common import _guard, _split_args, console, err  # noqa: F401 (the Python API uses them from here)
from edgelam.cli_common import require_free_port
from edgelam.cli_keys import keys_cmd
from edgelam.cli_unlearn import unlearn_cmd

def _configs_dir() -> Path:
    """The shipped configs: ./configs when run from a checkout, else beside the source tree."""
    here = Path("configs")
    return here if here.is_dir() else Path(__file__).resolve().parents[2] / "configs"


def _resolve(cfg: RunConfig) -> RunConfig:
    from edgelam.data.build import resolve_auto

    data, line = resolve_auto(cfg.data)
    console.print(line or f"data: {cfg.data.source}" + (f" ({cfg.data.path or ', '.join(cfg.data.files)})"
                                                          if cfg.data.path or cfg.data.files else ""))
    return dataclasses.replace(cfg, data=data)


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description:<7}"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), console=console,
    )


def run_with_progress(cfg: RunConfig, out_dir: Path, resume: bool) -> dict[str, Any]:
    """One run with the per-round progress bar, and a "clients" line (trips back of those started
    this round, and how many are in flight) once a round sends more than one trip."""
    from edgelam import progress
    from edgelam.lifecycle import run

    console.print(f"model: {cfg.model.name}, strategy: {cfg.fl.strategy}, {cfg.data.num_clients} clients, "
                  f"{cfg.fl.rounds} rounds -> {out_dir}")
    trips = progress.TripCount()
    with _progress() as bar:
        task = bar.add_task("round", total=cfg.fl.rounds, info="loss -  sim 0.0s  up 0 B  down 0 B")
        clients = bar.add_task("clients", total=1, visible=False, info="")

        def on_start(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        def on_trip(event: progress.Event, value: int) -> None:
            trips(event, value)
            bar.update(clients, completed=trips.done, total=max(trips.started, 1), info=f"in flight {trips.in_flight}",
                       visible=True if trips.started > 1 else None)  # shown from the first round with several trips

        def on_round(row: dict[str, Any]) -> None:
            loss = row["eval_loss"] if row["eval_loss"] is not None else row["train_loss"]
            shown = f"{loss:.3f}" if loss is not None else "-"
            bar.update(task, advance=1, info=f"loss {shown}  sim {row['sim_time_s']:.1f}s  up {human_bytes(row['bytes_up_total'])}  "
                                             f"down {human_bytes(row['bytes_down_total'])}")
            trips.new_round()  # the clients line keeps the round just done until the next trip starts

        with progress.listen(on_trip):
            return run(cfg, out_dir, resume=resume, on_round=on_round, on_start=on_start)


def run_experiment(config: Path | None, overrides: list[str], out: Path | None = None, resume: Path | None = None) -> dict[str, Any]:
    """Run a config (or resume a run folder) with a progress bar; print the summary table."""
    from edgelam.report import summary_table

    if resume is not None:
        if config is not None or overrides:
            raise ConfigError("--resume takes the run folder only; its config.yaml is used as saved")
        if not (resume / "config.yaml").is_file():
            raise ConfigError(f"--resume {resume}: no config.yaml there; is it an EdgeLAM run folder?")
        cfg, out_dir = load_config(resume / "config.yaml"), resume
        console.print(f"resuming {out_dir}")
    else:
        if config is None:
            raise ConfigError("give a config file, e.g. `edgelam run configs/tiny.yaml`, or --resume RUN_DIR")
        cfg = _resolve(load_config(config, overrides))
        out_dir = out or Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    summary = run_with_progress(cfg, out_dir, resume is not None)
    console.print(summary_table(summary))
    console.print(f"run folder: {out_dir}\nadapter (PEFT format): {summary['adapter']}\nplots: {summary['plot']}")
    return summary


@app.command("run")
def run_cmd(
    args: Optional[list[str]] = typer.Argument(None, help="CONFIG.yaml followed by key=value overrides"),
    out: Optional[Path] = typer.Option(None, "--out", help="run folder (default runs/<name>-<time>)"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="continue a run folder from its last round"),
) -> None:
    """Run an experiment from a YAML config: `edgelam run configs/tiny.yaml fl.rounds=5 --out runs/x`."""
    config, overrides = _split_args(args or [])
    _guard(lambda: run_experiment(config, overrides, out, resume))


@app.command("sweep")
def sweep_cmd(
    sweep_file: Path = typer.Argument(..., help="experiment YAML: base config, variants, target"),
    out: Optional[Path] = typer.Option(None, "--out", help="folder for the variants' runs, results.md and curves.png"),
) -> None:
    """Run an experiment's variants side by side (resumable) and write results.md and curves.png."""
    from edgelam.sweep import load_sweep, run_sweep

    def go() -> None:
        sweep = load_sweep(sweep_file)
        target = out or Path("runs") / "sweeps" / sweep.name
        console.print(f"sweep '{sweep.name}': {len(sweep.variants)} variants -> {target}")
        console.print(f"wrote {run_sweep(sweep_file, target, lambda cfg, d, resume: run_with_progress(_resolve(cfg), d, resume))}")

    _guard(go)


app.command("unlearn")(unlearn_cmd)  # cli_unlearn.py
app.command("keys")(keys_cmd)  # cli_keys.py


@app.command("ls")
def ls_cmd() -> None:
    """List strategies, models, data sets found under $EDGELAM_DATA, and shipped configs."""
    from edgelam.data.sources import data_root
    from edgelam.data.synthetic import TASKS
    from edgelam.fl.strategies import DESCRIPTIONS
    from edgelam.models.load import MODELS

    console.print("[bold]strategies[/] (fl.strategy)")
    for k, v in DESCRIPTIONS.items():
        console.print(f"  {k:10s} {v}")
    console.print("[bold]aggregators[/] (fl.aggregator): mean (by samples), median, trimmed_mean (coordinate-wise)")
    console.print("[bold]uplink transforms[/] (fl.uplink, in order): clip (fl.clip_norm), float16")
    from edgelam.config import TASK_NAMES

    console.print(f"[bold]tasks[/] (task): auto, {', '.join(TASK_NAMES)}")
    console.print("[bold]models[/] (model.name)")
    for k, v in MODELS.items():
        console.print(f"  {k:18s} {v}")
    root = data_root()
    console.print(f"[bold]data sets[/] under EDGELAM_DATA={root}")
    found = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    console.print("  " + (", ".join(found) if found else "(none found)"))
    console.print(f"  synthetic tasks: {', '.join(TASKS)}")
    configs = _configs_dir()
    console.print(f"[bold]configs[/] ({configs})")
    for p in sorted(configs.glob("*.yaml")):
        first = p.read_text().splitlines()[0].lstrip("# ") if p.stat().st_size else ""
        console.print(f"  {p.name:24s} {first}")


@app.command("plot")
def plot_cmd(
    run_dirs: list[Path] = typer.Argument(..., help="one or more run folders"),
    out: Path = typer.Option(Path("curves.png"), "--out", help="image file to write"),
) -> None:
    """Plot loss and perplexity against round and simulated time for several runs on one figure."""
    from edgelam.report import plot_runs

    _guard(lambda: console.print(f"wrote {plot_runs(run_dirs, out)}"))


@app.command("serve")
def serve_cmd(
    model: Optional[str] = typer.Option(None, "--model", help="model.name as in run configs (tiny-varied, smollm2, HF id, "
                                        ".gguf); default: the adapters' (their edgelam_task.json), else tiny-varied"),
    module: str = typer.Option(..., "--module", help="embed | head | full | full:K | blocks:START:STOP (blocks START..STOP-1); "
                                                    "a classifier: full"),
    port: int = typer.Option(8100, "--port", help="TCP port, 1-65535"),
    host: str = typer.Option("127.0.0.1", "--host"),
    adapter: Optional[list[str]] = typer.Option(None, "--adapter", help="NAME=PEFT_FOLDER, repeatable; chosen per request"),
    session_ttl: float = typer.Option(300.0, "--session-ttl", help="seconds (> 0) an idle session keeps its KV cache"),
    wire_dtype: str = typer.Option("float32", "--wire-dtype", help="float32 | float16 for hidden states in responses"),
    max_request_tokens: int = typer.Option(8192, "--max-request-tokens",  # = modules.DEFAULT_MAX_REQUEST_TOKENS
                                           help="most tokens one request may carry (413 above; the model's context "
                                                "is a limit too)"),
    max_body_mb: float = typer.Option(256.0, "--max-body-mb", help="largest request body in MiB (413 above, checked "
                                                                    "before the body is read)"),
    keys: Optional[Path] = typer.Option(None, "--keys", help="keyring (edgelam keys): take only signed requests, "
                                                             "sign the answers"),
    node: Optional[str] = typer.Option(None, "--node", help="this service's node name in the keyring (with --keys)"),
    tls_cert: Optional[Path] = typer.Option(None, "--tls-cert", help="server certificate (PEM): serve HTTPS"),
    tls_key: Optional[Path] = typer.Option(None, "--tls-key", help="the certificate's private key (PEM)"),
    max_concurrent: int = typer.Option(256, "--max-concurrent",  # = limits.DEFAULT_SERVICE_MAX_CONCURRENT
                                       help="most requests in flight (503 with Retry-After above; /health, /ready "
                                            "and /metrics always answer)"),
    push_to: Optional[list[str]] = typer.Option(None, "--push-to", help="URL of a next-stage service this one may push "
                                                "its hidden state to (repeatable; infer/push.py)"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch intra-op threads (default: one per usable core)"),
    cpus: Optional[str] = typer.Option(None, "--cpus", help="pin the service to these cores, e.g. 0,1 or 0-3"),
    max_batch: int = typer.Option(32, "--max-batch", help="most concurrent sessions' decode steps run as one batch "
                                                          "(1: one request at a time)"),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="int8: the blocks' and LM head's weights in int8 "
                                                                    "(dynamic quantisation, CPU)"),
) -> None:
    """Serve one module of a model over HTTP (FastAPI): /v1/forward, /v1/predict, /health, /ready, /info, /metrics.
    The task (causal LM, classification) and base model come from the adapters' task cards."""
    from edgelam.infer.threads import parse_cpus, passive_threads

    passive_threads()  # before torch is imported: idle OpenMP workers sleep (infer/threads.py)
    from edgelam.infer.service import serve

    def go() -> None:
        adapters = _adapters(adapter or [])
        if quantize not in (None, "int8"):
            raise ConfigError(f"--quantize must be int8 (or left out), got '{quantize}'")
        if max_batch < 1:
            raise ConfigError(f"--max-batch must be >= 1, got {max_batch}")
        if threads is not None and threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {threads}")
        try:
            pinned = parse_cpus(cpus, "--cpus") if cpus is not None else None
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if any(not u.startswith(("http://", "https://")) for u in push_to or []):
            raise ConfigError(f"--push-to takes service URLs such as http://10.0.0.2:8100, got {push_to}")
        _check_port(port)
        require_free_port(host, port)
        if not session_ttl > 0:
            raise ConfigError(f"--session-ttl must be > 0 seconds, got {session_ttl}")
        if wire_dtype not in ("float32", "float16"):
            raise ConfigError(f"--wire-dtype must be float32 or float16, got '{wire_dtype}'")
        if max_request_tokens < 1 or not max_body_mb > 0:
            raise ConfigError("--max-request-tokens must be >= 1 and --max-body-mb > 0")
        if max_concurrent < 1:
            raise ConfigError(f"--max-concurrent must be >= 1, got {max_concurrent}")
        if (tls_cert is None) != (tls_key is None) or any(p and not p.is_file() for p in (tls_cert, tls_key)):
            raise ConfigError("--tls-cert and --tls-key go together and must name existing PEM files "
                              "(edgelam keys --tls makes them)")
        try:
            serve(model, module, port, host, adapters, session_ttl, wire_dtype, max_request_tokens,
                  int(max_body_mb * 2**20), str(keys) if keys else None, node,
                  (str(tls_cert), str(tls_key)) if tls_cert and tls_key else None, max_concurrent=max_concurrent,
                  push_to=frozenset(push_to or []), threads=threads, cpus=pinned, max_batch=max_batch,
                  quantize=quantize)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    _guard(go)


def _adapters(items: list[str]) -> dict[str, str]:
    adapters = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapter '{item}' must look like NAME=PEFT_FOLDER")
        adapters[name] = path
    return adapters


def _check_port(port: int) -> None:
    if not 1 <= port <= 65535:
        raise ConfigError(f"--port must be a TCP port between 1 and 65535, got {port}")


@app.command("infer")
def infer_cmd(
    topology: Path = typer.Option(..., "--topology", help="topology YAML (configs/tiny_pipeline.yaml, ...)"),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="the text to answer (generating topologies)"),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens"),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="adapter name loaded by the services"),
    chat: bool = typer.Option(True, "--chat/--raw", help="wrap the prompt in the model's chat template"),
) -> None:
    """Start a topology's services, answer one prompt through them, print per-token timings, stop them
    (`mode: predict`: time a trained predictor per placement against the coherence time)."""
    from edgelam.infer.threads import passive_threads

    passive_threads()  # the coordinator waits on its services: its idle OpenMP workers must not spin
    _guard(lambda: run_inference(topology, prompt, max_new_tokens, adapter, chat))


def run_predict_topology(topology: Path) -> dict[str, Any]:
    from edgelam.infer.deadline import deadline_table, run_predict
    from edgelam.infer.topology import load_topology

    report = run_predict(load_topology(topology))
    console.print(deadline_table(report))
    return report


def run_inference(topology: Path, prompt: str | None, max_new_tokens: int | None = None, adapter: str | None = None,
                  chat: bool = True) -> Any:
    """Answer ``prompt`` through the topology; returns the tokens. A topology that stops answering
    mid-way prints the partial answer and one error line, and exits with code 1."""
    from rich.markup import escape

    from edgelam.infer.client import StageDown
    from edgelam.infer.modules import ModuleError
    from edgelam.infer.topology import LINK_EMULATION, load_topology, open_topology
    from edgelam.security.mac import IntegrityError

    if load_topology(topology).mode == "predict":
        return run_predict_topology(topology)
    topo, base, ids, max_new = _prepare_inference(topology, prompt or "", max_new_tokens, chat)
    console.print(f"topology {topo.name}: {topo.mode}, model {topo.model}")
    console.print(f"links: {LINK_EMULATION if topo.emulate_links else 'loopback, no emulation'}")
    tokens: list[int] = []
    stamps: list[float] = []
    failure: Exception | None = None
    with open_topology(topo, base.model.config, adapter) as runner:
        if runner.plan is not None:
            console.print(runner.plan.table())
        console.print(f"services: {', '.join(f'{s.module} on {s.node}' for s in runner.services)}")
        t0 = time.perf_counter()
        try:
            for t in runner.stream(ids, max_new, base.tokenizer.eos_token_id):
                tokens.append(t)
                stamps.append(time.perf_counter() - t0)
        except (StageDown, ModuleError, IntegrityError) as exc:
            failure = exc
        report = runner.report()
    _print_inference(base.tokenizer, ids, tokens, stamps, report)
    if failure is not None:
        err.print(f"[red]error:[/] {escape(str(failure))} (the answer above is partial: {len(tokens)} of up to "
                  f"{max_new} tokens)", emoji=False, highlight=False)
        sys.exit(1)
    return tokens


def _prepare_inference(topology: Path, prompt: str, max_new_tokens: int | None, chat: bool) -> tuple[Any, Any, list[int], int]:
    """The topology, base model, prompt ids and token budget, all checked before any service starts."""
    from edgelam.infer.pipeline import prompt_ids
    from edgelam.infer.topology import load_topology
    from edgelam.models.load import load_base

    topo = load_topology(topology)
    max_new = topo.max_new_tokens if max_new_tokens is None else max_new_tokens
    if max_new < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {max_new}")
    if not prompt:
        raise ConfigError("--prompt is missing or empty; give some text to answer")
    base = load_base(topo.model, "float32", 0)
    ids = prompt_ids(base.tokenizer, prompt, chat)
    ctx = int(getattr(base.model.config, "max_position_embeddings", 0) or 0)
    if ctx and len(ids) + max_new > ctx:
        raise ConfigError(f"the prompt's {len(ids)} tokens + {max_new} new tokens exceed the model's context of {ctx} "
                          f"tokens (max_position_embeddings); shorten the prompt or lower --max-new-tokens")
    return topo, base, ids, max_new


def _print_inference(tok: Any, ids: list[int], tokens: list[int], stamps: list[float], report: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    stages = report.pop("stages", [])
    names = list(stages[0]) if stages else []
    table = Table(title="per-token timing (ms)")
    for col in ["#", "token", "since previous", *names]:
        table.add_column(col, justify="right")
    for i, (t, at) in enumerate(zip(tokens, stamps)):
        extra = [f"{stages[i][n] * 1e3:.1f}" for n in names] if i < len(stages) else []
        table.add_row(str(i), escape(repr(tok.decode([t]))), f"{(at - (stamps[i - 1] if i else 0.0)) * 1e3:.1f}", *extra)
    console.print(table)
    console.print(f"answer: {tok.decode(tokens, skip_special_tokens=True)!r}", markup=False, emoji=False)
    per_token = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else float("nan")
    console.print(f"prompt {len(ids)} tokens; time to first token {stamps[0] * 1e3:.1f} ms; "
                  f"per token after it {per_token * 1e3:.1f} ms" if stamps else "no tokens")
    for key, value in report.items():
        console.print(f"{key}: {value}", markup=False, emoji=False)


@app.command("gateway")
def gateway_cmd(
    topology: Path = typer.Option(..., "--topology", help="topology YAML the gateway fronts"),
    port: int = typer.Option(8000, "--port", help="TCP port, 1-65535"),
    host: str = typer.Option("127.0.0.1", "--host"),
    adapter: Optional[str] = typer.Option(None, "--adapter"),
    max_tokens_limit: int = typer.Option(1024, "--max-tokens-limit",
                                         help="most tokens one request may ask for (max_tokens above it: 400)"),
    api_keys: Optional[Path] = typer.Option(None, "--api-keys", help="keyring whose api_keys the clients must send "
                                            "as Authorization: Bearer (edgelam keys --api-key NAME)"),
    max_concurrent: int = typer.Option(64, "--max-concurrent",  # = limits.DEFAULT_GATEWAY_MAX_CONCURRENT
                                       help="most requests in flight, waiting ones included (503 with Retry-After "
                                            "above; /health always answers)"),
    generations: int = typer.Option(16, "--generations", help="generations run at once (the services batch their "
                                                              "decode steps); 1: one at a time"),
) -> None:
    """An OpenAI-compatible API (/v1/chat/completions, /v1/completions, streaming) in front of a topology."""
    from edgelam.infer.threads import passive_threads

    passive_threads()
    _guard(lambda: run_gateway(topology, port, host, adapter, max_tokens_limit, api_keys, max_concurrent, generations))


def run_gateway(topology: Path, port: int = 8000, host: str = "127.0.0.1", adapter: str | None = None,
                max_tokens_limit: int = 1024, api_keys: Path | None = None, max_concurrent: int = 64,
                generations: int = 16) -> None:
    """Start the topology and serve the gateway until SIGINT / SIGTERM; the services stop with it."""
    import uvicorn

    from edgelam.infer.gateway import create_gateway
    from edgelam.infer.topology import load_topology, open_topology
    from edgelam.models.load import load_base

    _check_port(port)
    require_free_port(host, port)
    if max_tokens_limit < 1:
        raise ConfigError(f"--max-tokens-limit must be >= 1, got {max_tokens_limit}")
    if max_concurrent < 1:
        raise ConfigError(f"--max-concurrent must be >= 1, got {max_concurrent}")
    if generations < 1:
        raise ConfigError(f"--generations must be >= 1, got {generations}")
    from edgelam.security.keys import load_api_keys

    bearer = load_api_keys(api_keys) if api_keys else None
    topo = load_topology(topology)
    base = load_base(topo.model, "float32", 0)
    ctx = int(getattr(base.model.config, "max_position_embeddings", 0) or 0) or None
    with open_topology(topo, base.model.config, adapter) as runner:
        app_ = create_gateway(runner.stream, base.tokenizer, topo.model, min(topo.max_new_tokens, max_tokens_limit),
                              max_tokens_limit, ctx, runner.dead, bearer, max_concurrent=max_concurrent,
                              generations=generations)
        console.print(f"gateway for {topo.name} ({topo.mode}) on http://{host}:{port}/v1"
                      + (f" (API keys required: {len(bearer)} from {api_keys})" if bearer else ""))
        uvicorn.run(app_, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)


def main() -> None:
    import warnings

    from edgelam.cli_data import data_app
    from edgelam.cli_flower import flower_app

    app.add_typer(data_app, name="data")
    app.add_typer(flower_app, name="flower")
    from transformers.utils import logging as hf_logging

    # Library deprecation chatter is not for our users; EDGELAM_DEBUG=1 keeps it.
    if not os.environ.get("EDGELAM_DEBUG"):
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="peft")
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    app()


if __name__ == "__main__":
    main()
