"""`fastmta check`: content, SPF/DKIM/DMARC/PTR against a real DNS server on loopback, STARTTLS at a real sink,
SpamAssassin for real where Debian's package is installed.

Acceptance (issue 16, 2): a deliberately broken job lists every problem and exits 2; the bundled example with
correct test DNS exits 0.
"""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from dnsserver import DNSServer
from fastmta.check import CheckOptions, Report, Severity, check_campaign, check_path
from fastmta.cli import main
from fastmta.cli.sinkproc import embedded_sink
from fastmta.delivery.config import load_config

EXAMPLE = Path(__file__).resolve().parents[1] / "src" / "fastmta" / "examples" / "spool"


# ----------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def sink_port() -> Iterator[int]:
    """A fastmta sink on loopback: it offers STARTTLS, like a real MX."""
    with embedded_sink() as (_host, port):
        yield port


def _pem(key: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def _ed25519(path: Path) -> str:
    """Write a new Ed25519 key to *path*; its DKIM record."""
    key = ed25519.Ed25519PrivateKey.generate()
    _pem(key, path)
    return f"v=DKIM1; k=ed25519; p={base64.b64encode(key.public_key().public_bytes_raw()).decode()}"


def _txt(record: str) -> str:
    """A TXT rdata in master-file syntax, split into strings of at most 255 octets."""
    return " ".join(f'"{record[i:i + 255]}"' for i in range(0, len(record), 255))


def _config(tmp: Path, ns: DNSServer, extra: str = "", *, ehlo: str = "mail.shop.test") -> Path:
    path = tmp / "fastmta.toml"
    path.write_text(
        f'[dns]\nnameservers = ["{ns.nameserver}"]\ntimeout = 3\n\n'
        f'[[sources]]\nname = "main"\naddress = "127.0.0.1"\nehlo_name = "{ehlo}"\n\n{extra}'
    )
    return path


def _check_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    capsys.readouterr()
    code = main(["check", *args, "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert doc["exit_code"] == code
    return code, doc["reports"][0]


def _has(report: dict[str, Any] | Report, severity: str, check: str, text: str) -> bool:
    findings = report.to_dict()["findings"] if isinstance(report, Report) else report["findings"]
    return any(f["severity"] == severity and f["check"] == check and text in f["finding"] for f in findings)


def _problems(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(f["severity"], f["check"], f["finding"]) for f in report["findings"] if f["severity"] in ("error", "warning")]


def _bulk(report: dict[str, Any]) -> dict[str, str]:
    return {row["requirement"]: row["status"] for row in report["bulk_sender"]}


# ------------------------------------------------ acceptance 2: the example


def _example_dns(spool: Path) -> dict[str, str]:
    key = serialization.load_pem_private_key((spool / "dkim-test-ed25519.key.pem").read_bytes(), None)
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    public = base64.b64encode(key.public_key().public_bytes_raw()).decode()
    domains = sorted({line.split(",")[0].rpartition("@")[2] for line in (spool / "recipients.csv").read_text().splitlines()[1:]})
    zone = [
        'news.fastmta.example. TXT "v=spf1 ip4:127.0.0.1 -all"',
        f'test2026._domainkey.news.fastmta.example. TXT "v=DKIM1; k=ed25519; p={public}"',
        '_dmarc.news.fastmta.example. TXT "v=DMARC1; p=reject; rua=mailto:dmarc@news.fastmta.example"',
        "mail.fastmta.example. A 127.0.0.1",
        "mx.fastmta.example. A 127.0.0.1",
        *(f"{d}. MX 10 mx.fastmta.example." for d in domains),
    ]
    return {"example": "\n".join(zone), "127.in-addr.arpa": "1.0.0 PTR mail.fastmta.example."}


def test_the_bundled_example_with_correct_dns_is_clean(
    tmp_path: Path, sink_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    spool = tmp_path / "spool"
    shutil.copytree(EXAMPLE, spool)
    job = spool / "welcome.toml"
    with DNSServer(_example_dns(spool)) as ns:
        config_path = _config(tmp_path, ns, ehlo="mail.fastmta.example")
        code = main(["check", str(job), "--config", str(config_path), "--smtp-port", str(sink_port), "--no-spamassassin"])
        out = capsys.readouterr().out
        assert code == 0, out
        assert "0 error(s), 0 warning(s): clean" in out
        # Every lookup went to the configured server, and the probe really spoke TLS with the sink.
        assert ns.count("news.fastmta.example", "TXT") >= 1
        assert ns.count("test2026._domainkey.news.fastmta.example", "TXT") >= 1
        assert ns.count("1.0.0.127.in-addr.arpa", "PTR") == 1

        # The function send/serve call, on the same job.
        report = check_campaign(job, load_config(config_path), CheckOptions(smtp_port=sink_port, spamassassin=False))
    doc = report.to_dict()
    assert report.exit_code == 0, _problems(doc)
    assert set(_bulk(doc).values()) == {"pass"}
    for check in ("spf", "dkim", "dmarc", "ptr", "tls", "unsubscribe", "html", "links", "headers"):
        assert any(f.severity is Severity.OK and f.check == check for f in report.findings), check
    assert _has(report, "ok", "tls", "STARTTLS offered, handshake TLS")
    assert _has(report, "ok", "ptr", "127.0.0.1 -> mail.fastmta.example -> 127.0.0.1")
    assert _has(report, "ok", "dkim", "matches the private key")


# ------------------------------------------ acceptance 2: the broken job

BROKEN_HTML = """<!doctype html>
<html><body>
<h1>Deals for {{ name }}</h1>
<p><a href="http://192.0.2.7/deal">See the deal</a></p>
<div><b>bold <i>both</b> italic</i>
<p>Thanks for shopping with us, {{ name }}.</p>
</body></html>
"""


def _broken_job(tmp: Path) -> tuple[Path, str]:
    """A job with a numeric-IP link, broken HTML, no unsubscribe, DKIM d= of another domain; its DKIM record."""
    job = tmp / "job"
    job.mkdir()
    record = _ed25519(job / "other.pem")
    (job / "rcpt.csv").write_text("email,name\nann@customer.test,Ann\nbob@customer.test,Bob\n")
    (job / "deals.html").write_text(BROKEN_HTML)
    (job / "broken.toml").write_text(
        '[campaign]\nid = "broken-1"\nsender = "bounce@mailer.other.test"\nrecipients = "rcpt.csv"\n\n'
        '[[dkim]]\ndomain = "other.test"\nselector = "s1"\nkey_path = "other.pem"\nalgorithm = "ed25519-sha256"\n\n'
        '[template]\ntext = "Deals for {{ name }} this week."\nhtml_file = "deals.html"\n\n'
        '[template.headers]\nFrom = "Shop <news@shop.test>"\nTo = "{{ email }}"\nSubject = "This week\'s deals"\n'
    )
    return job / "broken.toml", record


def _broken_dns(record: str) -> dict[str, str]:
    return {
        # SPF and the DKIM key are right: the problems are alignment, DMARC and PTR.
        "test": "\n".join([
            'mailer.other.test. TXT "v=spf1 ip4:127.0.0.1 -all"',
            f"s1._domainkey.other.test. TXT {_txt(record)}",
            "customer.test. MX 10 mx.customer.test.",
            "mx.customer.test. A 127.0.0.1",
        ]),
        "127.in-addr.arpa": "",  # no PTR for 127.0.0.1 (NXDOMAIN)
    }


def test_a_broken_job_lists_every_problem_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job, record = _broken_job(tmp_path)
    with DNSServer(_broken_dns(record)) as ns:
        config = _config(tmp_path, ns)
        code, report = _check_json(capsys, str(job), "--config", str(config), "--no-network-smtp", "--no-spamassassin")
    problems = _problems(report)
    assert code == 2, problems
    assert _has(report, "error", "links", "link to a numeric IP address: http://192.0.2.7/deal")
    assert _has(report, "warning", "html", "HTML parse error")
    assert _has(report, "warning", "html", "elements never closed: <div>")
    assert any(f["where"].endswith("deals.html:5") for f in report["findings"] if f["check"] == "html")
    assert _has(report, "error", "unsubscribe", "no List-Unsubscribe header")
    assert _has(report, "warning", "unsubscribe", "no unsubscribe link in the body")
    assert _has(report, "error", "dmarc", "From shop.test is not aligned with DKIM (d=other.test")
    assert _has(report, "error", "dmarc", "no DMARC record at _dmarc.shop.test")
    assert _has(report, "error", "ptr", "no PTR record for 127.0.0.1")
    # What is right is said to be right.
    assert _has(report, "ok", "spf", "SPF pass for 127.0.0.1 as mailer.other.test")
    assert _has(report, "ok", "dkim", "matches the private key")
    bulk = _bulk(report)
    assert bulk["dmarc"] == bulk["ptr"] == bulk["unsubscribe"] == "fail"
    assert bulk["spf"] == "pass"


def test_the_configurations_unsubscribe_section_counts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job, record = _broken_job(tmp_path)
    secret = tmp_path / "secret"
    secret.write_bytes(b"0123456789abcdef0123456789abcdef")
    with DNSServer(_broken_dns(record)) as ns:
        config = _config(tmp_path, ns, f'[unsubscribe]\nbase_url = "https://u.shop.test"\nsecret_file = "{secret}"\n')
        _code, report = _check_json(capsys, str(job), "--config", str(config), "--no-network-smtp", "--no-spamassassin")
    assert not any(f["check"] == "unsubscribe" and f["severity"] == "error" for f in report["findings"]), _problems(report)
    assert _has(report, "ok", "unsubscribe", "one-click unsubscribe: List-Unsubscribe <https://u.shop.test/")
    assert _has(report, "ok", "unsubscribe", "DKIM-signed")


# ------------------------------------------------------ DNS scenarios

MESSAGE = (
    "From: Corp News <news@news.corp.test>\r\nTo: ann@customer.test\r\nSubject: Hello\r\n"
    "Date: Mon, 02 Nov 2026 10:00:00 +0000\r\nMessage-ID: <1@news.corp.test>\r\nMIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n\r\nHello Ann, the newsletter. Unsubscribe: https://news.corp.test/u\r\n"
)


@pytest.fixture(scope="module")
def corp_rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _rsa_record(key: rsa.RSAPrivateKey) -> str:
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"


def _corp(tmp: Path, key: rsa.RSAPrivateKey) -> tuple[Path, dict[str, str], str]:
    """A message from news.corp.test, signed by [[dkim]] d=corp.test (RSA), sent as bounce@corp.test."""
    _pem(key, tmp / "corp.pem")
    (tmp / "msg.eml").write_bytes(MESSAGE.encode())
    zones = {
        "test": "\n".join([
            'corp.test. TXT "v=spf1 include:_spf.provider.test -all"',
            '_spf.provider.test. TXT "v=spf1 ip4:127.0.0.0/8 ~all"',
            f"rsa1._domainkey.corp.test. TXT {_txt(_rsa_record(key))}",
            '_dmarc.corp.test. TXT "v=DMARC1; p=none"',  # at the organizational domain only
            "mail.corp.test. A 127.0.0.1",
        ]),
        "127.in-addr.arpa": "1.0.0 PTR mail.corp.test.",
    }
    dkim = f'[[dkim]]\ndomain = "corp.test"\nselector = "rsa1"\nkey_file = "{tmp / "corp.pem"}"\nfrom_domains = ["*.corp.test"]\n'
    return tmp / "msg.eml", zones, dkim


def _other_rsa_record() -> str:
    return _rsa_record(rsa.generate_private_key(public_exponent=65537, key_size=1024))


Mutation = Callable[[DNSServer], None]
SCENARIOS: list[tuple[str, Mutation, str, str, str]] = [
    ("spf-fail", lambda ns: ns.set_records("corp.test", "TXT", '"v=spf1 ip4:192.0.2.1 -all"'),
     "error", "spf", "SPF fail for 127.0.0.1 as corp.test"),
    ("spf-none", lambda ns: ns.set_records("corp.test", "TXT"), "error", "spf", "no SPF record for corp.test"),
    ("dkim-missing", lambda ns: ns.delete_name("rsa1._domainkey.corp.test"),
     "error", "dkim", "no DKIM key published at rsa1._domainkey.corp.test"),
    ("dkim-revoked", lambda ns: ns.set_records("rsa1._domainkey.corp.test", "TXT", '"v=DKIM1; k=rsa; p="'),
     "error", "dkim", "is revoked"),
    ("dkim-other-key", lambda ns: ns.set_records("rsa1._domainkey.corp.test", "TXT", _txt(_other_rsa_record())),
     "error", "dkim", "is not the public half of the signing key"),
    ("dmarc-strict", lambda ns: ns.set_records("_dmarc.corp.test", "TXT", '"v=DMARC1; p=reject; adkim=s; aspf=s"'),
     "error", "dmarc", "not aligned with DKIM (d=corp.test; strict"),
    ("dmarc-two-records", lambda ns: ns.set_records("_dmarc.corp.test", "TXT", '"v=DMARC1; p=none"', '"v=DMARC1; p=reject"'),
     "error", "dmarc", "2 DMARC records at _dmarc.corp.test"),
    ("ptr-not-confirmed", lambda ns: ns.set_records("mail.corp.test", "A", "127.0.0.2"),
     "error", "ptr", "does not resolve back to 127.0.0.1"),
    ("dmarc-servfail", lambda ns: ns.servfail("_dmarc.news.corp.test"), "warning", "dmarc", "cannot look up DMARC"),
]


def test_correct_dns_passes_with_include_and_the_organizational_dmarc_record(
    tmp_path: Path, corp_rsa: rsa.RSAPrivateKey
) -> None:
    message, zones, dkim = _corp(tmp_path, corp_rsa)
    with DNSServer(zones) as ns:
        config = load_config(_config(tmp_path, ns, dkim, ehlo="mail.corp.test"))
        report = check_path(message, config, CheckOptions(sender="bounce@corp.test", smtp_probe=False, spamassassin=False))
        # pyspf followed the include: through the configured server, not the system's resolver.
        assert ns.count("_spf.provider.test", "TXT") >= 1
        assert ns.count("_dmarc.news.corp.test", "TXT") == 1 and ns.count("_dmarc.corp.test", "TXT") == 1
    doc = report.to_dict()
    assert report.kind == "message"
    assert not [p for p in _problems(doc) if p[1] in ("spf", "dkim", "dmarc", "ptr")], _problems(doc)
    assert _has(report, "ok", "spf", "SPF pass for 127.0.0.1 as corp.test")
    assert _has(report, "ok", "dkim", "matches the private key (rsa-sha256, 2048 bits)")
    assert _has(report, "ok", "dmarc", "DMARC record at _dmarc.corp.test: p=none")
    assert _has(report, "ok", "dmarc", "From news.corp.test is aligned with DKIM d=corp.test")


@pytest.mark.parametrize(("mutate", "severity", "check", "text"), [s[1:] for s in SCENARIOS], ids=[s[0] for s in SCENARIOS])
def test_broken_dns_is_reported(
    tmp_path: Path, corp_rsa: rsa.RSAPrivateKey, mutate: Mutation, severity: str, check: str, text: str
) -> None:
    message, zones, dkim = _corp(tmp_path, corp_rsa)
    with DNSServer(zones) as ns:
        mutate(ns)
        config = load_config(_config(tmp_path, ns, dkim, ehlo="mail.corp.test"))
        report = check_path(message, config, CheckOptions(sender="bounce@corp.test", smtp_probe=False, spamassassin=False))
    assert _has(report, severity, check, text), _problems(report.to_dict())
    assert report.exit_code == (2 if severity == "error" else 1), _problems(report.to_dict())


def test_starttls_probe_reports_a_server_without_tls_a_dead_one_and_a_null_mx(tmp_path: Path) -> None:
    (tmp_path / "msg.eml").write_bytes(
        MESSAGE.replace("To: ann@customer.test", "To: a@plain.test, b@plain.test, c@dead.test, d@nomail.test").encode()
    )
    zones = {"test": "\n".join([
        "plain.test. MX 10 mx.plain.test.", "mx.plain.test. A 127.0.0.1",
        "dead.test. MX 10 mx.dead.test.", "mx.dead.test. A 127.0.0.1",
        "nomail.test. MX 0 .",
    ])}
    with DNSServer(zones) as ns, embedded_sink(["--no-starttls"]) as (_host, port):
        config = load_config(_config(tmp_path, ns))
        plain = check_path(tmp_path / "msg.eml", config, CheckOptions(smtp_port=port, top_domains=1, spamassassin=False))
        assert _has(plain, "warning", "tls", "plain.test (2 recipients): mx.plain.test: STARTTLS not offered")
    with DNSServer(zones) as ns:
        config = load_config(_config(tmp_path, ns))
        # The sink is gone: its port refuses connections.
        report = check_path(tmp_path / "msg.eml", config,
                            CheckOptions(smtp_port=port, top_domains=3, smtp_timeout=3, spamassassin=False))
    assert _has(report, "warning", "tls", "plain.test: cannot ask mx.plain.test[127.0.0.1]")
    assert _has(report, "error", "tls", "nomail.test (1 recipients) accepts no mail (null MX")


# ------------------------------------------------------- content checks

RAW = (
    b'From: "paypal.com" <x@evil.test>\r\n'
    b'Reply-To: "billing@paypal.com" <x@evil.test>\r\n'
    b"To: bob@customer.test\r\n"
    b"Subject: Caf\xc3\xa9\r\n"
    b"Date: Mon, 02 Nov 2026 10:00:00 +0000\r\n"
    b"Date: Mon, 02 Nov 2026 10:00:01 +0000\r\n"
    b"X-Long: " + b"a" * 1200 + b"\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n"
    b"Bad Name: x\r\n\r\n"  # last: a parser takes the body to start at a line that is not a field
    b'<html><body><a href="https://bit.ly/abc">offer</a> <a href="https://evil.test/x">www.mybank.com</a>'
    b'<img src="https://cdn.evil.test/banner.png"><img src="http://3221225991/p.gif"></body></html>\r\n'
)


def test_content_problems_of_a_raw_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "raw.eml"
    path.write_bytes(RAW)
    code, report = _check_json(capsys, str(path), "--no-dns", "--no-spamassassin")
    assert code == 2
    assert report["kind"] == "message"
    assert report["facts"]["envelope sender"] == "x@evil.test"  # From, without --from
    expected = [
        ("error", "headers", "no Message-ID field"),
        ("error", "headers", "2 Date fields"),
        ("error", "headers", "invalid header field name 'Bad Name'"),
        ("error", "headers", "1 line(s) over 998 octets"),
        ("warning", "headers", "8-bit bytes in Subject"),
        ("error", "headers", "display name 'billing@paypal.com' shows an address other than the sender's"),
        ("warning", "headers", "display name 'paypal.com' names the domain paypal.com, but the address is at evil.test"),
        ("warning", "links", "through the URL shortener bit.ly"),
        ("warning", "links", "link text shows www.mybank.com but the link goes to evil.test"),
        ("error", "links", "image to a numeric IP address: http://3221225991/p.gif"),
        ("warning", "content", "HTML without a text/plain alternative"),
        ("warning", "content", "image-only mail: 2 image(s)"),
        ("warning", "unsubscribe", "no List-Unsubscribe header"),
    ]
    for severity, check, text in expected:
        assert _has(report, severity, check, text), (severity, check, text, _problems(report))
    assert _bulk(report)["rfc5322"] == "fail"


def test_a_pickup_file_over_gmails_clipping_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "big.eml"
    body = b"".join(b"line %d of a long newsletter, with words enough to read\r\n" % i for i in range(2000))
    head = MESSAGE.split("\r\n\r\n")[0].encode()
    path.write_bytes(b"X-Sender: bounce@corp.test\r\nX-Receiver: ann@customer.test\r\n" + head + b"\r\n\r\n" + body)
    code, report = _check_json(capsys, str(path), "--no-dns", "--no-spamassassin")
    assert report["kind"] == "pickup"
    assert report["facts"]["envelope sender"] == "bounce@corp.test"
    assert _has(report, "warning", "content", "Gmail clips mail over about 102 KB")
    assert code == 1, _problems(report)  # warnings only


def test_nothing_from_the_input_reaches_the_terminal_raw(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # no wrapping inside the file name
    path = tmp_path / "evil\x1b]0;pwned\x07.eml"
    path.write_bytes(RAW.replace(b"paypal.com\" <", b"paypal.com\x1b[2J\" <"))
    capsys.readouterr()
    code = main(["check", str(path), "--no-dns", "--no-spamassassin"])
    out = capsys.readouterr().out
    assert code == 2
    assert "\x1b" not in out and "\x07" not in out
    assert "\\x1b]0;pwned\\x07.eml" in out


# --------------------------------------------------------- SpamAssassin


def test_spamassassin_scores_the_sample_with_its_rule_hits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if shutil.which("spamassassin") is None:
        pytest.skip("spamassassin not installed (Debian: apt-get install spamassassin; .ci/run installs it)")
    path = tmp_path / "spam.eml"
    path.write_bytes(b"From: a@b.test\r\nTo: c@d.test\r\nSubject: FREE MONEY NOW\r\n\r\n"
                     b"Buy viagra now, click http://192.0.2.1/x\r\n")
    code, report = _check_json(capsys, str(path), "--no-dns")
    assert code == 2
    score = [f for f in report["findings"] if f["check"] == "spamassassin" and "score" in f["finding"]]
    assert len(score) == 1 and "spamassassin -t -L" in score[0]["finding"]
    hits = {f["finding"].split(" ")[0] for f in report["findings"] if f["check"] == "spamassassin" and f["severity"] == "info"}
    assert {"MISSING_MID", "MISSING_DATE"} <= hits


def test_without_spamassassin_the_report_says_it_was_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("fastmta.check.spamassassin.shutil.which", lambda _name: None)
    monkeypatch.setenv("COLUMNS", "400")
    path = tmp_path / "m.eml"
    path.write_bytes(MESSAGE.encode())
    capsys.readouterr()
    code = main(["check", str(path), "--no-dns"])
    out = capsys.readouterr().out
    assert "skipped: spamassassin not installed" in out
    assert code == 1  # no List-Unsubscribe on a plain message: a warning, not an error
