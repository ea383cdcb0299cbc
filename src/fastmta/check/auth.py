"""SPF, DKIM and DMARC of the message as it would go out, looked up in DNS through the configured resolver.

**SPF** is evaluated by pyspf (module ``spf``), the reference implementation of
RFC 7208 by its authors' circle: include:, redirect=, a/mx/ptr/exists
mechanisms, macros, the limit of 10 DNS-querying terms and of void lookups
are all its job, and reimplementing them here would be a second, less tested
copy. checkdmarc was considered and not taken: it does its own DNS with its
own resolver settings and reports on a domain, not on "does IP x pass for
sender y", which is the question here. pyspf asks DNS through one module-level
function, ``spf.DNSLookup``; :func:`_spf_dns` replaces it with one that uses
the resolver of the running check (a context variable) and falls back to
pyspf's own for any other caller in the process.

**DKIM**: for every key that signs the message (the campaign's ``[[dkim]]``,
else the configuration's for the From domain), the TXT record at
``selector._domainkey.domain`` must exist, be a usable key record and hold
the public half of the private key file (compared byte for byte: the DER
SubjectPublicKeyInfo or PKCS#1 form for RSA, the raw 32 bytes for Ed25519).
Then every DKIM-Signature on the signed sample is verified by dkimpy with
the same resolver: what a receiver would compute.

**DMARC**: ``_dmarc.<From domain>``, else ``_dmarc.<organizational domain>``
(RFC 7489 6.6.3), parsed; then identifier alignment (RFC 7489 3.1, relaxed
or strict per ``adkim``/``aspf``) of the From domain with the SPF domain
(the envelope sender's) and with each DKIM d= that verifies.
"""

from __future__ import annotations

import base64
import binascii
import contextvars
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import dkim
import spf
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from fastmta.check.dnsquery import DnsFailure, Lookup, aligned, org_domain
from fastmta.check.report import Report
from fastmta.check.sample import Sample
from fastmta.message.dkim import SigningKey

__all__ = ["AuthResult", "check_auth", "parse_tags"]

_LOOKUP: contextvars.ContextVar[Lookup | None] = contextvars.ContextVar("fastmta_check_lookup", default=None)
_PYSPF_LOOKUP: Callable[..., Any] = spf.DNSLookup
_D_TAG = re.compile(rb";\s*d\s*=\s*([^;\s]+)", re.I)
_S_TAG = re.compile(rb";\s*s\s*=\s*([^;\s]+)", re.I)


def _spf_dns(name: str, qtype: str, strict: Any = True, timeout: float = 30) -> list[tuple[tuple[str, str], Any]]:
    """pyspf's DNS function, answered by the check's resolver (see the module docs)."""
    lookup = _LOOKUP.get()
    if lookup is None:
        return list(_PYSPF_LOOKUP(name, qtype, strict, timeout))
    try:
        records = lookup.resolve(name, qtype)
    except DnsFailure as exc:
        raise spf.TempError(f"DNS {exc}") from None
    out: list[tuple[tuple[str, str], Any]] = []
    for r in records:
        if qtype in ("A", "AAAA"):
            out.append(((name, qtype), r.address))  # type: ignore[attr-defined]
        elif qtype == "MX":
            out.append(((name, qtype), (r.preference, r.exchange)))  # type: ignore[attr-defined]
        elif qtype == "PTR":
            out.append(((name, qtype), r.target.to_text(True)))  # type: ignore[attr-defined]
        elif qtype in ("TXT", "SPF"):
            out.append(((name, qtype), r.strings))  # type: ignore[attr-defined]
    return out


spf.DNSLookup = _spf_dns


def parse_tags(record: str) -> dict[str, str]:
    """``tag=value; ...`` (DKIM key records, DMARC records): lower-case tags, values stripped."""
    tags: dict[str, str] = {}
    for part in record.split(";"):
        name, eq, value = part.partition("=")
        if eq and name.strip():
            tags.setdefault(name.strip().lower(), value.strip())
    return tags


