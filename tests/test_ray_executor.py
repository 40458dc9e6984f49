"""runtime.executor ray: a run on a real two-node Ray cluster (two `ray start` processes on this
machine) gives the local executor's simulated time, bytes and energy exactly, its losses and
adapters to float tolerance, and both nodes train; a bad cluster address fails at once, naming it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("ray")

from edgelam.config import ConfigError  # noqa: E402
from edgelam.config_load import load_config  # noqa: E402
from edgelam.fl.ray_executor import RayExecutor, chunks  # noqa: E402
from edgelam.lifecycle import run  # noqa: E402

RAY = str(Path(sys.executable).with_name("ray")) if Path(sys.executable).with_name("ray").exists() else "ray"  # this venv's
OVERRIDES = ["fl.rounds=2", "threads=1", "eval.generate=0"]
EXACT = ("sim_time_s", "round_time_s", "bytes_up", "bytes_down", "bytes_up_total", "bytes_down_total", "energy_j",
         "energy_j_total", "clients", "dropped")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(path: Path, proc: subprocess.Popen, log: Path, timeout_s: float = 120.0) -> str:
    """The GCS address `ray start` writes into its temp dir once the node is up."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.is_file() and path.read_text().strip():
            return path.read_text().strip()
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    raise RuntimeError(f"ray start did not come up (exit {proc.poll()}):\n{log.read_text()[-3000:]}")


class Cluster:
    """A head and a worker node, each `ray start --block` in its own session and temp dir, so stopping
    them (SIGTERM, then the process group) touches no other Ray on the machine (never `ray stop`)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.dirs: list[Path] = []

    def _start(self, *args: str) -> Path:
        tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp" if os.path.isdir("/tmp") else None))  # short: socket paths
        self.dirs.append(tmp)
        env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
        log = tmp / "start.log"
        cmd = [RAY, "start", "--block", "--num-cpus=1", "--object-store-memory=100000000", "--disable-usage-stats",
               f"--temp-dir={tmp}", f"--dashboard-agent-listen-port={_free_port()}", f"--metrics-export-port={_free_port()}",
               "--include-log-monitor=false", *args]
        with open(log, "w") as out:
            self.procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True))
        return tmp

    def start(self) -> str:
        """Both nodes at once (the worker retries until the head's GCS answers); the head's address."""
        import ray

        address = f"{ray.util.get_node_ip_address()}:{_free_port()}"
        head = self._start("--head", f"--port={address.rpartition(':')[2]}", "--include-dashboard=false",
                           f"--ray-client-server-port={_free_port()}", f"--dashboard-port={_free_port()}")
        worker = self._start(f"--address={address}")
        for i, tmp in enumerate((head, worker)):
            _wait_for(tmp / "ray_current_cluster", self.procs[i], tmp / "start.log")
        return address

    def stop(self) -> None:
        for p in self.procs:
            p.send_signal(signal.SIGTERM)  # `ray start --block` stops the node's processes on SIGTERM
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(p.pid, signal.SIGKILL)  # anything of ours left in that session
            except ProcessLookupError:
                pass
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _close(a: object, b: object, key: str = "") -> None:
    """Equal structure; floats to rel 1e-5 (losses), everything else exactly."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), key
        for k in a:
            _close(a[k], b[k], f"{key}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), key
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{key}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-5), key
    else:
        assert a == b, key


class KeptPool(RayExecutor):
    """The run's pool, kept open after the run (the test closes it) with the works of its last call."""

    def run(self, works):
        self.last = list(works)
        return super().run(works)

    def close(self) -> None:
        pass


def test_a_two_node_cluster_runs_the_local_run(repo, tmp_path):
    cluster, made = Cluster(), []
    try:
        with ThreadPoolExecutor(1) as boot:  # the cluster starts (seconds) while the local run trains
            booting = boot.submit(cluster.start)
            run(load_config(repo / "configs" / "tiny.yaml", OVERRIDES), tmp_path / "local")
            address = booting.result()

        def pool(ctx):
            made.append(KeptPool(ctx.cfg))
            return made[-1]

        ray_cfg = load_config(repo / "configs" / "tiny.yaml", [*OVERRIDES, "runtime.executor=ray",
                              f"runtime.ray_address={address}", "runtime.ray_actors=2", "runtime.ray_actor_cpus=1"])
        run(ray_cfg, tmp_path / "ray", executor=pool)
        (ex,) = made
        assert len({n[0] for n in ex.nodes if n}) == 2  # one actor per node (one CPU each)
        assert len(ex.works_by_node) == 2 and sum(ex.works_by_node.values()) == 2 * 3  # both nodes trained
        # an actor that dies stops the run, naming its clients and node (never a silent retry)
        ex.ray.kill(ex.actors[1])
        with pytest.raises(RuntimeError, match=rf"Ray actor 1 on node {ex.nodes[1][1]} .* died running clients 1, 2"):
            ex.run(ex.last)
    finally:
        for ex in made:
            RayExecutor.close(ex)
        cluster.stop()
    local, remote = _rows(tmp_path / "local"), _rows(tmp_path / "ray")
    assert len(local) == len(remote) == 3
    for a, b in zip(local, remote):
        assert {k: a[k] for k in EXACT if k in a} == {k: b[k] for k in EXACT if k in b}  # the clock, bytes, energy
        for row in (a, b):
            row.pop("wall_s")
        _close(a, b)  # losses, norms to float tolerance; every trip's times, energy, FLOPs, bytes exactly
    from safetensors.torch import load_file

    ad_local = load_file(tmp_path / "local" / "adapter" / "adapter_model.safetensors")
    ad_ray = load_file(tmp_path / "ray" / "adapter" / "adapter_model.safetensors")
    assert ad_local.keys() == ad_ray.keys()
    for k in ad_local:
        assert torch.allclose(ad_local[k], ad_ray[k], rtol=1e-5, atol=1e-7), k


def test_a_bad_address_fails_at_once_naming_the_setting(repo):
    cfg = load_config(repo / "configs" / "tiny.yaml", ["runtime.executor=ray", f"runtime.ray_address=127.0.0.1:{_free_port()}"])
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="runtime.ray_address '127.0.0.1:.*no Ray cluster answers"):
        RayExecutor(cfg)
    assert time.monotonic() - t0 < 10
    with pytest.raises(ConfigError, match="must be auto or HOST:PORT"):
        RayExecutor(load_config(repo / "configs" / "tiny.yaml", ["runtime.executor=ray", "runtime.ray_address=headnode"]))


