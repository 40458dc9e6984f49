"""Signed client updates (``fl.keys``) and a man in the middle on the uplink (``fl.attack.kind: tamper``).

With ``fl.keys`` every client signs the bytes of its update (the safetensors blob that crosses the
link) with its own key, ChaCha20-Poly1305 as a MAC exactly as the inference links do
(``security/mac.py``): bound to the client's node name (``client<k>``), the server version it
trained from and the trip's sequence number. The server checks the MAC before its gate: an
update altered in transit, or signed with another key, is rejected with the reason and never
aggregated. ``fl.keys: auto`` makes a fresh keyring in memory for the run's clients (the
simulation); a file (``edgelam keys --out F --node client0 ...``) uses the nodes it holds.

``tamper`` flips one seeded bit of the update bytes of a ``fl.attack.fraction`` share of the
clients after they signed it (their radio link is hostile, the clients are honest). Without keys
the server decodes whatever arrives: a flipped exponent bit can turn a weight into 1e38, a
flipped bit in the header makes the blob unreadable (rejected as malformed). With keys every
tampered update is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from safetensors import SafetensorError

from edgelam.models.lora import deserialize
from edgelam.security.keys import Keyring, load_keyring, make_keyring
from edgelam.security.mac import Envelope, sign, verify
from edgelam.store import Purpose, rng_for

MAC_BYTES = 2 * 28 + 40  # the MAC header (hex nonce + tag) and the node / sequence headers, priced on the uplink


def node(client: int) -> str:
    return f"client{client}"


def keyring_for(spec: str | None, num_clients: int) -> Keyring | None:
    """``fl.keys``: None (unsigned), ``auto`` (fresh keys in memory) or a keyring file holding every client."""
    if spec is None:
        return None
    ring = make_keyring([node(k) for k in range(num_clients)]) if spec == "auto" else load_keyring(spec)
    ring.require([node(k) for k in range(num_clients)], "fl.keys: every client signs its updates")
    return ring


@dataclass(frozen=True)
class Uplink:
    """What crosses one client's uplink: the signed blob, possibly tampered with on the way."""

    ring: Keyring | None
    tampered: frozenset[int]  # clients whose uplink a man in the middle alters
    seed: int

    def carry(self, client: int, version: int, trip_seed: int, blob: bytes) -> tuple[bytes, str | None]:
        """(the bytes that arrive, the MAC the client sent or None when unsigned)."""
        mac = None
        if self.ring is not None:
            mac = sign(self.ring.nodes[node(client)], self.envelope(client, version, trip_seed), blob)
        if client in self.tampered:
            rng = rng_for(self.seed, Purpose.ATTACK, 3, trip_seed % 2**62)
            bit = int(rng.integers(8 * len(blob)))
            blob = blob[: bit // 8] + bytes([blob[bit // 8] ^ (1 << (bit % 8))]) + blob[bit // 8 + 1:]
        return blob, mac

    @staticmethod
    def envelope(client: int, version: int, trip_seed: int) -> Envelope:
        return Envelope("request", "update", node(client), "", str(version), trip_seed % 2**63)

    def receive(self, client: int, version: int, trip_seed: int, blob: bytes, mac: str | None) -> tuple[dict, str]:
        """The server's side: (the decoded update, "" or why it is refused)."""
        if self.ring is not None and (mac is None or not verify(self.ring.nodes[node(client)],
                                                                self.envelope(client, version, trip_seed), blob, mac)):
            return {}, (f"the update's MAC does not verify for {node(client)}: altered in transit or signed with "
                        f"another key (fl.keys)")
        try:
            return deserialize(blob), ""
        except (SafetensorError, ValueError, RecursionError) as exc:
            return {}, f"the update is not a readable safetensors blob ({type(exc).__name__}: {exc})"
