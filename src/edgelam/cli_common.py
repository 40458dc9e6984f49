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
