"""The message a check judges: what would go out, rendered and signed as ``send`` would.

* a campaign job (``*.toml``): its first recipient row that renders, with the
  configuration's ``[return_path]`` (the envelope sender) and
  ``[unsubscribe]`` (the one-click headers) applied, signed by the job's
  ``[[dkim]]`` keys, or by the configuration's when it has none (as the
  engine does); its recipients' domains are counted over the whole file;
* a pickup file (``*.eml`` with ``X-Sender``/``X-Receiver``): its content
  and envelope, signed by the configuration's ``[[dkim]]`` policy;
* any other message: the envelope sender is ``--from``, else the
  Return-Path, else the From address; the recipients are To, Cc and Bcc.

Campaigns render Date and Message-ID themselves: the check judges the
rendered message, never the template.
"""

from __future__ import annotations

import email.utils
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from fastmta.check.report import Report
from fastmta.delivery.config import Config
from fastmta.errors import ConfigError, InputError
from fastmta.intake.campaign import Campaign
from fastmta.intake.items import Reject, SpoolItem
from fastmta.intake.pickup import parse_pickup, read_pickup_bytes
from fastmta.message import core
from fastmta.message.dkim import SigningKey
from fastmta.message.dkim_policy import DkimPolicy, from_domain
from fastmta.message.returnpath import ReturnPath
from fastmta.message.unsubscribe import Unsubscribe

__all__ = ["Sample", "load_sample"]

#: Rejected rows reported before the sample (more are counted, not listed).
_MAX_REJECTS_SHOWN = 5


@dataclass
class Sample:
    kind: str  # "campaign", "pickup", "message"
    source: str
    message: bytes  # CRLF, as it would be sent (signed), not dot-stuffed
    sender: str  # envelope sender ("" is the null sender)
    domains: Counter[str] = field(default_factory=Counter)  # recipient domain -> recipients
    keys: list[SigningKey] = field(default_factory=list)  # the DKIM keys that sign it
    where_html: str = "text/html part"
    where_text: str = "text/plain part"

    @property
    def campaign(self) -> bool:
        return self.kind == "campaign"

    def header_fields(self) -> dict[bytes, list[bytes]]:
        fields, _ = core.split_header_fields(self.message)
        return core.index_header_fields(fields)

    @property
    def from_domain(self) -> str | None:
        fields = self.header_fields().get(b"from") or []
        return from_domain(fields[0])[0] if len(fields) == 1 else None

    @property
    def sender_domain(self) -> str:
        return self.sender.rpartition("@")[2].lower().rstrip(".")


def _policy(config: Config, report: Report) -> DkimPolicy:
    try:
        return config.dkim_policy()
    except ConfigError as exc:
        report.error("config", f"[[dkim]]: {exc}", "configuration", "dkim")
        return DkimPolicy()


def _policy_keys(policy: DkimPolicy, message: bytes) -> list[SigningKey]:
    fields, _ = core.split_header_fields(message)
    froms = core.index_header_fields(fields).get(b"from") or []
    if len(froms) != 1:
        return []
    domain, _ = from_domain(froms[0])
    if domain is None:
        return []
    return [policy.keys[i] for i in policy.entries_for(domain)]


def _signed_by_policy(policy: DkimPolicy, message: bytes, report: Report) -> tuple[bytes, list[SigningKey]]:
    if policy.empty:
        return message, []
    result = policy.sign_result(message)
    if result.reason and not result.signed:
        report.info("dkim", f"the configuration's [[dkim]] does not sign it: {result.reason}", "configuration")
    return result.message, _policy_keys(policy, message)


def _return_path(config: Config, report: Report) -> ReturnPath | None:
    rp = config.return_path
    if not rp.domain:
        return None
    try:
        return ReturnPath(Path(rp.secret_file).read_bytes().strip(), rp.domain, rp.prefix)
    except (OSError, ValueError) as exc:
        report.error("config", f"[return_path]: {exc}", "configuration")
        return None


def _unsubscribe(config: Config, report: Report) -> Unsubscribe | None:
    try:
        return config.unsubscribe.build(config.return_path.secret_file)
    except (OSError, ValueError) as exc:
        report.error("config", f"[unsubscribe]: {exc}", "configuration", "unsubscribe")
        return None


