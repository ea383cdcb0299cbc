"""A throwaway self-signed certificate on disk for STARTTLS tests (via fastmta.smtp.tlscert)."""

from __future__ import annotations

import ssl
from pathlib import Path

from fastmta.smtp.tlscert import make_self_signed
from fastmta.smtp.tlscert import server_context as _server_context


def make_cert(directory: Path, hostname: str = "localhost") -> tuple[Path, Path]:
    pair = make_self_signed(hostname)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(pair.cert_pem)
    key_path.write_bytes(pair.key_pem)
    return cert_path, key_path


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    return _server_context(cert.read_bytes(), key.read_bytes())


def client_context_trusting(cert: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert))
