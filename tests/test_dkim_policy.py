"""The [[dkim]] signing policy: keys chosen by the From domain, verified by dkimpy; config errors name the entry."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import dkim as dkimpy
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from fastmta.delivery.config import Config, load_config, parse_config
from fastmta.errors import ConfigError
from fastmta.message import core
from fastmta.message.dkim_policy import DkimPolicy, from_domain

pytestmark = pytest.mark.core


class Keys:
    """RSA-2048 and Ed25519 keys in a directory, and the TXT records that publish them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.txt: dict[str, bytes] = {}
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ed = ed25519.Ed25519PrivateKey.generate()
        for name, key in (("rsa.pem", self.rsa), ("ed.pem", self.ed)):
            (root / name).write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                )
            )
        rsa_pub = self.rsa.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        ed_pub = self.ed.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.records = {
            "rsa": b"v=DKIM1; k=rsa; p=" + base64.b64encode(rsa_pub),
            "ed": b"v=DKIM1; k=ed25519; p=" + base64.b64encode(ed_pub),
        }

    def publish(self, selector: str, domain: str, kind: str) -> None:
        self.txt[f"{selector}._domainkey.{domain}."] = self.records[kind]

    def dnsfunc(self, name: bytes | str, timeout: int = 5) -> bytes | None:
        key = name.decode() if isinstance(name, bytes) else name
        return self.txt.get(key if key.endswith(".") else key + ".")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    k = Keys(tmp_path_factory.mktemp("dkimpolicy"))
    k.publish("rsa1", "example.com", "rsa")
    k.publish("ed1", "example.com", "ed")
    k.publish("news", "news.example.com", "ed")
    k.publish("other", "example.org", "rsa")
    return k


def policy_from(keys: Keys, toml: str) -> DkimPolicy:
    return parse_config(toml, "test.toml", keys.root).dkim_policy()


DUAL = """
[[dkim]]
domain = "example.com"
selector = "rsa1"
key_file = "rsa.pem"
from_domains = ["*.example.com", "example.net"]

[[dkim]]
domain = "example.com"
selector = "ed1"
key_file = "ed.pem"
"""

RSA_ONLY = """
[[dkim]]
domain = "example.com"
selector = "rsa1"
key_file = "rsa.pem"
from_domains = ["*.example.com", "example.net"]
"""


def verdicts(message: bytes, keys: Keys) -> list[tuple[bytes, bool]]:
    """(d=/s= text, dkimpy's verdict) for each DKIM-Signature, top first."""
    wire = core.normalize_crlf(message)
    n = len(re.findall(rb"(?im)^dkim-signature:", wire))
    out = []
    for i in range(n):
        d = dkimpy.DKIM(wire)
        try:
            ok = bool(d.verify(idx=i, dnsfunc=keys.dnsfunc))
        except dkimpy.ValidationError:
            ok = False
        out.append((d.domain + b"/" + d.selector, ok))
    return out


def msg(from_field: bytes, body: bytes = b"Hello.\r\n") -> bytes:
    return from_field + b"\r\nTo: bob@example.net\r\nSubject: hi\r\nMessage-ID: <1@example.com>\r\n\r\n" + body


# ------------------------------------------------------------ From parsing


@pytest.mark.parametrize(
    ("field", "domain"),
    [
        (b"From: alice@example.com", "example.com"),
        (b"From: Alice <alice@Example.COM>", "example.com"),
        (b"from : <alice@example.com.>", "example.com"),
        (b'From: "Doe, John <x@evil.example>" <john@example.com>', "example.com"),
        (b'From: "a@b" <"weird@local"@example.com>', "example.com"),
        (b"From: =?utf-8?b?SsO8cmdlbg==?= <j@example.com>", "example.com"),
        (b"From: =?utf-8?q?J=C3=BCrgen?=\r\n\t<j@example.com>", "example.com"),
        (b"From: Alice\r\n <alice@example.com>", "example.com"),
        (b"From: alice@example.com (Alice (the) Sender)", "example.com"),
        (b"From: (comment <x@evil.example>) alice@example.com", "example.com"),
        (b"From: a@example.com, b@EXAMPLE.com", "example.com"),
        (b"From: <@relay.example:alice@example.com>", "example.com"),
        ("From: Jürgen <j@bücher.example>".encode(), "xn--bcher-kva.example"),
        ("From: jürgen@example.com".encode(), "example.com"),
    ],
)
def test_from_domain_forms(field: bytes, domain: str) -> None:
    assert from_domain(field) == (domain, None)


