"""Authenticated, tamper-evident links between the coordinator and module services, and the gateway's API keys.

``keys.py`` makes and reads a keyring (a 32-byte secret per node, API keys); ``mac.py`` signs and
verifies each message (ChaCha20-Poly1305 used as a MAC: body + sender, session, position, sequence
number, direction); ``bearer.py`` checks ``Authorization: Bearer`` at the gateway; ``tls.py`` makes a
self-signed CA and a server certificate for ``edgelam serve --tls-cert/--tls-key``.
"""
