"""``edgelam unlearn RUN --client K``: remove a client's contribution from a finished run
(``privacy/unlearn.py``), with the comparison table."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from edgelam.cli_common import _guard, console


def unlearn_cmd(
    run_dir: Path = typer.Argument(..., help="a finished run folder"),
    client: int = typer.Option(..., "--client", help="the client whose contribution is removed"),
    method: str = typer.Option("retrain", "--method", help="retrain | rollback | federaser | cluster, a comma list, or all"),
    out: Optional[Path] = typer.Option(None, "--out", help="output folder (default RUN-unlearn-K)"),
    reference: bool = typer.Option(True, "--reference/--no-reference", help="also retrain from scratch (the exact reference)"),
    calibration_ratio: float = typer.Option(0.5, "--calibration-ratio", help="federaser: calibration / local steps"),
) -> None:
    """Remove a client's contribution from a finished run; compare loss on its data, membership
    inference, utility and cost against retraining from scratch; write unlearn.json."""
    _guard(lambda: run_unlearn(run_dir, client, method.split(","), out, reference, calibration_ratio))


def run_unlearn(run_dir: Path, client: int, methods: list[str], out: Path | None = None, reference: bool = True,
                calibration_ratio: float = 0.5) -> dict[str, Any]:
    """``privacy.unlearn.unlearn`` with the comparison table printed."""
    from rich.table import Table

    from edgelam.privacy.unlearn import UnlearnOptions, report_rows, unlearn

    target = out or run_dir.resolve().with_name(f"{run_dir.resolve().name}-unlearn-{client}")
    console.print(f"unlearning client {client} from {run_dir} ({', '.join(methods)}) -> {target}")
    report = unlearn(run_dir, client, methods, target, UnlearnOptions(calibration_ratio, reference))
    headers, rows = report_rows(report)
    table = Table(*headers, title=f"unlearning client {client}; costs against {report['cost_reference']}")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for m, why in report["skipped"].items():
        console.print(f"skipped {m}: {why}", markup=False)
    console.print(f"wrote {target / 'unlearn.json'}")
    return report
