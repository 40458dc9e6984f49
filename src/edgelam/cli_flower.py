"""``edgelam flower``: EdgeLAM's synchronous schemes on Flower (``flower/app.py``).

``edgelam flower app CONFIG --out DIR`` writes a ready Flower App folder for a config (pyproject with
the components and run config, the config itself, LICENSE, README), to run with ``flwr run`` on a
SuperLink and real devices' SuperNodes. ``edgelam flower local CONFIG --out RUN --nodes N`` runs
that app on this machine: a SuperLink and N SuperNodes as processes, ``flwr run``, then stops them.
Runtime dependency installation is off everywhere (``uv sync`` would need the internet): the
processes use the Python environment EdgeLAM is installed in.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Optional

import typer

from edgelam.config import ConfigError, RunConfig

flower_app = typer.Typer(add_completion=False, no_args_is_help=True,
                         help="Run a synchronous EdgeLAM scheme on Flower SuperNodes (devices or local processes).")

CONNECTION = "edgelam"  # the SuperLink connection `edgelam flower local` writes into its FLWR_HOME

PYPROJECT = """\
# A Flower App written by `edgelam flower app`: the EdgeLAM run in edgelam.yaml, its rounds on SuperNodes.
# Run: flwr run . <SuperLink connection> --stream   (README.md)
[project]
name = "edgelam-flower"
version = "1.0.0"
description = "EdgeLAM federated LoRA fine-tuning ({name}, {strategy}) with client trips on Flower SuperNodes"
license = {{ file = "LICENSE" }}
dependencies = ["flwr>=1.42.0", "edgelam"]

[tool.flwr.app]
publisher = "edgelam"
fab-format-version = 1
flwr-version-target = "1.42.0"

[tool.flwr.app.components]
serverapp = "edgelam.flower.app:server_app"
clientapp = "edgelam.flower.app:client_app"

[tool.flwr.app.config]
config = "edgelam.yaml"  # the EdgeLAM config, in this folder (it travels in the app's FAB)
run-dir = {run_dir}  # the run folder on the SuperLink's machine (relative: to the SuperLink's working directory)
resume = false  # true: continue the run folder from its last checkpoint
node-timeout-s = 120  # how long to wait for a SuperNode per partition-id 0..N-1
reply-timeout-s = 3600  # how long to wait for a round's replies
"""

LICENSE = """\
EdgeLAM is licensed under the Apache License, Version 2.0 (the "License"); you may not use
this file except in compliance with the License. You may obtain a copy of the License at

    http://www.apache.org/licenses/LICENSE-2.0

Unless required by applicable law or agreed to in writing, software distributed under the
License is distributed on an "AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND,
either express or implied. See the License for the specific language governing permissions
and limitations under the License.
"""

README = """\
# EdgeLAM on Flower: {name} ({strategy})

Written by `edgelam flower app`. The whole EdgeLAM run (strategy, simulated wireless network,
run folder, checkpoints, adapters) runs in the ServerApp on the SuperLink's machine; every
client trip of a round is a "train" message to a SuperNode, whose ClientApp trains it.
Client k goes to the SuperNode started with `partition-id = k mod num-partitions`.

