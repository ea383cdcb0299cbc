"""Classify SMTP replies or bounce messages as the engine would; one JSON line each.

Input: reply lines, one per line ("550 5.1.1 <bob@example.com>: User
unknown", or a bounce's Diagnostic-Code text), from the FILEs given or from
standard input ("-"); and with --email, whole bounce messages (DSNs): one
result per recipient they report on.

Output, one JSON object per input line or bounced recipient:
  input         the text classified (for --email: the recipient's diagnostic)
  outcome       delivered, transient or permanent
  category      why (invalid_recipient, mailbox_full, reputation_block, ...)
  bounce        hard (suppress the address), soft, suspected_filter or none
  scope         what it concerns: recipient, message, session or site
  phase         the SMTP phase used (--phase, else found in the text; null: unknown)
  rule          the rule that decided
  retry_after   seconds before the next try (a hint; null: the default schedule)
  site_paced, suspend_for, code, enhanced (what was found or given)
  file, line    where the input came from; for --email also recipient, action, status
  kind          --email, a message that reports no failed recipient: what it is instead
                (auto_reply, complaint, unrecognized), as the service's inbound path records it

The rules are the built-in ones, plus those of a configuration's [classify]
section (--config, as `fastmta send` loads them) or of a rule file in the
format of the built-in classify_rules.toml (--rules).

Exit status: 0, or 2 on bad usage (unreadable file, bad rules).

Examples:
  echo '550 5.1.1 <bob@example.com>: User unknown' | fastmta classify
  fastmta classify --phase rcpt replies.txt
  fastmta classify --email bounce1.eml --email bounce2.eml --config fastmta.toml
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from fastmta.cli import UsageError
from fastmta.errors import ConfigError
from fastmta.feedback.classification import Classification, Outcome, Phase
from fastmta.feedback.classify import Classifier, default_classifier
from fastmta.feedback.diagnostic import parse_diagnostic
from fastmta.feedback.dsn import parse_dsn
from fastmta.feedback.inbound import read_inbound

_ACTIONS = {
    "failed": Outcome.PERMANENT,
    "delayed": Outcome.TRANSIENT,
    "delivered": Outcome.DELIVERED,
    "relayed": Outcome.DELIVERED,
    "expanded": Outcome.DELIVERED,
}


def _phase(text: str) -> Phase:
    phase = Phase.parse(text)
    if phase is None:
        allowed = ", ".join(p.value for p in Phase)
        raise argparse.ArgumentTypeError(f"unknown phase {text!r} (one of: {allowed}; or 'RCPT TO', 'end of DATA')")
    return phase


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="*", metavar="FILE",
                   help="files of reply lines, one per line ('-': standard input; default: standard input "
                   "unless --email is given)")
    p.add_argument("--email", action="append", default=[], metavar="FILE",
                   help="a whole bounce message (DSN) to classify, one result per recipient (repeatable)")
    p.add_argument("--phase", type=_phase, metavar="PHASE",
                   help="the SMTP phase the lines answered: connect, ehlo, mail, rcpt, data, eod (after the "
                   "final dot), ... (default: found in each line's text, else unknown)")
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="a fastmta configuration whose [classify] rules to add to the built-in ones")
    p.add_argument("--rules", type=Path, metavar="FILE",
                   help="a rule file (the format of the built-in classify_rules.toml) to add to the built-in rules")


def _classifier(args: argparse.Namespace) -> Classifier:
    if args.config is not None and args.rules is not None:
        raise UsageError("give --config or --rules, not both")
    try:
        if args.config is not None:
            from fastmta.delivery.config import load_config

            return load_config(args.config).classify.classifier()
        if args.rules is not None:
            try:
                text = args.rules.read_text("utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise UsageError(f"cannot read {args.rules}: {getattr(exc, 'strerror', None) or exc}") from None
            return Classifier.from_rules(text, origin=str(args.rules))
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    return default_classifier()


def _record(c: Classification, phase: Phase | None) -> dict[str, Any]:
    return {
        "outcome": c.outcome.value,
        "category": c.category.value,
        "bounce": c.bounce.value,
        "scope": c.scope.value,
        "phase": phase.value if phase is not None else None,
        "rule": c.rule,
        "retry_after": c.retry_after,
        "site_paced": c.site_paced,
        "suspend_for": c.suspend_for,
    }


def _lines(name: str) -> Iterator[tuple[int, str]]:
    stream: TextIO
    if name == "-":
        stream = open(sys.stdin.fileno(), encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
    else:
        try:
            stream = open(name, encoding="utf-8", errors="replace")  # noqa: SIM115
        except OSError as exc:
            raise UsageError(f"cannot read {name}: {exc.strerror or exc}") from None
    with stream:
        for number, line in enumerate(stream, 1):
            text = line.strip()
            if text:
                yield number, text


def _classify_line(cl: Classifier, text: str, phase: Phase | None) -> dict[str, Any]:
    code, enhanced, found = parse_diagnostic(text)
    used = phase or found
    c = cl.classify_text(text, phase=used)
    return {"input": text, **_record(c, used), "code": code, "enhanced": enhanced}


def _classify_email(cl: Classifier, name: str, phase: Phase | None) -> Iterator[dict[str, Any]]:
    try:
        raw = Path(name).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {name}: {exc.strerror or exc}") from None
    records = parse_dsn(raw)
    if not records:
        # Not a bounce with a recipient in it: say what it is (an auto-reply, a complaint, a report
        # naming nobody) rather than nothing at all, as the service's inbound path would record it.
        for event in read_inbound(raw, "", [], return_path=None, classifier=cl):
            yield {"input": event.diagnostic, "kind": event.kind, "outcome": None, "bounce": "none",
                   "file": name, "recipient": event.recipient or None,
                   **({"feedback_type": event.feedback_type} if event.feedback_type else {})}
        return
    for rcpt in records:
        text = rcpt.diagnostic or ""
        code, enhanced, found = parse_diagnostic(text)
        code = rcpt.reply_code if rcpt.reply_code is not None else code
        enhanced = rcpt.status or enhanced
        used = phase or found
        outcome = _ACTIONS.get((rcpt.action or "").lower())
        c = cl.classify_text(text, code=code, enhanced=enhanced, phase=used, outcome=outcome)
        yield {
            "input": text, **_record(c, used), "code": code, "enhanced": enhanced,
            "file": name, "recipient": rcpt.recipient, "action": rcpt.action, "status": rcpt.status,
        }


def _emit(record: dict[str, Any]) -> None:
    # ensure_ascii: every control or display-changing character of the input
    # comes out escaped, so the output is safe on a terminal and valid JSON.
    sys.stdout.write(json.dumps(record, ensure_ascii=True) + "\n")


def run(args: argparse.Namespace) -> int:
    cl = _classifier(args)
    files = list(args.files) or ([] if args.email else ["-"])
    try:
        for name in files:
            for number, text in _lines(name):
                _emit({**_classify_line(cl, text, args.phase), "file": name, "line": number})
        for name in args.email:
            for record in _classify_email(cl, name, args.phase):
                _emit(record)
        sys.stdout.flush()
    except BrokenPipeError:  # `fastmta classify ... | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