def _campaign(path: Path, config: Config, report: Report, count_domains: bool = True) -> Sample | None:
    try:
        campaign = Campaign.load(path)
    except InputError as exc:
        report.error("campaign", f"the job cannot be loaded: {exc.reason}", _where(exc.source, exc.line))
        return None
    template = campaign.job.template
    base = path.parent
    where_html = _shown(base / template["html_file"]) if template.get("html_file") else f"{path.name}: template.html"
    where_text = _shown(base / template["text_file"]) if template.get("text_file") else f"{path.name}: template.text"
    unsubscribe = _unsubscribe(config, report)
    item: SpoolItem | None = None
    rejected = 0
    for event in campaign.items(return_path=_return_path(config, report), unsubscribe=unsubscribe):
        if isinstance(event, SpoolItem):
            item = event
            break
        if not isinstance(event, Reject):
            continue  # a row left out on purpose (the sunset policy): not a problem
        rejected += 1
        if rejected <= _MAX_REJECTS_SHOWN:
            report.warning("campaign", f"recipient row rejected: {event.reason}", _where(event.source, event.line))
    if item is None:
        report.error("campaign", "no recipient row renders: nothing to send", str(campaign.recipients_path))
        return None
    if rejected:
        report.facts["sample"] = f"the first row that renders (after {rejected} rejected)"
    else:
        report.facts["sample"] = f"row at line {item.line} of {campaign.recipients_path.name}"
    domains: Counter[str] = Counter()
    address_field = campaign.job.campaign.address_field
    # Read through for the TLS probe of the top domains only: for a million rows that is seconds,
    # which the automatic check before `send` (no probe) does not spend.
    for _, row, _error in campaign.rows() if count_domains else ():
        address = row.get(address_field) if row is not None else None
        if isinstance(address, str) and "@" in address:
            domains[address.rpartition("@")[2].lower().rstrip(".")] += 1
    if count_domains:
        report.facts["recipients"] = f"{sum(domains.values())} in {len(domains)} domains"
    message = item.content
    if campaign.signer is not None:
        keys = list(campaign.signer.keys)
    else:
        message, keys = _signed_by_policy(_policy(config, report), message, report)
    if unsubscribe is not None:
        report.facts["unsubscribe"] = "one-click headers from the configuration's [unsubscribe]"
    return Sample("campaign", str(path), message, item.sender, domains, keys, where_html, where_text)


def _message(path: Path, config: Config, report: Report, sender: str | None) -> Sample | None:
    try:
        data = read_pickup_bytes(path)
    except InputError as exc:
        report.error("input", exc.reason, str(path))
        return None
    fields, _ = core.split_header_fields(data)
    names = core.index_header_fields(fields)
    if b"x-sender" in names or b"x-receiver" in names:
        try:
            pickup = parse_pickup(data, path)
        except InputError as exc:
            report.error("pickup", exc.reason, _where(exc.source, exc.line))
            return None
        kind, content, envelope, recipients = "pickup", pickup.content, pickup.sender, pickup.recipients
        if sender is not None:
            envelope = sender
    else:
        kind, content = "message", core.normalize_crlf(data)
        envelope = sender if sender is not None else _header_address(names, b"return-path") or _header_address(
            names, b"from"
        ) or ""
        recipients = [a for n in (b"to", b"cc", b"bcc") for a in _header_addresses(names, n)]
        if sender is None:
            report.facts["envelope"] = "sender taken from the message's headers (give --from to set it)"
    content = core.normalize_crlf(content)
    domains = Counter(r.rpartition("@")[2].lower().rstrip(".") for r in recipients if "@" in r)
    message, keys = _signed_by_policy(_policy(config, report), content, report)
    return Sample(kind, str(path), message, envelope, domains, keys)


def _header_addresses(names: dict[bytes, list[bytes]], name: bytes) -> list[str]:
    values = [f.split(b":", 1)[1].decode("utf-8", "replace").replace("\r\n", " ") for f in names.get(name, [])]
    return [addr for _, addr in email.utils.getaddresses(values) if addr]


def _header_address(names: dict[bytes, list[bytes]], name: bytes) -> str | None:
    found = _header_addresses(names, name)
    return found[0] if found else None


def _shown(path: Path) -> str:
    """*path* relative to the current directory when that is shorter."""
    try:
        relative = os.path.relpath(path)
    except ValueError:
        return str(path)
    return relative if len(relative) < len(str(path)) else str(path)


def _where(source: str | None, line: int | None) -> str:
    return f"{source}:{line}" if source and line else (source or "")


def load_sample(
    path: Path, config: Config, report: Report, *, sender: str | None = None, count_domains: bool = True
) -> Sample | None:
    """The message to judge for *path* (None: it cannot be had; the reason is in *report*)."""
    if path.suffix.lower() == ".toml":
        report.kind = "campaign"
        return _campaign(path, config, report, count_domains)
    sample = _message(path, config, report, sender)
    if sample is not None:
        report.kind = sample.kind
    return sample