Every machine needs EdgeLAM installed with its Flower extra (`pip install 'edgelam[scale]'`);
nothing is installed at run time, so the apps also work offline. A device rebuilds the run's
model and data from the config each message carries and trains its client's share: data read
from files (`data.path`, `$EDGELAM_DATA`) must be at the same place on every device. The uplink
chain (`fl.uplink`, client-level DP's noise) runs in the ServerApp, as in the simulator: a
device's update crosses the network as trained.

1. The server (keeps the run folder `{run_dir}`):

       flower-superlink --insecure --disable-runtime-dependency-installation

   (one HTTP port, 8000 by default: `--port`; `--ssl-certfile/--ssl-keyfile/--ssl-ca-certfile`
   instead of `--insecure` for TLS.)

2. Each device, K = 0 .. N-1 (it serves clients K, K + N, K + 2N, ...):

       flower-supernode --insecure --superlink SERVER:8000 \\
           --node-config "partition-id=K num-partitions=N"

   (`--port` moves its local ClientApp API off 9094 when two run on one machine.)

3. Anywhere that reaches the SuperLink, with a connection in `$FLWR_HOME/config.toml`
   (default `~/.flwr/config.toml`):

       [superlink.edgelam]
       address = "SERVER:8000"
       insecure = true

       flwr run . edgelam --stream

Settings: `[tool.flwr.app.config]` in pyproject.toml, or `flwr run . edgelam --run-config "resume=true"`.
Measured per trip (wall seconds from sending to the reply, message bytes both ways):
`flower_trips.jsonl` in the run folder; the metrics rows keep the simulated network's time,
bytes and energy. A SuperNode asks for work every 3 s and starts a fresh ClientApp process per
message (one after another on a SuperNode serving several clients), so the measured seconds
include that polling, the process start and the queue.
"""


# --- the app folder ---


def write_app(cfg: RunConfig, app_dir: Path, run_dir: Path) -> Path:
    """A Flower App folder for ``cfg`` writing its run into ``run_dir``; returns ``app_dir``."""
    import yaml

    from edgelam.config_load import config_to_dict
    from edgelam.flower.app import check_strategy

    check_strategy(cfg)
    ours = {"pyproject.toml", "edgelam.yaml", "LICENSE", "README.md"}
    if app_dir.is_dir() and any(p.name not in ours for p in app_dir.iterdir()):
        raise ConfigError(f"--out {app_dir} holds other files; a Flower App ships every .py/.yaml/.json/.md file "
                          f"of its folder, so choose a new or empty folder")
    app_dir.mkdir(parents=True, exist_ok=True)
    names = {"name": cfg.name, "strategy": cfg.fl.strategy, "run_dir": run_dir}
    (app_dir / "pyproject.toml").write_text(PYPROJECT.format(**names | {"run_dir": json.dumps(str(run_dir))}),
                                            encoding="utf-8")
    header = "# flwr run . <connection> --stream   (the EdgeLAM config of this Flower App; README.md)\n"
    (app_dir / "edgelam.yaml").write_text(header + yaml.safe_dump(config_to_dict(cfg), sort_keys=False),
                                          encoding="utf-8")
    (app_dir / "LICENSE").write_text(LICENSE, encoding="utf-8")
    (app_dir / "README.md").write_text(README.format(**names), encoding="utf-8")
    return app_dir


def resolved(cfg: RunConfig) -> RunConfig:
    """``data.source: auto`` made concrete (Dolly-15k if found, else synthetic), said in one line."""
    from edgelam.cli_common import console
    from edgelam.data.build import resolve_auto

    data, line = resolve_auto(cfg.data)
    if line:
        console.print(line)
    return dataclasses.replace(cfg, data=data)


def make_app(config: Path, overrides: list[str], out: Path, run_dir: Path | None = None) -> Path:
    """``edgelam flower app``: the config (with overrides) as a Flower App folder ``out``."""
    from edgelam.config_load import load_config

    cfg = resolved(load_config(config, overrides))
    return write_app(cfg, out, run_dir if run_dir is not None else Path("runs") / f"{cfg.name}-flower")


# --- local processes ---


def flower_bin(name: str) -> str:
    """A Flower command beside this Python (the virtual environment), else on PATH."""
    here = Path(sys.executable).parent / name
    if here.is_file():
        return str(here)
    import shutil

    found = shutil.which(name)
    if found is None:
        raise ConfigError(f"`{name}` not found; install Flower with `pip install 'edgelam[scale]'`")
    return found


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def flower_env(home: Path, port: int) -> dict[str, str]:
    """The processes' environment: their own FLWR_HOME with a connection to the local SuperLink, the
    Flower commands of this environment first on PATH (SuperExec starts flwr-serverapp / flwr-clientapp
    by name), runtime dependency installation off."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                                      f'address = "127.0.0.1:{port}"\ninsecure = true\n', encoding="utf-8")
    path = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    return dict(os.environ) | {"FLWR_HOME": str(home), "PATH": path, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


def start(cmd: list[str], env: dict[str, str], log: Path | None) -> subprocess.Popen[bytes]:
    """A process in its own session (its children in its group, stopped with it); output to ``log``."""
    out: IO[bytes] | None = open(log, "wb") if log is not None else None
    try:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
                                start_new_session=True)
    finally:
        if out is not None:
            out.close()  # the child holds its own copy


def stop(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM to the process group (SuperExec and its app processes too), SIGKILL after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            continue
        time.sleep(0.2)  # the leader is gone; give its children a moment before the group's SIGKILL


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the SuperLink exited with code {proc.returncode}:\n{tail(log)}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"the SuperLink did not open port {port} within {timeout_s:.0f} s:\n{tail(log)}")


def tail(log: Path, lines: int = 15) -> str:
    text = log.read_text(encoding="utf-8", errors="replace").splitlines() if log.is_file() else ["(no log)"]
    return f"--- {log.name} ---\n" + "\n".join(text[-lines:])


def local(config: Path, overrides: list[str], out: Path, nodes: int = 2, timeout_s: float = 1800.0,
          echo: bool = True) -> dict[str, Any]:
    """``edgelam flower local``: a SuperLink and ``nodes`` SuperNodes on this machine run the config's
    Flower App into the run folder ``out``; every process is stopped at the end. Returns the summary.
    ``echo``: stream the run's log (``flwr run --stream``) to this terminal, else into the error on failure."""
    from edgelam.config_load import load_config

    if nodes < 1:
        raise ConfigError(f"--nodes must be >= 1, got {nodes}")
    out = out.resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} exists and is not an empty folder; a Flower run starts a new run folder")
    cfg = resolved(load_config(config, overrides))
    with tempfile.TemporaryDirectory(prefix="edgelam-flower-") as tmp:
        work = Path(tmp)
        app_dir = write_app(cfg, work / "app", out)
        link, *node_ports = free_ports(nodes + 1)
        env = flower_env(work / "home", link)
        logs = [work / "superlink.log", *(work / f"supernode{k}.log" for k in range(nodes)), work / "flwr-run.log"]
        procs: list[subprocess.Popen[bytes]] = []
        timed_out = False
        try:
            procs.append(start([flower_bin("flower-superlink"), "--insecure", "--port", str(link),
                                "--disable-runtime-dependency-installation"], env, logs[0]))
            wait_port(link, procs[0], logs[0])
            for k, port in enumerate(node_ports):
                procs.append(start([flower_bin("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link}",
                                    "--port", str(port), "--node-config", f"partition-id={k} num-partitions={nodes}"],
                                   env | {"FLWR_HOME": str(work / f"node{k}")}, logs[k + 1]))
            procs.append(start([flower_bin("flwr"), "run", str(app_dir), CONNECTION, "--stream"], env,
                               None if echo else logs[-1]))
            try:
                procs[-1].wait(timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
        finally:
            for proc in reversed(procs):
                stop(proc)
        summary = out / "summary.json"
        if timed_out or not summary.is_file():
            why = f"did not finish within {timeout_s:.0f} s" if timed_out else "ended without a summary.json"
            raise RuntimeError(f"the Flower run {why}; the last lines of its logs:\n"
                               + "\n".join(tail(log) for log in logs))
        result: dict[str, Any] = json.loads(summary.read_text(encoding="utf-8"))
        return result


# --- commands ---


@flower_app.command("app")
def app_cmd(
    args: Optional[list[str]] = typer.Argument(None, help="CONFIG.yaml followed by key=value overrides"),
    out: Path = typer.Option(..., "--out", help="the app folder to write"),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="the run folder on the SuperLink's machine "
                                           "(default runs/<name>-flower, relative to where the SuperLink runs)"),
) -> None:
    """Write a Flower App folder for a config: `edgelam flower app configs/tiny.yaml --out my_app`."""
    from edgelam.cli_common import _guard, _split_args, console

    def go() -> None:
        config, overrides = _split_args(args or [])
        if config is None:
            raise ConfigError("give a config file, e.g. `edgelam flower app configs/tiny.yaml --out my_app`")
        path = make_app(config, overrides, out, run_dir)
        console.print(f"Flower App: {path}\nthen: flower-superlink, flower-supernode per partition, and "
                      f"`flwr run {path} <connection> --stream` ({path / 'README.md'})")

    _guard(go)


@flower_app.command("local")
def local_cmd(
    args: Optional[list[str]] = typer.Argument(None, help="CONFIG.yaml followed by key=value overrides"),
    out: Path = typer.Option(..., "--out", help="the run folder (new, or empty)"),
    nodes: int = typer.Option(2, "--nodes", help="SuperNodes to start; client k runs on node k mod N"),
    timeout_s: float = typer.Option(1800.0, "--timeout", help="seconds before the deployment is stopped"),
) -> None:
    """Deploy on this machine: `edgelam flower local configs/tiny.yaml --out runs/fl --nodes 2`."""
    from edgelam.cli_common import _guard, _split_args, console

    def go() -> None:
        from edgelam.report import summary_table

        config, overrides = _split_args(args or [])
        if config is None:
            raise ConfigError("give a config file, e.g. `edgelam flower local configs/tiny.yaml --out runs/fl`")
        summary = local(config, overrides, out, nodes, timeout_s)
        console.print(summary_table(summary))
        console.print(f"run folder: {out}\nmeasured trips: {out / 'flower_trips.jsonl'}\nadapter: {summary['adapter']}")

    _guard(go)
