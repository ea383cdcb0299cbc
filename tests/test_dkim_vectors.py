"""fastmta against the DKIM vectors of RFC 8463, dkimpy and OpenDKIM (tests/data/corpora/dkim)."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import dkim as dkimpy
import pytest

from fastmta.message import core
from fastmta.message.dkim import DkimKeyConfig, DkimSigner, load_signing_key, sign_tags

pytestmark = pytest.mark.core

CORPUS = Path(__file__).resolve().parent / "data" / "corpora" / "dkim"
VECTORS: dict[str, Any] = json.loads((CORPUS / "vectors.json").read_text())


def wire(path: str) -> bytes:
    """The message as it travels: CRLF line ends."""
    return core.normalize_crlf((CORPUS / path).read_bytes())


def signature_tags(message: bytes, index: int) -> list[tuple[str, str]]:
    """The tags of the index-th DKIM-Signature field, in order, whitespace removed from values."""
    fields, _ = core.split_header_fields(message)
    sigs = [f for f in fields if f.split(b":", 1)[0].strip().lower() == b"dkim-signature"]
    value = sigs[index].split(b":", 1)[1].decode("ascii")
    tags = []
    for part in value.split(";"):
        if part.strip():
            k, _, v = part.partition("=")
            tags.append((k.strip(), re.sub(r"\s+", " ", v).strip()))
    return tags


def bh_vectors() -> list[dict[str, Any]]:
    out = []
    for v in VECTORS["vectors"]:
        if v["expected"] == "pass" and isinstance(v["signature_index"], int) and v.get("message"):
            out.append(v)
    return out


@pytest.mark.parametrize("vector", bh_vectors(), ids=lambda v: v["id"])
def test_body_hash_reproduces_vector_bh(vector: dict[str, Any]) -> None:
    msg = wire(vector["message"])
    tags = dict(signature_tags(msg, vector["signature_index"]))
    body_canon = tags.get("c", "simple/simple").split("/")
    relaxed = len(body_canon) == 2 and body_canon[1] == "relaxed"
    _, offset = core.split_header_fields(msg)
    canonical = core.canonicalize_body(msg[offset:], relaxed)
    if "l" in tags:  # verifying others' signatures: l= limits the hashed body
        canonical = canonical[: int(tags["l"])]
    algo = hashlib.sha1 if tags["a"] == "rsa-sha1" else hashlib.sha256
    assert base64.b64encode(algo(canonical).digest()).decode() == tags["bh"].replace(" ", "")


def test_enough_vectors_are_checked() -> None:
    assert len(bh_vectors()) >= 50


def _rfc8463_key(vector_id: str, tmp_path: Path) -> tuple[dict[str, Any], Any]:
    vector = next(v for v in VECTORS["vectors"] if v["id"] == vector_id)
    msg = wire(vector["message"])
    tags = dict(signature_tags(msg, vector["signature_index"]))
    key = load_signing_key(
        DkimKeyConfig(
            domain=tags["d"],
            selector=tags["s"],
            key_path=str(CORPUS / vector["private_key"]),
            algorithm=tags["a"],  # type: ignore[arg-type]
            canonicalization=tags["c"],  # type: ignore[arg-type]
        )
    )
    return vector, key


@pytest.mark.parametrize("vector_id", ["rfc8463-ed25519", "rfc8463-rsa"])
def test_rfc8463_signature_reproduced_exactly(vector_id: str, tmp_path: Path) -> None:
    vector, key = _rfc8463_key(vector_id, tmp_path)
    msg = wire(vector["message"])
    tags = signature_tags(msg, vector["signature_index"])
    # The unsigned message: the example's two DKIM-Signature fields removed.
    fields, offset = core.split_header_fields(msg)
    unsigned = b"".join(f for f in fields if not f.lower().startswith(b"dkim-signature")) + b"\r\n" + msg[offset:]
    field = sign_tags(unsigned, key, [(k, "" if k in ("b", "bh") else v) for k, v in tags if k != "b"])
    produced = dict(signature_tags(field + unsigned, 0))
    assert produced["bh"] == vector["expected_bh"]
    assert produced["b"].replace(" ", "") == vector.get("expected_b", dict(tags)["b"].replace(" ", ""))
    # And dkimpy accepts the re-made field on the unsigned message.
    dns = {k.encode(): v.encode() for k, v in vector["dns"].items()}
    assert dkimpy.verify(field + unsigned, dnsfunc=lambda name, timeout=5: dns.get(name))


@pytest.mark.parametrize("unsigned", VECTORS["unsigned_inputs"], ids=lambda u: Path(u["message"]).name)
@pytest.mark.parametrize("canon", ["simple/simple", "relaxed/relaxed", "relaxed/simple"])
def test_signing_the_unsigned_inputs_verifies(unsigned: dict[str, Any], canon: str) -> None:
    rfc = next(v for v in VECTORS["vectors"] if v["id"] == "rfc8463-ed25519")
    dns = {k.encode(): v.encode() for k, v in rfc["dns"].items()}
    keys = [
        load_signing_key(
            DkimKeyConfig(
                domain="football.example.com",
                selector=sel,
                key_path=str(CORPUS / "keys" / path),
                algorithm=alg,  # type: ignore[arg-type]
                canonicalization=canon,  # type: ignore[arg-type]
            )
        )
        for sel, path, alg in [
            ("brisbane", "rfc8463_ed25519_brisbane.seed.b64", "ed25519-sha256"),
            ("test", "rfc8463_rsa_test.private.pem", "rsa-sha256"),
        ]
    ]
    msg = wire(unsigned["message"])
    signed = DkimSigner(keys).sign(msg)
    for idx in (0, 1):
        assert dkimpy.DKIM(signed).verify(idx=idx, dnsfunc=lambda name, timeout=5: dns.get(name))