@pytest.mark.parametrize(
    ("field", "reason"),
    [
        (b"From: ", "no parsable address"),
        (b"From: alice", "has no domain"),
        (b"From: a@example.com, b@example.org", "several domains"),
        (b"From: A <a@example.com> <b@example.org>", "no parsable address"),
        (b"From: undisclosed:;", "no parsable address"),
        (b"From: <a@example.com", "no parsable address"),
        (b'From: "unterminated <a@example.com>', "no parsable address"),
        (b"From: (open comment a@example.com", "no parsable address"),
        (b"From: a@[192.0.2.1]", "address literal"),
        (b"From: a@exa mple.com", "invalid domain"),
    ],
)
def test_from_domain_failures(field: bytes, reason: str) -> None:
    domain, why = from_domain(field)
    assert domain is None and why is not None and reason in why


# ------------------------------------------------------------------ signing


@pytest.mark.parametrize(
    "from_field",
    [
        b"From: alice@example.com",
        b'From: "Alice, A." <alice@EXAMPLE.com>',
        b"From: =?utf-8?b?QWxpY2U=?=\r\n <alice@example.com>",
        b"From: alice@example.com (Alice)",
    ],
)
def test_signed_by_from_domain_and_verified_by_dkimpy(keys: Keys, from_field: bytes) -> None:
    policy = policy_from(keys, RSA_ONLY)
    result = policy.sign_result(msg(from_field))
    assert result.signed == 1 and result.reason is None
    assert result.message.endswith(msg(from_field))
    assert verdicts(result.message, keys) == [(b"example.com/rsa1", True)]


def test_dual_signature_both_verify(keys: Keys) -> None:
    policy = policy_from(keys, DUAL)
    assert len(policy) == 2 and not policy.empty
    signed = policy.sign(msg(b"From: Alice <alice@example.com>"))
    assert sorted(verdicts(signed, keys)) == [(b"example.com/ed1", True), (b"example.com/rsa1", True)]
    assert b"a=ed25519-sha256" in signed and b"a=rsa-sha256" in signed  # algorithm taken from each key


def test_from_domains_exact_and_wildcard(keys: Keys) -> None:
    policy = policy_from(keys, RSA_ONLY)
    for sender in (b"a@example.net", b"a@mail.example.com", b"a@deep.sub.example.com"):
        signed = policy.sign(msg(b"From: " + sender))
        assert verdicts(signed, keys) == [(b"example.com/rsa1", True)], sender
    # "*.example.com" is subdomains only; example.com itself matches as the entry's domain.
    assert policy.entries_for("example.com") == (0,)
    assert policy.entries_for("notexample.com") == ()
    assert policy.entries_for("sub.example.net") == ()


def test_most_specific_entry_wins(keys: Keys) -> None:
    policy = policy_from(
        keys,
        RSA_ONLY
        + """
[[dkim]]
domain = "news.example.com"
selector = "news"
key_file = "ed.pem"
""",
    )
    news = policy.sign(msg(b"From: n@news.example.com"))
    assert verdicts(news, keys) == [(b"news.example.com/news", True)]
    other = policy.sign(msg(b"From: n@shop.example.com"))
    assert verdicts(other, keys) == [(b"example.com/rsa1", True)]


def test_no_matching_domain_leaves_the_bytes_unchanged(keys: Keys) -> None:
    policy = policy_from(keys, DUAL)
    message = msg(b"From: someone@example.org")
    result = policy.sign_result(message)
    assert result.message is message and result.signed == 0
    assert result.reason == "no [[dkim]] entry signs From domain example.org"
    assert policy.sign(message) is message


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (b"To: bob@example.net\r\nSubject: no from\r\n\r\nbody\r\n", "the message has no From field"),
        (b"From: a@example.com\r\nFrom: b@example.com\r\n\r\nbody\r\n", "the message has 2 From fields"),
        (b"From: a@example.com, b@example.org\r\n\r\nbody\r\n", "several domains"),
        (b"Subject: body only, no header end", "the message has no From field"),
    ],
)
def test_unsignable_from_is_unchanged_with_a_reason(keys: Keys, message: bytes, reason: str) -> None:
    policy = policy_from(keys, DUAL)
    result = policy.sign_result(message)
    assert result.message is message and result.signed == 0
    assert result.reason is not None and reason in result.reason


