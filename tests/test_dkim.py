"""DKIM signing: every signature fastmta makes verifies with dkimpy; key problems are start-up errors."""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Callable
from pathlib import Path

import dkim as dkimpy
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastmta.errors import ConfigError
from fastmta.message import core
from fastmta.message.dkim import DkimKeyConfig, DkimSigner, KeyCache, SigningKey, load_signing_key

pytestmark = pytest.mark.core

CANONS = ["simple/simple", "simple/relaxed", "relaxed/simple", "relaxed/relaxed"]
ALGS = ["rsa-sha256", "ed25519-sha256"]


class Keys:
    """An RSA-2048 and an Ed25519 key on disk plus the DNS answers that publish them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.txt: dict[str, bytes] = {}
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        ed_key = ed25519.Ed25519PrivateKey.generate()
        self.paths = {
            "rsa-sha256": self._write("rsa.pem", rsa_key),
            "ed25519-sha256": self._write("ed.pem", ed_key),
        }
        rsa_pub = rsa_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        ed_pub = ed_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.txt["rsa._domainkey.example.com."] = b"v=DKIM1; k=rsa; p=" + base64.b64encode(rsa_pub)
        self.txt["ed._domainkey.example.com."] = b"v=DKIM1; k=ed25519; p=" + base64.b64encode(ed_pub)

    def _write(self, name: str, key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> str:
        path = self.root / name
        path.write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        return str(path)

    def config(self, alg: str, canon: str = "relaxed/relaxed", **kw: object) -> DkimKeyConfig:
        selector = "rsa" if alg.startswith("rsa") else "ed"
        return DkimKeyConfig(
            domain="example.com", selector=selector, key_path=self.paths[alg], algorithm=alg, canonicalization=canon, **kw  # type: ignore[arg-type]
        )

    def dnsfunc(self, name: bytes | str, timeout: int = 5) -> bytes | None:
        key = name.decode() if isinstance(name, bytes) else name
        return self.txt.get(key if key.endswith(".") else key + ".")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return Keys(tmp_path_factory.mktemp("dkimkeys"))


def verify_all(message: bytes, dnsfunc: Callable[..., bytes | None]) -> list[bool]:
    """dkimpy's verdict on each DKIM-Signature of *message*, top first."""
    n = len(re.findall(rb"(?im)^dkim-signature:", message))
    verdicts = []
    for i in range(n):
        try:
            verdicts.append(bool(dkimpy.DKIM(message).verify(idx=i, dnsfunc=dnsfunc)))
        except dkimpy.ValidationError:  # dkimpy raises on some failures (e.g. body hash)
            verdicts.append(False)
    return verdicts


MESSAGES = {
    "plain": b"From: Alice <alice@example.com>\r\nTo: bob@example.net\r\nSubject: hi\r\n\r\nHello Bob.\r\n",
    "whitespace": (
        b"From: Alice <alice@example.com>\r\nTo:  bob@example.net \r\nSubject: \t spaced   out\t \r\n"
        b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n\r\n  trailing   \t\r\n\r\nline  two \r\n\r\n\r\n"
    ),
    "folded-duplicates": (
        b"Received: one\r\nFrom: Alice\r\n <alice@example.com>\r\nTo: a@example.net,\r\n\tb@example.net\r\n"
        b"To: c@example.net\r\nSubject: folded\r\n  subject\r\nList-Unsubscribe: <mailto:u@example.com>\r\n\r\nbody\r\n"
    ),
    "empty-body": b"From: a@example.com\r\nSubject: nothing\r\n\r\n",
    "no-body-separator": b"From: a@example.com\r\nSubject: nothing\r\n",
    "8bit-long": b"From: a@example.com\r\nSubject: 8bit\r\n\r\n" + "Grüße ".encode() * 150 + b"\r\n",
    "lone-lf": b"From: a@example.com\nSubject: lf\n\nline1\nline2\n",
}


@pytest.mark.parametrize("alg", ALGS)
@pytest.mark.parametrize("canon", CANONS)
@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_every_signature_verifies_with_dkimpy(keys: Keys, alg: str, canon: str, name: str) -> None:
    signer = DkimSigner([load_signing_key(keys.config(alg, canon))])
    signed = signer.sign(MESSAGES[name])
    # What goes on the wire is what the receiver verifies.
    wire = core.normalize_crlf(signed)
    assert verify_all(wire, keys.dnsfunc) == [True]
    sig = wire.split(b"\r\n\r\n")[0]
    assert f"a={alg}".encode() in sig and f"c={canon}".encode() in sig
    assert b" l=" not in sig and b";l=" not in sig
    # From is oversigned: listed once more than it occurs.
    h = re.search(rb"h=([^;]*);", sig.replace(b"\r\n", b""))
    assert h is not None
    names = [n.strip().lower() for n in h.group(1).split(b":")]
    assert names.count(b"from") == 2


