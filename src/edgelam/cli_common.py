"""What every ``edgelam`` command shares: the consoles, CONFIG + key=value argument splitting, and
the error guard that turns bad input into one line (exit 2) and anything else into one line (exit 1)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from edgelam.config import ConfigError

console = Console()
err = Console(stderr=True, soft_wrap=True)


def _split_args(args: list[str]) -> tuple[Path | None, list[str]]:
    if args and "=" not in args[0]:
        return Path(args[0]), args[1:]
    return None, args


def _guard(fn: Any) -> None:
    """Turn bad input into one clear line and exit code 2, and any other failure into one line and
    exit code 1 (EDGELAM_DEBUG=1 shows the traceback instead)."""
    from edgelam.data.sources import DataError
    from edgelam.models.load import ModelLoadError
    from edgelam.rundir import RunFolderError

    try:
        fn()
    except (ConfigError, DataError, ModelLoadError, RunFolderError, FileNotFoundError) as exc:
        _fail(exc, 2)
    except KeyboardInterrupt:
        err.print("interrupted; a run folder resumes with `edgelam run --resume RUN_DIR`")
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        _fail(exc, 1, f"{type(exc).__name__}: ")


def _fail(exc: BaseException, code: int, prefix: str = "") -> None:
    if os.environ.get("EDGELAM_DEBUG"):
        raise exc
    err.print(f"[red]error:[/] {prefix}{exc}", markup=True, highlight=False)
    if code == 1:
        err.print("(an unexpected error; EDGELAM_DEBUG=1 shows the traceback)")
    sys.exit(code)


PORT_IN_USE = 3  # the exit code of a server whose port is taken (as uvicorn's own startup failure)


def require_free_port(host: str, port: int) -> None:
    """Exit with code 3 and one line when ``host:port`` cannot be bound (in use, or not this machine's
    address), before any model loads. Bound the way uvicorn binds (SO_REUSEADDR), then released."""
    import socket

    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as exc:
        err.print(f"[red]error:[/] cannot listen on {host}:{port}: [Errno {exc.errno}] {exc.strerror}; "
                  "pick a free --port or stop what holds it", markup=True, highlight=False)
        sys.exit(PORT_IN_USE)
