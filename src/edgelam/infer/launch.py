"""Module services as child processes: start them, wait until ready, stop them, and never leave orphans.

Each service is ``python -m edgelam.cli serve ...`` on a free loopback port. Its stderr goes to a
log file in the temporary folder, never to a pipe: a pipe nobody reads fills after ~64 KB of
tracebacks and the service then blocks in write(2) for good. The log's tail is shown when a
service fails to start; the file is removed when the service is stopped.

Orphans: on Linux each child asks the kernel for SIGTERM when the thread that started it dies
(``prctl(PR_SET_PDEATHSIG)``, set by ``edgelam serve`` itself when ``EDGELAM_PARENT_PID`` names
its parent), so even a kill -9 of the gateway or of ``edgelam infer`` stops its services. Start
services from a long-lived thread (the main thread). ``sigterm_exits`` turns a SIGTERM of the
parent into ``SystemExit``, so the usual clean-up (``stop_services``) runs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import httpx

from edgelam.infer.threads import WAIT_POLICY

PARENT_ENV = "EDGELAM_PARENT_PID"
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Service:
    node: str
    module: str
    url: str
    proc: subprocess.Popen[bytes]
    log: Path | None = None  # the service's stderr

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def log_tail(self, n_chars: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-n_chars:] if self.log else ""
        return ""


def start_service(model: str, module: str, node: str, wire_dtype: str = "float32", extra: list[str] | None = None) -> Service:
    """Start ``edgelam serve`` for ``module`` on a free port (not yet ready: see ``wait_ready``)."""
    port = free_port()
    cmd = [sys.executable, "-m", "edgelam.cli", "serve", "--model", model, "--module", module, "--port", str(port),
           "--wire-dtype", wire_dtype, *(extra or [])]
    fd, log = tempfile.mkstemp(prefix=f"edgelam-serve-{node}-{port}-", suffix=".log")
    env = {WAIT_POLICY: "PASSIVE", **os.environ, PARENT_ENV: str(os.getpid())}  # idle workers sleep: infer/threads.py
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=fd, env=env)
    finally:
        os.close(fd)  # the child holds its own copy
    return Service(node, module, f"http://127.0.0.1:{port}", proc, Path(log))


def die_with_parent() -> None:
    """In a service: exit on SIGTERM when the parent named by ``EDGELAM_PARENT_PID`` dies (Linux only)."""
    parent = os.environ.get(PARENT_ENV, "")
    if not parent.isdigit() or not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != int(parent):  # the parent died before prctl: nobody will signal us
        sys.exit(f"edgelam serve: parent process {parent} is gone; exiting")


def wait_ready(services: list[Service], timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    pending = list(services)
    while pending:
        for svc in list(pending):
            if svc.proc.poll() is not None:
                raise RuntimeError(f"service {svc.module} on {svc.node} exited with code {svc.proc.returncode}: "
                                   f"{svc.log_tail()}")
            try:
                if httpx.get(f"{svc.url}/ready", timeout=1.0).status_code == 200:
                    pending.remove(svc)
            except httpx.TransportError:
                pass
        if pending and time.monotonic() > deadline:
            raise TimeoutError(f"services not ready after {timeout_s:.0f} s: {[s.module for s in pending]}")
        if pending:
            time.sleep(0.1)


def stop_services(services: list[Service]) -> None:
    """SIGTERM every service, then SIGKILL any still running after 10 s; remove their logs."""
    for svc in services:
        if svc.proc.poll() is None:
            svc.proc.terminate()
    for svc in services:
        try:
            svc.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            svc.kill()
        if svc.log is not None:
            svc.log.unlink(missing_ok=True)


@contextlib.contextmanager
def sigterm_exits() -> Iterator[None]:
    """Within: the first SIGTERM raises ``SystemExit(143)`` (later ones are ignored while cleaning up).
    Only the main thread can set signal handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