def test_already_signed_with_same_d_and_s_is_not_signed_twice(keys: Keys) -> None:
    policy = policy_from(keys, DUAL)
    once = policy.sign(msg(b"From: alice@example.com"))
    result = policy.sign_result(once)
    assert result.message is once and result.signed == 0
    assert result.reason is not None and "already signed by" in result.reason
    # Signed by one of the two keys (e.g. a campaign using the RSA selector): only the other is added.
    rsa_only = policy_from(keys, RSA_ONLY).sign(msg(b"From: alice@example.com"))
    result = policy.sign_result(rsa_only)
    assert result.signed == 1 and "d=example.com s=rsa1" in (result.reason or "")
    assert sorted(verdicts(result.message, keys)) == [(b"example.com/ed1", True), (b"example.com/rsa1", True)]
    assert result.message.count(b"DKIM-Signature:") == 2


def test_lone_lf_message_verifies_on_the_wire(keys: Keys) -> None:
    policy = policy_from(keys, DUAL)
    message = b"From: alice@example.com\nTo: b@example.net\nSubject: lf\n\nline 1\nline 2\n"
    signed = policy.sign(message)
    assert signed.endswith(message)
    assert sorted(verdicts(signed, keys)) == [(b"example.com/ed1", True), (b"example.com/rsa1", True)]


def test_an_8bit_body_is_signed_in_its_7bit_form(keys: Keys) -> None:
    # RFC 6376 5.3: a server without 8BITMIME on the way makes the sending client convert the body
    # (RFC 6152), which broke a signature made over the 8-bit octets. Signed converted, the message
    # needs no conversion later: what any client sends is what was signed.
    from fastmta.smtp.model import Body

    message = msg(b"From: alice@example.com\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
                  b"Content-Transfer-Encoding: 8bit", "Gr\u00fc\u00dfe aus K\u00f6ln\r\n".encode())
    result = policy_from(keys, DUAL).sign_result(message)
    assert result.signed == 2
    _, start = core.split_header_fields(result.message)
    assert result.message[start:] == b"Gr=C3=BC=C3=9Fe aus K=C3=B6ln\r\n"
    assert b"Content-Transfer-Encoding: quoted-printable" in result.message
    assert sorted(verdicts(result.message, keys)) == [(b"example.com/ed1", True), (b"example.com/rsa1", True)]
    assert Body(result.message).seven_bit.raw == result.message  # nothing left for a client to convert
    # Someone else's signature covers the 8-bit octets: they are left as they are.
    theirs = b"DKIM-Signature: v=1; a=rsa-sha256; d=other.example; s=x; h=from; bh=x; b=x\r\n" + message
    assert policy_from(keys, DUAL).sign_result(theirs).message.endswith(theirs)


def test_tampering_breaks_the_policy_signature(keys: Keys) -> None:
    signed = policy_from(keys, RSA_ONLY).sign(msg(b"From: alice@example.com"))
    assert verdicts(signed.replace(b"Hello.", b"Howdy."), keys) == [(b"example.com/rsa1", False)]


def test_custom_headers_and_timestamp(keys: Keys) -> None:
    policy = policy_from(
        keys,
        """
[[dkim]]
domain = "example.com"
selector = "ed1"
key_file = "ed.pem"
algorithm = "ed25519-sha256"
headers = ["From", "Subject"]
canonicalization = "simple/simple"
""",
    )
    signed = policy.sign(msg(b"From: alice@example.com"), timestamp=1_700_000_000)
    unfolded = signed.replace(b"\r\n ", b"")
    assert b"h=from:from:subject;" in unfolded and b"t=1700000000" in unfolded and b"c=simple/simple" in unfolded
    assert verdicts(signed, keys) == [(b"example.com/ed1", True)]


def test_choices_are_cached(keys: Keys) -> None:
    policy = policy_from(keys, DUAL)
    for _ in range(3):
        policy.sign(msg(b"From: Alice <alice@example.com>"))
    assert len(policy._by_from) == 1 and len(policy._by_domain) == 1 and len(policy._signers) == 1


def test_empty_policy_costs_nothing() -> None:
    policy = Config().dkim_policy()
    assert policy.empty and len(policy) == 0
    message = msg(b"From: alice@example.com")
    assert policy.sign(message) is message
    assert parse_config("").dkim_policy().empty


def test_dknewkey_seed_file_is_an_ed25519_key(keys: Keys, tmp_path: Path) -> None:
    seed = keys.ed.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    (tmp_path / "ed.key").write_bytes(base64.b64encode(seed) + b"\n")
    policy = parse_config(
        '[[dkim]]\ndomain = "example.com"\nselector = "ed1"\nkey_file = "ed.key"\n', "t.toml", tmp_path
    ).dkim_policy()
    assert policy.keys[0].algorithm == "ed25519-sha256"
    assert verdicts(policy.sign(msg(b"From: a@example.com")), keys) == [(b"example.com/ed1", True)]


