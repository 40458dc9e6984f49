"""TLS for module services: a self-signed CA and one server certificate (``edgelam keys --tls``).

The MACs give integrity and authenticity; TLS adds confidentiality (the hidden states and token ids
are otherwise readable on the link). ``make_tls`` writes the CA certificate, the server certificate
(for the given DNS names and IP addresses) and the server's private key (mode 0600); the CA's own
private key is thrown away once it has signed, so nobody can issue more certificates under it.
Services take ``edgelam serve --tls-cert --tls-key``; clients verify against the CA
(``HttpTransport(url, ca=...)``, ``client_context``).
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgelam.security.keys import KeyringError, write_secret

DEFAULT_HOSTS = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class TlsFiles:
    ca: Path  # the CA certificate clients trust
    cert: Path  # the server certificate
    key: Path  # the server's private key (mode 0600)


def tls_paths(keyring: Path) -> TlsFiles:
    """``keys.json`` -> ``keys-ca.pem``, ``keys-cert.pem``, ``keys-key.pem`` beside it."""
    stem = keyring.with_suffix("")
    return TlsFiles(*(stem.with_name(f"{stem.name}-{part}.pem") for part in ("ca", "cert", "key")))


def _alt_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _cert(subject: str, issuer: str, public: ec.EllipticCurvePublicKey, signer: ec.EllipticCurvePrivateKey,
          days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(public).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False))


def make_tls(files: TlsFiles, hosts: list[str] | tuple[str, ...] = DEFAULT_HOSTS, days: int = 365,
             force: bool = False) -> TlsFiles:
    """A P-256 CA and a server certificate for ``hosts`` signed by it; write the CA and server certificates
    and the server key (0600). Refuses existing files unless ``force``."""
    if not hosts:
        raise KeyringError("--tls-host: give at least one DNS name or IP address for the server certificate")
    for p in (files.ca, files.cert, files.key):
        if p.exists() and not force:
            raise KeyringError(f"{p} already exists; pass --force to replace it")
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (_cert("EdgeLAM CA", "EdgeLAM CA", ca_key.public_key(), ca_key, days)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    server = (_cert(hosts[0], "EdgeLAM CA", server_key.public_key(), ca_key, days)
              .add_extension(x509.SubjectAlternativeName([_alt_name(h) for h in hosts]), critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    write_secret(files.key, server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()), force=True)
    files.cert.write_bytes(server.public_bytes(pem))
    files.ca.write_bytes(ca.public_bytes(pem))
    return files


def client_context(ca: str | Path) -> ssl.SSLContext:
    """An SSL context that trusts only the CA certificate in ``ca`` (and checks the host name)."""
    if not Path(ca).is_file():
        raise KeyringError(f"CA certificate {ca} not found; make one with `edgelam keys --out FILE --tls`")
    return ssl.create_default_context(cafile=str(ca))
