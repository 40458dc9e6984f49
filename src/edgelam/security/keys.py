"""The keyring: a random 32-byte secret per node (MACs on the links) and the gateway's API keys.

    {"edgelam_keyring": 1,
     "nodes": {"device": "<64 hex digits>", "edge1": "...", ...},
     "api_keys": {"alice": "sk-edgelam-..."}}

One keyring is one trust domain: every process given the file can sign as any node in it, so give
a node only the file of the deployment it belongs to. The file holds secrets: it is written
atomically with mode 0600, and refused when group or others may read or write it (like ssh's keys).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgelam.config_checks import ConfigError

FORMAT_VERSION = 1
SECRET_BYTES = 32
API_KEY_PREFIX = "sk-edgelam-"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class KeyringError(ConfigError):
    """A keyring file that is missing, malformed, too open, or lacks a node that is needed."""


@dataclass(frozen=True)
class Keyring:
    nodes: dict[str, bytes] = field(repr=False)  # node name -> 32-byte secret
    api_keys: dict[str, str] = field(default_factory=dict, repr=False)  # client name -> bearer token
    path: str = ""

    def key(self, node: str) -> bytes | None:
        return self.nodes.get(node)

    def require(self, names: list[str], what: str) -> None:
        """A ``KeyringError`` naming the ``names`` that have no key (``what`` says who needs them)."""
        missing = sorted(set(names) - set(self.nodes))
        if missing:
            raise KeyringError(f"keyring {self.path or '(in memory)'} has no key for {', '.join(missing)} ({what}); "
                               f"it holds {sorted(self.nodes)}: make one with `edgelam keys --out FILE "
                               + " ".join(f"--node {n}" for n in sorted(set(self.nodes) | set(names))) + "`")


def check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise KeyringError(f"{what} '{name}' must be 1-64 letters, digits, '_', '.' or '-' (starting with a letter or "
                           f"digit)")
    return name


def make_keyring(nodes: list[str], api_keys: list[str] | None = None) -> Keyring:
    """Fresh random secrets (``secrets``: the OS's CSPRNG) for ``nodes`` and bearer tokens for ``api_keys``."""
    if not nodes and not api_keys:
        raise KeyringError("a keyring needs at least one --node (or --api-key)")
    for group, what in ((nodes, "node"), (api_keys or [], "API key name")):
        dup = sorted({n for n in group if group.count(n) > 1})
        if dup:
            raise KeyringError(f"{what} {dup[0]} is given twice")
        for n in group:
            check_name(n, what)
    return Keyring({n: secrets.token_bytes(SECRET_BYTES) for n in nodes},
                   {n: API_KEY_PREFIX + secrets.token_urlsafe(32) for n in api_keys or []})


def to_json(ring: Keyring) -> dict[str, Any]:
    return {"edgelam_keyring": FORMAT_VERSION, "nodes": {n: k.hex() for n, k in ring.nodes.items()},
            "api_keys": dict(ring.api_keys)}


def write_secret(path: Path, data: bytes, force: bool = False) -> None:
    """Write ``data`` to ``path`` with mode 0600 via a temporary file in the same folder, fsync, rename;
    refuse an existing file unless ``force``."""
    if path.exists() and not force:
        raise KeyringError(f"{path} already exists; pass --force to replace it (every node holding the old keys "
                           f"must then get the new file)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_keyring(path: str | os.PathLike[str], ring: Keyring, force: bool = False) -> Path:
    p = Path(path)
    write_secret(p, (json.dumps(to_json(ring), indent=2) + "\n").encode(), force)
    return p


def check_private(p: Path) -> None:
    """Refuse a secrets file that group or others may read or write (POSIX permissions)."""
    mode = stat.S_IMODE(p.stat().st_mode)
    if os.name == "posix" and mode & 0o077:
        raise KeyringError(f"{p} holds secrets but is open to group or others (mode {mode:04o}); "
                           f"run `chmod 600 {p}`")


def load_keyring(path: str | os.PathLike[str]) -> Keyring:
    """Read and check a keyring; every problem is a ``KeyringError`` naming the file and what is wrong."""
    p = Path(path)
    if not p.is_file():
        raise KeyringError(f"keyring {p} not found; make one with `edgelam keys --out {p} --node device --node edge1`")
    check_private(p)
    try:
        data = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KeyringError(f"keyring {p} is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("edgelam_keyring") != FORMAT_VERSION:
        raise KeyringError(f"{p} is not an EdgeLAM keyring (a JSON object with \"edgelam_keyring\": {FORMAT_VERSION}); "
                           f"make one with `edgelam keys`")
    nodes, api = data.get("nodes", {}), data.get("api_keys", {})
    if not isinstance(nodes, dict) or not isinstance(api, dict):
        raise KeyringError(f"keyring {p}: 'nodes' and 'api_keys' must be JSON objects (name -> secret)")
    ring = {check_name(n, f"keyring {p}: node"): _secret(k, p, n) for n, k in nodes.items()}
    for n, k in api.items():
        check_name(n, f"keyring {p}: API key name")
        if not isinstance(k, str) or len(k) < 16:
            raise KeyringError(f"keyring {p}: API key '{n}' must be a string of at least 16 characters")
    return Keyring(ring, dict(api), str(p))


def load_api_keys(path: str | os.PathLike[str]) -> dict[str, str]:
    """The keyring's API keys (name -> bearer token); a ``KeyringError`` when it has none."""
    keys = load_keyring(path).api_keys
    if not keys:
        raise KeyringError(f"--api-keys {path}: the keyring has no api_keys; make one with "
                           f"`edgelam keys --out FILE --api-key NAME`")
    return keys


def _secret(value: Any, p: Path, node: str) -> bytes:
    try:
        key = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        key = b""
    if len(key) != SECRET_BYTES:
        raise KeyringError(f"keyring {p}: node '{node}' must have a {SECRET_BYTES}-byte secret as "
                           f"{2 * SECRET_BYTES} hex digits")
    return key