# ------------------------------------------------------------ configuration


def test_key_file_relative_to_the_config_file(keys: Keys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf_dir = tmp_path / "etc"
    (conf_dir / "dkim").mkdir(parents=True)
    (conf_dir / "dkim" / "k.pem").write_bytes((keys.root / "rsa.pem").read_bytes())
    (conf_dir / "fastmta.toml").write_text(
        '[[dkim]]\ndomain = "example.com"\nselector = "rsa1"\nkey_file = "dkim/k.pem"\n'
        f'[[dkim]]\ndomain = "example.com"\nselector = "ed1"\nkey_file = "{keys.root / "ed.pem"}"\n'
    )
    monkeypatch.chdir(tmp_path)  # not the configuration's directory
    config = load_config(conf_dir / "fastmta.toml")
    assert config.dkim[0].key_file == str(conf_dir / "dkim" / "k.pem")
    assert config.dkim[1].key_file == str(keys.root / "ed.pem")  # absolute: kept
    signed = config.dkim_policy().sign(msg(b"From: a@example.com"))
    assert sorted(verdicts(signed, keys)) == [(b"example.com/ed1", True), (b"example.com/rsa1", True)]


def entry(**kw: str) -> str:
    fields = {"domain": "example.com", "selector": "s1", "key_file": "rsa.pem", **kw}
    return "[[dkim]]\n" + "".join(f"{k} = {v if v.startswith('[') else repr(v)}\n" for k, v in fields.items())


@pytest.mark.parametrize(
    ("second", "expected"),
    [
        (entry(key_file="missing.pem"), "test.toml: dkim[1].key_file: key file {root}/missing.pem does not exist"),
        (entry(key_file="."), "test.toml: dkim[1].key_file: key file {root} is unreadable"),
        (entry(key_file="garbage.txt"), "test.toml: dkim[1].key_file: key file {root}/garbage.txt is neither PEM"),
        (entry(key_file="ed.pem", algorithm="rsa-sha256"), "test.toml: dkim[1].algorithm: rsa-sha256 but"),
        (entry(algorithm="rsa-sha1"), "test.toml: dkim[1].algorithm: Invalid enum value 'rsa-sha1'"),
        (entry(selector="bad;selector"), "test.toml: dkim[1].selector: 'bad;selector' is not a valid selector"),
        (entry(domain="exa mple.com"), "test.toml: dkim[1].domain: not a valid domain name"),
        (entry(from_domains='["*x.example.com"]'), "test.toml: dkim[1].from_domains: '*x.example.com'"),
        (entry(headers='["subject"]'), "test.toml: dkim[1]: dkim s1._domainkey.example.com: the signed header list must include From"),
        (entry(canonicalization="loose"), "test.toml: dkim[1].canonicalization: Invalid enum value 'loose'"),
        (entry(selector="s0"), "test.toml: dkim[1].selector: s0._domainkey.example.com is already dkim[0]"),
        ("[[dkim]]\ndomain = 'example.com'\nselector = 's1'\nkey_path = 'rsa.pem'\n", "test.toml: dkim[1].key_path: unknown key"),
        ("[[dkim]]\ndomain = 'example.com'\nselector = 's1'\n", "test.toml: dkim[1]: Object missing required field `key_file`"),
    ],
)
def test_config_errors_name_the_entry(keys: Keys, second: str, expected: str) -> None:
    (keys.root / "garbage.txt").write_bytes(b"not a key")
    text = entry(selector="s0") + second
    with pytest.raises(ConfigError) as err:
        parse_config(text, "test.toml", keys.root)
    assert str(err.value).startswith(expected.format(root=keys.root)), str(err.value)


def test_existing_signature_tags_are_read_loosely() -> None:
    from fastmta.message.dkim_policy import _signed_by

    fields = [
        b"DKIM-Signature: v=1; a=rsa-sha256; d = Example.COM. ;\r\n\ts=\r\n RSA1; h=from; bh=x; b=y\r\n",
        b"dkim-signature:d=example.org;s=a;b=z\r\n",
        b"DKIM-Signature: v=1; a=rsa-sha256; bh=x; b=y\r\n",  # no d=/s=: ignored
        b"DKIM-Signature: v=1; dd=example.net; ss=x; b=y\r\n",  # other tags, not d/s
    ]
    assert _signed_by(fields) == {("example.com", "rsa1"), ("example.org", "a")}