@pytest.mark.parametrize("alg", ALGS)
def test_tampering_is_detected(keys: Keys, alg: str) -> None:
    signer = DkimSigner([load_signing_key(keys.config(alg, "relaxed/relaxed"))])
    signed = signer.sign(MESSAGES["plain"])
    assert verify_all(signed, keys.dnsfunc) == [True]
    assert verify_all(signed.replace(b"Hello Bob.", b"Hello Eve."), keys.dnsfunc) == [False]
    assert verify_all(signed.replace(b"Subject: hi", b"Subject: hI"), keys.dnsfunc) == [False]
    # A second From added later breaks the signature (oversigning).
    assert verify_all(signed.replace(b"\r\n\r\n", b"\r\nFrom: evil@example.org\r\n\r\n", 1), keys.dnsfunc) == [False]


def test_dual_signature_both_verify(keys: Keys) -> None:
    signer = DkimSigner(
        [load_signing_key(keys.config("rsa-sha256", "relaxed/simple")), load_signing_key(keys.config("ed25519-sha256"))]
    )
    signed = signer.sign(MESSAGES["folded-duplicates"], timestamp=1_700_000_000)
    assert verify_all(signed, keys.dnsfunc) == [True, True]
    assert signed.count(b"DKIM-Signature:") == 2 and b"t=1700000000" in signed


def test_headers_signed_by_default_and_custom_list(keys: Keys) -> None:
    msg = MESSAGES["folded-duplicates"]
    default = DkimSigner([load_signing_key(keys.config("ed25519-sha256"))]).signature_fields(msg)
    h = re.search(rb"h=([^;]*);", default.replace(b"\r\n", b"")).group(1)  # type: ignore[union-attr]
    # Present headers of the default list, duplicates once per instance; Received is not signed.
    assert h.split(b":") == [b"from", b"from", b"to", b"to", b"subject", b"list-unsubscribe"]
    custom = DkimSigner([load_signing_key(keys.config("ed25519-sha256", headers=("From", "Received")))])
    signed = custom.sign(msg)
    assert b"h=from:from:received;" in signed.replace(b"\r\n ", b"")
    assert verify_all(signed, keys.dnsfunc) == [True]


body_pieces = st.sampled_from([b" ", b"\t", b"\r\n", b"\r\n\r\n", b"x", b"long" * 50, b".", b"\xc3\xa9", b"  \r\n"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(body_pieces, max_size=30).map(b"".join), st.sampled_from(CANONS), st.sampled_from(ALGS))
def test_random_bodies_verify(keys: Keys, body: bytes, canon: str, alg: str) -> None:
    msg = b"From: a@example.com\r\nTo: b@example.net\r\nSubject: random\r\n\r\n" + body
    signed = DkimSigner([load_signing_key(keys.config(alg, canon))]).sign(msg)
    # The receiver verifies the wire form (to_wire ends the last line with CRLF).
    assert verify_all(core.normalize_crlf(signed), keys.dnsfunc) == [True]


# ----------------------------------------------------------------- key loading


def test_keys_are_cached_per_domain_and_selector(keys: Keys) -> None:
    cache = KeyCache()
    a = cache.load(keys.config("rsa-sha256"))
    b = cache.load(keys.config("rsa-sha256"))
    assert a is b and len(cache) == 1
    assert cache.get("EXAMPLE.com", "rsa") is a
    cache.load(keys.config("ed25519-sha256"))
    assert len(cache) == 2


def _cfg(path: str, alg: str = "rsa-sha256") -> DkimKeyConfig:
    return DkimKeyConfig(domain="example.com", selector="s1", key_path=path, algorithm=alg)  # type: ignore[arg-type]


def test_missing_key_is_config_error_naming_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.pem")
    with pytest.raises(ConfigError, match=re.escape(path)) as err:
        load_signing_key(_cfg(path), source="fastmta.toml")
    assert "fastmta.toml" in str(err.value) and "s1._domainkey.example.com" in str(err.value)


def test_unreadable_key_is_config_error(tmp_path: Path) -> None:
    # A directory cannot be read as a file, even by root.
    with pytest.raises(ConfigError, match="unreadable") as err:
        load_signing_key(_cfg(str(tmp_path)))
    assert str(tmp_path) in str(err.value)


def test_garbage_key_is_config_error(tmp_path: Path) -> None:
    for content in (b"-----BEGIN PRIVATE KEY-----\nnonsense\n-----END PRIVATE KEY-----\n", b"hello"):
        path = tmp_path / "bad.pem"
        path.write_bytes(content)
        with pytest.raises(ConfigError, match=re.escape(str(path))):
            load_signing_key(_cfg(str(path)))


def test_mismatched_key_is_config_error(keys: Keys) -> None:
    with pytest.raises(ConfigError, match="not an Ed25519 key"):
        load_signing_key(_cfg(keys.paths["rsa-sha256"], "ed25519-sha256"))
    with pytest.raises(ConfigError, match="not an RSA key"):
        load_signing_key(_cfg(keys.paths["ed25519-sha256"], "rsa-sha256"))


# A throwaway 768-bit key (cryptography refuses to generate keys this short).
SHORT_RSA_PEM = b"""-----BEGIN PRIVATE KEY-----
MIIB5AIBADANBgkqhkiG9w0BAQEFAASCAc4wggHKAgEAAmEAvWwX6K43eU/AEAzN
G303+xg63usCpB4FSp+xegGJMm3/7qsTfmfGn2CGgbn6epQvjCadYWFkD2ikcmiQ
FeXEJWz7hPL4MZ3+I5qoi+6nsiyG10hc5LzCuW7cjo4pi1QbAgMBAAECYGqsM+6y
JcVodwXS37MKWntKUuT0vgEEcwBqXD0UHlpK/iU/LHQ0JvPcHQNzY66iQgg6sQO9
953+HsT5wJ0rCRh6ugpigIggk76x/6OixhdwRYACSJ6Y60MnopjC5mr5IQIxAOd+
hWSeFas26Yzw/pjc5byVkAGUn4UG8g5UdNjQv4IJ5BJusnaXBZNcbBV+N7/z8QIx
ANF5bJnWNlRW7m7L2tO4ftR3mPrtPGBdnXXSt146E9DzvxodCMBqb/7B6ry8oXck
ywIxAJ/A/XdJbTTB6Xz9VwXQ864oHMAqe8eG2oavHBAARxkLkFx0Di6u3Acs8d4H
Q5vxUQIwKanYAuULW00LEXh0ZsX8W/AJumbzKkuUZPnrRM+SX24LpXr+4Z6J9gbF
1JJEHzlvAjBE5UMxart2pscYtD3g9r0XeQpUHQkAWpcr3nz5A5IzZaZHLavcZyYh
8J1g8fePbnc=
-----END PRIVATE KEY-----
"""


def test_short_rsa_key_is_config_error(tmp_path: Path) -> None:
    path = tmp_path / "short.pem"
    path.write_bytes(SHORT_RSA_PEM)
    with pytest.raises(ConfigError, match="768-bit") as err:
        load_signing_key(_cfg(str(path)))
    assert str(path) in str(err.value)


def test_rsa_sha1_and_bad_canonicalization_are_rejected(keys: Keys) -> None:
    import msgspec

    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(
            {"domain": "example.com", "selector": "s", "key_path": keys.paths["rsa-sha256"], "algorithm": "rsa-sha1"},
            DkimKeyConfig,
        )
    bad = DkimKeyConfig(domain="example.com", selector="s", key_path=keys.paths["rsa-sha256"], algorithm="rsa-sha1")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="rsa-sha1"):
        load_signing_key(bad)
    with pytest.raises(ConfigError, match="canonicalization"):
        load_signing_key(keys.config("rsa-sha256", "loose/simple"))