@dataclass
class AuthResult:
    """What DMARC alignment needs from the SPF and DKIM checks."""

    spf_pass: bool | None = None  # None: not evaluated (no egress IP known)
    dkim_pass: dict[tuple[str, str], bool] = field(default_factory=dict)  # (d, s) -> the signature verifies
    key_problem: set[tuple[str, str]] = field(default_factory=set)  # keys already reported as broken


# ------------------------------------------------------------------ SPF


def _spf_record(lookup: Lookup, domain: str) -> str | None:
    try:
        records = [r for r in lookup.txt(domain) if r.lower().startswith("v=spf1")]
    except DnsFailure:
        return None
    return records[0] if len(records) == 1 else None


def _check_spf(sample: Sample, lookup: Lookup, ips: list[tuple[str, str]], report: Report, result: AuthResult) -> None:
    domain = sample.sender_domain
    if not sample.sender:
        report.info("spf", "null envelope sender (<>): SPF is checked on the EHLO name, not here", "envelope", "spf")
        return
    if not ips:
        report.warning("spf", "no egress IP known (give --ip, or [[sources]] address in the configuration): "
                       "SPF not evaluated", "envelope")
        return
    where = f"DNS {domain} TXT"
    record = _spf_record(lookup, domain)
    if record is not None and re.search(r"(^|\s)\+?all(\s|$)", record, re.I):
        report.warning("spf", f"the SPF record ends in +all: anyone passes as {domain}", where, "spf")
    passed: bool | None = True
    for ip, helo in ips:
        query = spf.query(i=ip, s=sample.sender, h=helo or "localhost", timeout=lookup.timeout, querytime=20)
        outcome, _code, explanation = query.check()
        if outcome == "pass":
            report.ok("spf", f"SPF pass for {ip} as {domain}" + (f" ({record})" if record else ""), where, "spf")
            continue
        if outcome == "temperror":
            report.warning("spf", f"SPF temperror for {ip}: {explanation}", where, "spf")
            passed = None if passed else passed
            continue
        passed = False
        if outcome == "none":
            report.error("spf", f"no SPF record for {domain}: {ip} cannot pass", where, "spf")
        else:
            report.error("spf", f"SPF {outcome} for {ip} as {domain}: {explanation}", where, "spf")
    result.spf_pass = passed


# ----------------------------------------------------------------- DKIM


def _public_forms(key: SigningKey) -> set[bytes]:
    private = key.private_key
    if isinstance(private, ed25519.Ed25519PrivateKey):
        return {private.public_key().public_bytes_raw()}
    assert isinstance(private, rsa.RSAPrivateKey)
    public = private.public_key()
    der = serialization.Encoding.DER
    return {
        public.public_bytes(der, serialization.PublicFormat.SubjectPublicKeyInfo),
        public.public_bytes(der, serialization.PublicFormat.PKCS1),
    }


def _check_key(key: SigningKey, lookup: Lookup, report: Report) -> bool:
    name = f"{key.selector}._domainkey.{key.domain}"
    where = f"DNS {name} TXT"
    try:
        records = lookup.txt(name)
    except DnsFailure as exc:
        report.warning("dkim", f"cannot look up the DKIM key: {exc}", where, "dkim")
        return False
    keys = [parse_tags(r) for r in records]
    keys = [t for t in keys if "p" in t and t.get("v", "DKIM1") == "DKIM1"]
    if not keys:
        report.error("dkim", f"no DKIM key published at {name}", where, "dkim")
        return False
    if len(keys) > 1:
        report.error("dkim", f"{len(keys)} key records at {name}: receivers take any one", where, "dkim")
        return False
    tags = keys[0]
    expected = "ed25519" if key.algorithm == "ed25519-sha256" else "rsa"
    if tags.get("k", "rsa").lower() != expected:
        report.error("dkim", f"the record says k={tags.get('k', 'rsa')}, the key signs {key.algorithm}", where, "dkim")
        return False
    if "h" in tags and "sha256" not in [h.strip().lower() for h in tags["h"].split(":")]:
        report.error("dkim", f"the record allows h={tags['h']} only, the signature uses sha256", where, "dkim")
        return False
    if tags.get("s", "*").strip() not in ("*", "email") and "email" not in tags["s"].split(":"):
        report.error("dkim", f"the record's service type s={tags['s']} excludes email", where, "dkim")
        return False
    p = re.sub(r"\s+", "", tags["p"])
    if not p:
        report.error("dkim", f"the key at {name} is revoked (empty p=)", where, "dkim")
        return False
    try:
        published = base64.b64decode(p, validate=True)
    except (binascii.Error, ValueError):
        report.error("dkim", f"p= at {name} is not valid base64", where, "dkim")
        return False
    if published not in _public_forms(key):
        report.error("dkim", f"the key published at {name} is not the public half of the signing key", where, "dkim")
        return False
    detail: str = key.algorithm
    if isinstance(key.private_key, rsa.RSAPrivateKey):
        detail += f", {key.private_key.key_size} bits"
        if key.private_key.key_size < 2048:
            report.warning("dkim", f"{key.private_key.key_size}-bit RSA key: use 2048 bits", where, "dkim")
    if "y" in [f.strip() for f in tags.get("t", "").split(":")]:
        report.warning("dkim", f"the key at {name} is in testing mode (t=y): receivers may treat mail as unsigned",
                       where, "dkim")
    report.ok("dkim", f"DKIM key published at {name} matches the private key ({detail})", where, "dkim")
    return True


