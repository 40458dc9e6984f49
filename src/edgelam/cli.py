"""The ``edgelam`` command: run | ls | plot. Each subcommand is a typed function, usable from Python too."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from edgelam.config import ConfigError, RunConfig, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="EdgeLAM: federated LoRA fine-tuning over a simulated wireless edge network.")
console = Console()
err = Console(stderr=True, soft_wrap=True)

def _configs_dir() -> Path:
    """The shipped configs: ./configs when run from a checkout, else beside the source tree."""
    here = Path("configs")
    return here if here.is_dir() else Path(__file__).resolve().parents[2] / "configs"


def _split_args(args: list[str]) -> tuple[Path | None, list[str]]:
    if args and "=" not in args[0]:
        return Path(args[0]), args[1:]
    return None, args


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
        TextColumn("[bold]round"), MofNCompleteColumn(), BarColumn(),
        TextColumn("loss {task.fields[loss]}  sim {task.fields[sim]}  up {task.fields[up]}  down {task.fields[down]}"),
        TimeElapsedColumn(), console=console,
    )


def run_with_progress(cfg: RunConfig, out_dir: Path, resume: bool) -> dict[str, Any]:
    """One run with the per-round progress bar."""
    from edgelam.fl.orchestrator import run

    console.print(f"model: {cfg.model.name}, strategy: {cfg.fl.strategy}, {cfg.data.num_clients} clients, "
                  f"{cfg.fl.rounds} rounds -> {out_dir}")
    with _progress() as bar:
        task = bar.add_task("rounds", total=cfg.fl.rounds, loss="-", sim="0.0s", up="0 B", down="0 B")

        def on_start(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        def on_round(row: dict[str, Any]) -> None:
            loss = row["eval_loss"] if row["eval_loss"] is not None else row["train_loss"]
            bar.update(task, advance=1, loss=f"{loss:.3f}" if loss is not None else "-", sim=f"{row['sim_time_s']:.1f}s",
                       up=human_bytes(row["bytes_up_total"]), down=human_bytes(row["bytes_down_total"]))

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
        if (out_dir / "metrics.jsonl").exists():
            raise ConfigError(f"--out {out_dir} already holds a run; resume it with `edgelam run --resume {out_dir}` "
                              f"or choose another folder")
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
    model: str = typer.Option("tiny-varied", "--model", help="model.name as in run configs (tiny-varied, smollm2, HF id, .gguf)"),
    module: str = typer.Option(..., "--module", help="embed | head | blocks:A:B (blocks A..B-1)"),
    port: int = typer.Option(8100, "--port"),
    host: str = typer.Option("127.0.0.1", "--host"),
    adapter: Optional[list[str]] = typer.Option(None, "--adapter", help="NAME=PEFT_FOLDER, repeatable; chosen per request"),
    session_ttl: float = typer.Option(300.0, "--session-ttl", help="seconds an idle session keeps its KV cache"),
    wire_dtype: str = typer.Option("float32", "--wire-dtype", help="float32 | float16 for hidden states in responses"),
) -> None:
    """Serve one module of a model over HTTP (FastAPI): /v1/forward, /health, /ready, /info, /metrics."""
    from edgelam.infer.service import serve

    def go() -> None:
        adapters = {}
        for item in adapter or []:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ConfigError(f"--adapter '{item}' must look like NAME=PEFT_FOLDER")
            adapters[name] = path
        if wire_dtype not in ("float32", "float16"):
            raise ConfigError(f"--wire-dtype must be float32 or float16, got '{wire_dtype}'")
        try:
            serve(model, module, port, host, adapters, session_ttl, wire_dtype)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    _guard(go)


@app.command("infer")
def infer_cmd(
    topology: Path = typer.Option(..., "--topology", help="topology YAML (configs/tiny_pipeline.yaml, ...)"),
    prompt: str = typer.Option(..., "--prompt"),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens"),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="adapter name loaded by the services"),
    chat: bool = typer.Option(True, "--chat/--raw", help="wrap the prompt in the model's chat template"),
) -> None:
    """Start a topology's services, answer one prompt through them, print per-token timings, stop them."""
    from rich.table import Table

    from edgelam.infer.pipeline import prompt_ids
    from edgelam.infer.topology import LINK_EMULATION, load_topology, open_topology
    from edgelam.models.load import load_base

    def go() -> None:
        topo = load_topology(topology)
        base = load_base(topo.model, "float32", 0)
        tok = base.tokenizer
        ids = prompt_ids(tok, prompt, chat)
        console.print(f"topology {topo.name}: {topo.mode}, model {topo.model}")
        console.print(f"links: {LINK_EMULATION if topo.emulate_links else 'loopback, no emulation'}")
        tokens: list[int] = []
        stamps: list[float] = []
        with open_topology(topo, base.model.config, adapter) as runner:
            if runner.plan is not None:
                console.print(runner.plan.table())
            console.print(f"services: {', '.join(f'{s.module} on {s.node}' for s in runner.services)}")
            t0 = time.perf_counter()
            for t in runner.stream(ids, max_new_tokens or topo.max_new_tokens, tok.eos_token_id):
                tokens.append(t)
                stamps.append(time.perf_counter() - t0)
            report = runner.report()
        stages = report.pop("stages", [])
        names = list(stages[0]) if stages else []
        table = Table(title="per-token timing (ms)")
        for col in ["#", "token", "since previous", *names]:
            table.add_column(col, justify="right")
        for i, (t, at) in enumerate(zip(tokens, stamps)):
            extra = [f"{stages[i][n] * 1e3:.1f}" for n in names] if i < len(stages) else []
            table.add_row(str(i), repr(tok.decode([t])), f"{(at - (stamps[i - 1] if i else 0.0)) * 1e3:.1f}", *extra)
        console.print(table)
        console.print(f"answer: {tok.decode(tokens, skip_special_tokens=True)!r}")
        per_token = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else float("nan")
        console.print(f"prompt {len(ids)} tokens; time to first token {stamps[0] * 1e3:.1f} ms; "
                      f"per token after it {per_token * 1e3:.1f} ms" if stamps else "no tokens")
        for key, value in report.items():
            console.print(f"{key}: {value}")

    _guard(go)


