"""SpamAssassin's opinion of the rendered sample, when SpamAssassin is installed.

``spamassassin -t -L``: test mode (the report comes back, nothing is
filed), local tests only (never a network test: no DNS blocklist, no
Razor/Pyzor, no URI lookup), no per-user preferences created, Bayes off
(its score would depend on what this machine's user trained, and auto-learning
would train it on the sample). Without ``spamassassin`` but with ``spamc``
and a running ``spamd``, ``spamc -R`` asks the daemon, whose own configuration
then decides which tests run. With neither, the report says it was skipped.

The score against the required score (5.0 by default): at or over it an
error, over half of it a warning; every rule hit is listed with its points.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field

from fastmta.check.report import Report

__all__ = ["SpamResult", "check_spamassassin", "parse_report"]

_DETAILS = re.compile(r"Content analysis details:\s+\((-?[\d.]+) points, (-?[\d.]+) required\)")
_RULE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s+([A-Z0-9_]+)\s+(.*)$")
_SPAMC = re.compile(r"^\s*(-?[\d.]+)/(-?[\d.]+)\s*$", re.M)
TIMEOUT = 120.0


@dataclass
class SpamResult:
    score: float
    required: float
    rules: list[tuple[float, str, str]] = field(default_factory=list)  # (points, name, description)


def parse_report(text: str) -> SpamResult | None:
    """Score, required score and rule hits from a SpamAssassin report (``-t`` output or ``spamc -R``)."""
    m = _DETAILS.search(text)
    if m is not None:
        result = SpamResult(float(m.group(1)), float(m.group(2)))
        rest = text[m.end():]
    else:
        first = _SPAMC.search(text)
        if first is None:
            return None
        result = SpamResult(float(first.group(1)), float(first.group(2)))
        rest = text[first.end():]
    in_table = False
    for line in rest.splitlines():
        if line.startswith("----"):
            in_table = True
            continue
        if not in_table:
            continue
        if not line.strip():
            if result.rules:
                break
            continue
        rule = _RULE.match(line)
        if rule:
            result.rules.append((float(rule.group(1)), rule.group(2), rule.group(3).strip()))
        elif result.rules and line.startswith(" "):  # a description wrapped onto the next line
            points, name, description = result.rules[-1]
            result.rules[-1] = (points, name, f"{description} {line.strip()}")
    return result


def _run(command: list[str], message: bytes) -> str:
    done = subprocess.run(command, input=message, capture_output=True, timeout=TIMEOUT, check=False)
    return done.stdout.decode("utf-8", "replace") + "\n" + done.stderr.decode("utf-8", "replace")


def check_spamassassin(message: bytes, sender: str, report: Report) -> SpamResult | None:
    """Score *message* (with its envelope sender as Return-Path); None when SpamAssassin is not there."""
    sample = f"Return-Path: <{sender}>\r\n".encode() + message
    spamassassin = shutil.which("spamassassin")
    spamc = shutil.which("spamc")
    try:
        if spamassassin is not None:
            tool = "spamassassin -t -L"
            text = _run([spamassassin, "-t", "-L", "-x", "--cf=use_bayes 0", "--cf=bayes_auto_learn 0"], sample)
        elif spamc is not None:
            tool = "spamc -R"
            text = _run([spamc, "-R", "-x"], sample)
        else:
            report.info("spamassassin", "skipped: spamassassin not installed", "")
            return None
    except (OSError, subprocess.TimeoutExpired) as exc:
        report.warning("spamassassin", f"skipped: SpamAssassin did not run ({exc})", "")
        return None
    result = parse_report(text)
    if result is None:
        first = text.strip().splitlines()[:1]
        report.warning("spamassassin", f"skipped: no report from {tool} ({first[0][:120] if first else 'no output'})", "")
        return None
    summary = f"SpamAssassin ({tool}) score {result.score:.1f} of {result.required:.1f} required"
    if result.score >= result.required:
        report.error("spamassassin", summary + ": it would be marked as spam", "")
    elif result.score > result.required / 2:
        report.warning("spamassassin", summary, "")
    else:
        report.ok("spamassassin", summary, "")
    for points, name, description in result.rules:
        report.info("spamassassin", f"{name} ({points:+g}): {description}", "")
    return result