def test_ed25519_seed_file_is_accepted(tmp_path: Path) -> None:
    seed = os.urandom(32)
    path = tmp_path / "ed.seed"
    path.write_bytes(base64.b64encode(seed) + b"\n")
    key: SigningKey = load_signing_key(_cfg(str(path), "ed25519-sha256"))
    expected = ed25519.Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw()
    assert isinstance(key.private_key, ed25519.Ed25519PrivateKey)
    assert key.private_key.public_key().public_bytes_raw() == expected


@settings(max_examples=50, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.binary(max_size=2000))
def test_ed25519_signature_through_libsodium_equals_openssls(seed: bytes, data: bytes) -> None:
    # sign_raw goes through libsodium for speed; Ed25519 is deterministic, so
    # it must give exactly the signature OpenSSL (cryptography) gives, and it
    # must verify under the key's public key.
    import hashlib
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ed.seed"
        path.write_bytes(base64.b64encode(seed))
        key = load_signing_key(_cfg(str(path), "ed25519-sha256"))
    openssl_key = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    digest = hashlib.sha256(data).digest()
    signature = key.sign_raw(data)
    assert signature == openssl_key.sign(digest)
    openssl_key.public_key().verify(signature, digest)  # raises if it does not verify


@settings(max_examples=100)
@given(st.lists(body_pieces, max_size=40).map(b"".join), st.booleans(), st.integers(1, 64))
def test_body_hash_of_chunks_equals_whole(body: bytes, relaxed: bool, size: int) -> None:
    import hashlib

    from fastmta.message.dkim import body_hash

    whole = base64.b64encode(hashlib.sha256(core.canonicalize_body(body, relaxed)).digest()).decode()
    assert body_hash((body[i : i + size] for i in range(0, len(body), size)), relaxed) == whole


@pytest.mark.parametrize("alg", ALGS)
def test_large_message_streams_and_verifies(keys: Keys, alg: str) -> None:
    body = b"".join(b"line %d  with\t spaces \r\n" % i for i in range(20000)) + b"\r\n\r\n"
    msg = b"From: a@example.com\r\nSubject: big\r\n\r\n" + body
    assert len(body) > 4 * 16384
    signed = DkimSigner([load_signing_key(keys.config(alg, "relaxed/relaxed"))]).sign(msg)
    assert verify_all(signed, keys.dnsfunc) == [True]
