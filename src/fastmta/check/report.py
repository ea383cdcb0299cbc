"""What ``fastmta check`` found: findings, the bulk-sender summary, the exit status.

A :class:`Finding` is one line of the report: its severity, the check that
made it, what was found and where (a file and line, a header, a DNS name).
``ok`` and ``info`` findings say what was checked and passed; only
``warning`` and ``error`` count for the exit status (0 clean, 1 warnings
only, 2 errors).

A finding may name the bulk-sender requirement it bears on
(:data:`REQUIREMENTS`); :meth:`Report.bulk_summary` turns those into the
pass/fail table of Gmail's, Yahoo's and Microsoft's rules for bulk senders.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

__all__ = ["REQUIREMENTS", "Finding", "Report", "Severity"]


class Severity(str, Enum):
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"
    OK = "ok"


#: Bulk-sender requirement -> (what it asks, who asks it). Gmail and Yahoo
#: since February 2024 (rejections since November 2025), Microsoft (Outlook.com,
#: 5,000+ messages a day) since May 2025; "(rec.)": recommended, not enforced.
REQUIREMENTS: dict[str, tuple[str, str]] = {
    "spf": ("SPF passes for every egress IP", "Gmail, Yahoo, Microsoft"),
    "dkim": ("DKIM signature with a published, matching key", "Gmail, Yahoo, Microsoft"),
    "dmarc": ("DMARC record (p=none at least), aligned with From via SPF or DKIM", "Gmail, Yahoo, Microsoft"),
    "unsubscribe": ("one-click unsubscribe (RFC 8058 headers, signed) and a visible link", "Gmail, Yahoo, Microsoft (rec.)"),
    "ptr": ("reverse DNS of each egress IP, forward-confirmed", "Gmail, Yahoo"),
    "tls": ("TLS on the connection (STARTTLS offered and used)", "Gmail, Microsoft (rec.)"),
    "rfc5322": ("message formatted per RFC 5322", "Gmail, Yahoo, Microsoft"),
}


@dataclass(frozen=True, slots=True)
class Finding:
    severity: Severity
    check: str  # "content", "html", "links", "headers", "spf", "dkim", "dmarc", "ptr", "tls", "spamassassin", ...
    finding: str
    where: str = ""  # "welcome.html:6", "header From", "DNS _dmarc.example.com TXT"
    requirement: str | None = None  # a key of REQUIREMENTS

    def to_dict(self) -> dict[str, Any]:
        return {
            "severity": self.severity.value,
            "check": self.check,
            "finding": self.finding,
            "where": self.where,
            "requirement": self.requirement,
        }


@dataclass
class Report:
    """The findings for one input (a campaign job, a pickup file or a message)."""

    source: str
    kind: str  # "campaign", "pickup" or "message"
    findings: list[Finding] = field(default_factory=list)
    #: Facts about the input shown above the table: envelope sender, From domain, egress IPs, ...
    facts: dict[str, str] = field(default_factory=dict)

    def add(
        self, severity: Severity, check: str, finding: str, where: str = "", requirement: str | None = None
    ) -> Finding:
        f = Finding(severity, check, finding, where, requirement)
        self.findings.append(f)
        return f

    def error(self, check: str, finding: str, where: str = "", requirement: str | None = None) -> Finding:
        return self.add(Severity.ERROR, check, finding, where, requirement)

    def warning(self, check: str, finding: str, where: str = "", requirement: str | None = None) -> Finding:
        return self.add(Severity.WARNING, check, finding, where, requirement)

    def info(self, check: str, finding: str, where: str = "", requirement: str | None = None) -> Finding:
        return self.add(Severity.INFO, check, finding, where, requirement)

    def ok(self, check: str, finding: str, where: str = "", requirement: str | None = None) -> Finding:
        return self.add(Severity.OK, check, finding, where, requirement)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity is Severity.ERROR]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity is Severity.WARNING]

    @property
    def exit_code(self) -> int:
        """0 clean, 1 warnings only, 2 errors."""
        if self.errors:
            return 2
        return 1 if self.warnings else 0

    def bulk_summary(self) -> list[dict[str, str]]:
        """One row per bulk-sender requirement: pass, fail or unknown (not checked, or could not tell)."""
        rows = []
        for key, (what, who) in REQUIREMENTS.items():
            mine = [f for f in self.findings if f.requirement == key]
            if any(f.severity is Severity.ERROR for f in mine):
                status = "fail"
            elif any(f.severity is Severity.WARNING for f in mine):
                status = "warn"
            elif any(f.severity is Severity.OK for f in mine):
                status = "pass"
            else:
                status = "unknown"
            rows.append({"requirement": key, "what": what, "who": who, "status": status})
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "kind": self.kind,
            "exit_code": self.exit_code,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "facts": dict(self.facts),
            "findings": [f.to_dict() for f in self.findings],
            "bulk_sender": self.bulk_summary(),
        }
