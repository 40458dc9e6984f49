"""``edgelam keys --out keys.json --node device --node edge1 [--api-key NAME] [--tls]``: a keyring for
authenticated links and the gateway's API keys (``security/keys.py``), optionally a TLS CA and server
certificate (``security/tls.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from edgelam.cli_common import _guard, console


def keys_cmd(
    out: Path = typer.Option(..., "--out", help="keyring file to write (JSON, mode 0600)"),
    node: Optional[list[str]] = typer.Option(None, "--node", help="a node that signs messages, repeatable: "
                                             "device (the coordinator) and every edge node of the topology"),
    api_key: Optional[list[str]] = typer.Option(None, "--api-key", help="a gateway client's name, repeatable: "
                                                "an API key (bearer token) is made for it"),
    tls: bool = typer.Option(False, "--tls", help="also a self-signed CA and a server certificate + key beside "
                                                  "the keyring (OUT-ca.pem, OUT-cert.pem, OUT-key.pem)"),
    tls_host: Optional[list[str]] = typer.Option(None, "--tls-host", help="a DNS name or IP address the server "
                                                 "certificate is for, repeatable (default: localhost, 127.0.0.1)"),
    force: bool = typer.Option(False, "--force", help="replace existing files"),
) -> None:
    """Make a keyring: a random 32-byte secret per node (MACs on the links between the device and the
    module services) and API keys for the gateway; nodes need the same file."""
    _guard(lambda: make_keys(out, node or [], api_key or [], tls, tls_host, force))


def make_keys(out: Path, nodes: list[str], api_keys: list[str], tls: bool = False,
              tls_hosts: list[str] | None = None, force: bool = False) -> Path:
    """Write the keyring (and the TLS files); nothing is written when any target exists and not ``force``."""
    from edgelam.security.keys import KeyringError, make_keyring, write_keyring
    from edgelam.security.tls import DEFAULT_HOSTS, make_tls, tls_paths

    ring = make_keyring(nodes, api_keys)
    files = tls_paths(out) if tls else None
    for p in [out, *((files.ca, files.cert, files.key) if files else ())]:
        if p.exists() and not force:
            raise KeyringError(f"{p} already exists; pass --force to replace it (every node holding the old keys "
                               f"must then get the new file)")
    write_keyring(out, ring, force)
    console.print(f"wrote {out} (mode 0600): nodes {', '.join(nodes) or '(none)'}", markup=False)
    for name in api_keys:
        console.print(f"API key for {name}: in {out} under api_keys.{name} (send it as Authorization: Bearer)",
                      markup=False)
    if files is not None:
        make_tls(files, tls_hosts or list(DEFAULT_HOSTS), force=force)
        console.print(f"wrote {files.ca} (CA certificate for clients), {files.cert} and {files.key} (server "
                      f"certificate and key, mode 0600: edgelam serve --tls-cert/--tls-key)", markup=False)
    return out