def _txt_for_dkimpy(name: bytes | str, timeout: float = 5) -> bytes | None:
    lookup = _LOOKUP.get()
    assert lookup is not None
    text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
    try:
        records = lookup.txt(text)
    except DnsFailure as exc:
        raise dkim.DnsTimeoutError(str(exc)) from None
    return records[0].encode("latin-1") if records else None


class _Said(logging.Handler):
    """Keeps what dkimpy logs at warning level and above."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _signatures(sample: Sample) -> list[tuple[str, str]]:
    found = []
    for f in sample.header_fields().get(b"dkim-signature", []):
        flat = re.sub(rb"\s+", b"", f)
        d, s = _D_TAG.search(flat), _S_TAG.search(flat)
        found.append(((d.group(1) if d else b"?").decode("ascii", "replace").lower(),
                      (s.group(1) if s else b"?").decode("ascii", "replace").lower()))
    return found


def _check_dkim(sample: Sample, lookup: Lookup, report: Report, result: AuthResult) -> None:
    for key in sample.keys:
        if not _check_key(key, lookup, report):
            result.key_problem.add((key.domain.lower(), key.selector.lower()))
    signatures = _signatures(sample)
    if not signatures:
        from_domain = sample.from_domain or "?"
        report.error("dkim", f"the message is not DKIM-signed (no [[dkim]] key for the From domain {from_domain})",
                     "header DKIM-Signature", "dkim")
        return
    for index, (d, s) in enumerate(signatures):
        said = _Said()
        logger = logging.getLogger("fastmta.check.dkimpy")
        logger.propagate = False  # dkimpy logs why a signature fails: kept as the reason, not printed
        logger.addHandler(said)
        verifier = dkim.DKIM(sample.message, logger=logger, timeout=int(max(1, lookup.timeout)))
        try:
            ok = bool(verifier.verify(idx=index, dnsfunc=_txt_for_dkimpy))
            reason = said.lines[-1] if said.lines else "the signature does not verify"
        except dkim.DKIMException as exc:
            ok, reason = False, str(exc)
        finally:
            logger.removeHandler(said)
        result.dkim_pass[(d, s)] = ok
        where = f"header DKIM-Signature d={d} s={s}"
        if ok:
            report.ok("dkim", f"the DKIM signature d={d} s={s} verifies (dkimpy, against DNS)", where, "dkim")
        elif (d, s) not in result.key_problem:
            report.error("dkim", f"DKIM signature d={d} s={s}: {reason}", where, "dkim")


# ---------------------------------------------------------------- DMARC


def _dmarc_record(lookup: Lookup, domain: str, report: Report) -> tuple[dict[str, str] | None, str]:
    names = [f"_dmarc.{domain}"]
    org = org_domain(domain)
    if org != domain:
        names.append(f"_dmarc.{org}")
    for name in names:
        try:
            records = [r for r in lookup.txt(name) if r.strip().lower().startswith("v=dmarc1")]
        except DnsFailure as exc:
            report.warning("dmarc", f"cannot look up DMARC: {exc}", f"DNS {name} TXT", "dmarc")
            return None, name
        if len(records) > 1:
            report.error("dmarc", f"{len(records)} DMARC records at {name}: receivers then apply none (RFC 7489 6.6.3)",
                         f"DNS {name} TXT", "dmarc")
            return None, name
        if records:
            return parse_tags(records[0]), name
    report.error("dmarc", f"no DMARC record at {' nor '.join(names)}", f"DNS {names[0]} TXT", "dmarc")
    return None, names[0]


def _check_dmarc(sample: Sample, lookup: Lookup, report: Report, result: AuthResult) -> None:
    domain = sample.from_domain
    if domain is None:
        report.error("dmarc", "no single From domain: DMARC cannot pass", "header From", "dmarc")
        return
    tags, name = _dmarc_record(lookup, domain, report)
    where = f"DNS {name} TXT"
    if tags is not None:
        at_org = name != f"_dmarc.{domain}"
        policy = tags.get("sp", tags.get("p", "")) if at_org else tags.get("p", "")
        if policy.lower() not in ("none", "quarantine", "reject"):
            report.error("dmarc", f"the DMARC record has no valid policy (p={tags.get('p', '')!r})", where, "dmarc")
        else:
            report.ok("dmarc", f"DMARC record at {name}: p={policy.lower()}", where, "dmarc")
        if "rua" not in tags:
            report.info("dmarc", "no rua= in the DMARC record: no aggregate reports come back", where)
    tags = tags or {}
    strict_dkim, strict_spf = tags.get("adkim", "r").lower() == "s", tags.get("aspf", "r").lower() == "s"
    mode = {True: "strict: the domains must be equal", False: "relaxed: organizational domains differ"}
    dkim_aligned = [d for (d, _s), ok in result.dkim_pass.items() if ok and aligned(d, domain, strict_dkim)]
    failing = sorted({d for (d, _s), ok in result.dkim_pass.items() if not ok and aligned(d, domain, strict_dkim)})
    spf_domain = sample.sender_domain
    spf_aligned = bool(sample.sender) and aligned(spf_domain, domain, strict_spf)
    spf_ok = spf_aligned and result.spf_pass is not False
    if dkim_aligned:
        report.ok("dmarc", f"From {domain} is aligned with DKIM d={dkim_aligned[0]}", "header From", "dmarc")
    elif failing:
        report.warning("dmarc", f"From {domain} is aligned with DKIM d={failing[0]}, but that signature does not "
                       "verify (see dkim)", "header From", "dmarc")
    else:
        ds = sorted({d for d, _s in result.dkim_pass}) or ["(none)"]
        flag = report.warning if spf_ok else report.error
        flag("dmarc", f"From {domain} is not aligned with DKIM (d={', '.join(ds)}; {mode[strict_dkim]})",
             "header From", "dmarc")
    if spf_aligned:
        state = "" if result.spf_pass else " (SPF result unknown)" if result.spf_pass is None else " but SPF fails"
        (report.ok if result.spf_pass else report.warning)(
            "dmarc", f"From {domain} is aligned with the envelope sender's domain {spf_domain}{state}", "envelope", "dmarc")
    else:
        flag = report.info if dkim_aligned else report.error
        flag("dmarc", f"From {domain} is not aligned with the envelope sender's domain {spf_domain or '<>'} "
             f"({mode[strict_spf]})", "envelope", "dmarc")


def check_auth(sample: Sample, lookup: Lookup, ips: list[tuple[str, str]], report: Report) -> AuthResult:
    """SPF for each (egress IP, EHLO name), DKIM keys and signatures, DMARC record and alignment."""
    result = AuthResult()
    token = _LOOKUP.set(lookup)
    try:
        _check_spf(sample, lookup, ips, report, result)
        _check_dkim(sample, lookup, report, result)
        _check_dmarc(sample, lookup, report, result)
    finally:
        _LOOKUP.reset(token)
    return result
