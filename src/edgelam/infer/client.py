"""Calling a module: in process, or over HTTP behind an optional emulated radio link.

``LinkShaper`` is the transport-layer link emulation (network namespaces with ``tc netem`` need
CAP_NET_ADMIN, which this project's machines do not give): each request waits half the RTT plus
its bytes over the link rate before it is sent, and each response the same after it arrives.

With a ``Signer`` (``security/mac.py``) an ``HttpTransport`` signs every request and checks every
answer's MAC; a refusal (401/403) or a bad answer raises ``IntegrityError``, which is not
``StageDown``: a tampered link is an attack to report, not a dead service to fail over from.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
from torch import Tensor

from edgelam.infer.modules import ModuleError, ModuleHost
from edgelam.infer.wire import CONTENT_TYPE, pack, unpack
from edgelam.security.mac import Envelope, IntegrityError, Signer, bound


class StageDown(RuntimeError):
    """The service did not answer (connection refused or reset, timeout, server error)."""


class SessionLost(RuntimeError):
    """The service no longer holds the session (restarted, expired): replay it from position 0."""


@dataclass(frozen=True)
class LinkShaper:
    rtt_s: float = 0.0
    rate_bps: float | None = None  # None: unlimited

    def one_way_s(self, n_bytes: int) -> float:
        return self.rtt_s / 2 + (8 * n_bytes / self.rate_bps if self.rate_bps else 0.0)


@dataclass
class CallStats:
    calls: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    seconds: float = 0.0  # wall time of the calls, link emulation included
    link_seconds: float = 0.0  # of which the emulated link


class Transport(Protocol):
    name: str
    stats: CallStats

    def call(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]: ...

    def close_session(self, session: str) -> None: ...


class LocalTransport:
    """The module in this process (the device's own embedding and head, or a test)."""

    def __init__(self, host: ModuleHost, name: str = "local") -> None:
        self.host, self.name, self.stats = host, name, CallStats()

    def call(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
        t0 = time.perf_counter()
        try:
            out = self.host.forward(tensors, meta)
        except ModuleError as exc:
            if exc.status == 409:
                raise SessionLost(str(exc)) from None
            raise
        self.stats.calls += 1
        self.stats.seconds += time.perf_counter() - t0
        return out

    def close_session(self, session: str) -> None:
        self.host.close(session)


def error_text(resp: httpx.Response) -> str:
    """The service's ``{"error": ...}`` message, or the start of whatever body came back."""
    try:
        return str(resp.json().get("error"))
    except (ValueError, AttributeError):
        return resp.text[:200]


class HttpTransport:
    """A module service at ``url`` (``edgelam serve``), tensors as safetensors bodies. ``signer`` signs the
    requests and checks that answers come from node ``peer`` (any keyring node when None); ``ca`` is the
    CA certificate an ``https://`` service is checked against (``edgelam keys --tls``)."""

    def __init__(self, url: str, name: str | None = None, link: LinkShaper | None = None, timeout_s: float = 60.0,
                 wire_dtype: str = "float32", signer: Signer | None = None, peer: str | None = None,
                 ca: str | None = None) -> None:
        self.url, self.name, self.link, self.wire_dtype = url.rstrip("/"), name or url, link, wire_dtype
        self.signer, self.peer = signer, peer
        verify: Any = True
        if ca is not None:
            from edgelam.security.tls import client_context

            verify = client_context(ca)
        self.client = httpx.Client(timeout=timeout_s, verify=verify)
        self.stats = CallStats()

    def call(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
        body = pack(tensors, meta, self.wire_dtype)
        headers, sent = {"content-type": CONTENT_TYPE}, None
        if self.signer is not None:
            sent, auth = self.signer.sign("forward", *bound(meta), body)
            headers.update(auth)
        t0 = time.perf_counter()
        wait = self.link.one_way_s(len(body)) if self.link else 0.0
        time.sleep(wait)
        try:
            resp = self.client.post(f"{self.url}/v1/forward", content=body, headers=headers)
        except httpx.TransportError as exc:
            raise StageDown(f"{self.name}: {type(exc).__name__}: {exc}") from None
        self._check_status(resp, sent)
        if resp.status_code != 200:  # a client error: the service is up, failover would not help
            raise ModuleError(f"{self.name}: HTTP {resp.status_code}: {error_text(resp)}", resp.status_code)
        back = self.link.one_way_s(len(resp.content)) if self.link else 0.0
        time.sleep(back)
        self.stats.calls += 1
        self.stats.bytes_up += len(body)
        self.stats.bytes_down += len(resp.content)
        self.stats.seconds += time.perf_counter() - t0
        self.stats.link_seconds += wait + back
        return unpack(resp.content)

    def _check_status(self, resp: httpx.Response, sent: Envelope | None) -> None:
        """Raise what the status means for failover; a signed 200's MAC must verify."""
        if resp.status_code == 409:
            raise SessionLost(f"{self.name}: {error_text(resp)}")
        if resp.status_code >= 500:
            raise StageDown(f"{self.name}: HTTP {resp.status_code}: {error_text(resp)}")
        if resp.status_code in (401, 403):
            raise IntegrityError(f"{self.name}: the service refused the request (HTTP {resp.status_code}): "
                                 f"{error_text(resp)}")
        if resp.status_code == 200 and self.signer is not None and sent is not None:
            self.signer.check_answer(sent, resp.headers, resp.content, self.peer, self.name)

    def close_session(self, session: str) -> None:
        """Free the session's cache; a courtesy that never raises (idle sessions expire anyway)."""
        headers = self.signer.sign("close", session, "", b"")[1] if self.signer is not None else None
        try:
            self.client.delete(f"{self.url}/v1/sessions/{session}", timeout=2.0, headers=headers)
        except httpx.TransportError:
            pass


@dataclass
class Stage:
    """One module of the chain and the services able to run it; keeps what it sent, per session, so
    a replacement service can rebuild the KV cache (Petals' client-side cache of inputs)."""

    name: str
    candidates: list[Any]  # Transport
    active: int = 0
    dead: set[int] = field(default_factory=set)
    history: list[tuple[int, dict[str, Tensor]]] = field(default_factory=list)  # (position, inputs) chunks sent
    failovers: list[dict[str, Any]] = field(default_factory=list)

    @property
    def transport(self) -> Any:
        return self.candidates[self.active]

    def _switch(self, reason: str) -> None:
        self.dead.add(self.active)
        alive = [i for i in range(len(self.candidates)) if i not in self.dead]
        if not alive:
            raise StageDown(f"no service left for {self.name} ({reason})")
        old, self.active = self.transport.name, alive[0]
        self.failovers.append({"stage": self.name, "from": old, "to": self.transport.name, "reason": reason,
                               "replayed_chunks": len(self.history)})

    def _replay(self, meta: dict[str, Any]) -> None:
        """Resend the session's past inputs in their original chunks: the new cache is bit-identical."""
        for pos, inputs in self.history:
            self.transport.call(inputs, {**meta, "position": pos})

    def call(self, tensors: dict[str, Tensor], meta: dict[str, Any], stateful: bool) -> dict[str, Tensor]:
        while True:
            try:
                out, _ = self.transport.call(tensors, meta)
                break
            except StageDown as exc:
                self._switch(str(exc))
                if stateful:
                    self._replay_until_ok(meta)
            except SessionLost as exc:
                if not stateful:
                    raise
                self.failovers.append({"stage": self.name, "from": self.transport.name, "to": self.transport.name,
                                       "reason": str(exc), "replayed_chunks": len(self.history)})
                self._replay_until_ok(meta)
        if stateful:
            self.history = [(p, h) for p, h in self.history if p < meta["position"]]  # a rollback drops the rest
            self.history.append((meta["position"], tensors))
        return out

    def _replay_until_ok(self, meta: dict[str, Any]) -> None:
        self.history = [(p, h) for p, h in self.history if p < meta["position"]]
        while True:
            try:
                self._replay(meta)
                return
            except StageDown as exc:
                self._switch(str(exc))

    def reset(self) -> None:
        self.history = []