def test_without_ray_installed_the_error_says_how_to_install_it(repo, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ConfigError, match=r"runtime.executor ray needs Ray.*pip install 'edgelam\[scale\]'"):
        RayExecutor(load_config(repo / "configs" / "tiny.yaml", ["runtime.executor=ray"]))


@pytest.mark.parametrize("n, parts, sizes", [(1, 2, [1]), (3, 2, [1, 2]), (5, 2, [2, 3]), (6, 3, [2, 2, 2]), (2, 5, [1, 1])])
def test_works_are_cut_into_contiguous_chunks(n, parts, sizes):
    pieces = chunks(n, parts)
    assert [len(p) for p in pieces] == sizes
    assert [i for p in pieces for i in p] == list(range(n))  # contiguous, in order, each once


def test_an_actor_that_cannot_set_up_names_its_node_and_the_reason():
    from ray.exceptions import RayActorError

    from edgelam.fl.ray_executor import died

    exc = RayActorError(None, "The actor died because of an error raised in its creation task, "
                        "ray::ClientPool.__init__() (pid=7, ip=10.0.0.5, actor_id=ab)\n  File ...\n"
                        "edgelam.data.sources.DataError: data path 'dolly15k' not found.", True)
    msg = died(0, None, [], exc)
    assert msg.startswith("Ray actor 0 could not set up the run on node 10.0.0.5: edgelam.data.sources.DataError: "
                          "data path 'dolly15k' not found. Each node needs edgelam installed")