@app.command("gateway")
def gateway_cmd(
    topology: Path = typer.Option(..., "--topology", help="topology YAML the gateway fronts"),
    port: int = typer.Option(8000, "--port"),
    host: str = typer.Option("127.0.0.1", "--host"),
    adapter: Optional[str] = typer.Option(None, "--adapter"),
) -> None:
    """An OpenAI-compatible API (/v1/chat/completions, /v1/completions, streaming) in front of a topology."""
    import uvicorn

    from edgelam.infer.gateway import create_gateway
    from edgelam.infer.topology import load_topology, open_topology
    from edgelam.models.load import load_base

    def go() -> None:
        topo = load_topology(topology)
        base = load_base(topo.model, "float32", 0)
        with open_topology(topo, base.model.config, adapter) as runner:
            app_ = create_gateway(runner.stream, base.tokenizer, topo.model, topo.max_new_tokens)
            console.print(f"gateway for {topo.name} ({topo.mode}) on http://{host}:{port}/v1")
            uvicorn.run(app_, host=host, port=port, log_level="warning")

    _guard(go)


def _guard(fn: Any) -> None:
    """Turn known bad-input errors into one clear line and exit code 2 (EDGELAM_DEBUG=1 shows tracebacks)."""
    from edgelam.data.sources import DataError
    from edgelam.models.load import ModelLoadError

    try:
        fn()
    except (ConfigError, DataError, ModelLoadError, FileNotFoundError) as exc:
        if os.environ.get("EDGELAM_DEBUG"):
            raise
        err.print(f"[red]error:[/] {exc}")
        sys.exit(2)


def main() -> None:
    import warnings

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
