"""``edgelam data``: build data sets offline. ``edgelam data channels [CONFIG] [key=value ...]``
generates (or finds in the cache) every CSI set a channel-prediction run will use, with a
progress bar, and prints where they are and how hard they are (no prediction vs AR)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

data_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Build data sets offline (generated channels).")


def channels_report(config: Path | None, overrides: list[str]) -> Table:
    """Generate the run's channel sets; a table per evaluation environment."""
    import torch

    from edgelam.channels.csi import cache_dir
    from edgelam.channels.data import build_channel_data
    from edgelam.channels.predictors import ar_predict, nmse_db, repeat_last
    from edgelam.cli_common import console
    from edgelam.config_load import config_from_dict, load_config

    cfg = load_config(config, overrides) if config else config_from_dict({"data": {"source": "cdl"}}, overrides)
    if cfg.task != "channel_prediction":
        from edgelam.config import ConfigError

        raise ConfigError(f"data.source is '{cfg.data.source}'; `edgelam data channels` builds data.source cdl sets")
    data, _ = build_channel_data(cfg.channels, cfg.data, cfg.seed)
    console.print(data.description)
    console.print(f"cache: {cache_dir()}")
    table = Table(title=f"held-out channels (SNR {cfg.channels.eval_snr_db} dB on the past)")
    for col in ("environment", "samples", "mean power", "repeat-last NMSE dB", "AR(4) NMSE dB"):
        table.add_column(col, justify="right")
    for name, xs in data.global_eval.items():
        past, future = torch.stack([s.past for s in xs]), torch.stack([s.future for s in xs])
        ar = f"{nmse_db(ar_predict(past, cfg.channels.future), future):.2f}" if cfg.channels.mode == "tdd" else "-"
        table.add_row(name, str(len(xs)), f"{float(future.pow(2).mean() * 2):.3f}",
                      f"{nmse_db(repeat_last(past, cfg.channels.future), future):.2f}", ar)
    return table


@data_app.command("channels")
def channels_cmd(args: Optional[list[str]] = typer.Argument(None, help="[CONFIG.yaml] then key=value overrides")) -> None:
    """Generate a run's CSI sets (TR 38.901 CDL via Sionna) into the cache: `edgelam data channels
    configs/tiny_channel.yaml channels.mode=fdd`."""
    from edgelam.cli_common import _guard, _split_args, console

    config, overrides = _split_args(args or [])
    _guard(lambda: console.print(channels_report(config, overrides)))
