"""``fastmta check`` before a campaign starts (``send``; ``serve``'s pickup directory).

A campaign whose check finds errors is refused (reported as rejected input,
tried again on the next run) unless ``--force``; warnings are shown and the
campaign goes. The automatic check judges the content always, and the
sender's DNS (SPF, DKIM, DMARC, PTR) only when the mail is bound for the real
world: with ``--sink``, ``--relay`` or a static route for every domain there
is no world to be judged by, and a test must never query outside DNS.
It never connects to recipients' servers and never runs SpamAssassin (slow):
``fastmta check`` does both.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from fastmta.cli.terminal import safe_text
from fastmta.delivery.config import Config
from fastmta.intake.items import Reject

if TYPE_CHECKING:
    from fastmta.check import CheckOptions

__all__ = ["campaign_checker", "precheck"]


def _options(config: Config, relayed: bool) -> CheckOptions:
    from fastmta.check import CheckOptions  # here, not at the top: see campaign_checker

    real_world = not relayed and "*" not in config.routing.static
    return CheckOptions(dns=real_world, smtp_probe=False, spamassassin=False)


def campaign_checker(
    config: Config, *, relayed: bool, force: bool, note: Callable[[str], None]
) -> Callable[[Path], str | None]:
    """A function: campaign job path -> None (may start) or why it is refused. Blocking (DNS).

    The checks (SPF, DKIM and HTML parsers among them) are imported when the first job is
    checked: a spool of pickup files alone does not pay their ~0.1 s of start-up.
    """

    def check(path: Path) -> str | None:
        from fastmta.check import Severity, check_campaign  # here, not at the top: see above

        report = check_campaign(path, config, _options(config, relayed))
        # A job that does not load, or rows that do not render: the reader reports those itself, per
        # file and row, with the rest of the job still sent; the check is for what it cannot see.
        findings = [f for f in report.findings if f.check != "campaign"]
        for f in findings:
            if f.severity in (Severity.ERROR, Severity.WARNING):
                where = f" ({safe_text(f.where)})" if f.where else ""
                note(f"fastmta check {safe_text(path.name)}: {f.severity.value}: {safe_text(f.finding)}{where}")
        errors = [f for f in findings if f.severity is Severity.ERROR]
        if errors and not force:
            return (f"fastmta check found {len(errors)} error(s), first: {errors[0].finding} "
                    f"(see `fastmta check {path}`; --force sends it anyway)")
        return None

    return check


def precheck(spool: Path, checker: Callable[[Path], str | None]) -> tuple[set[Path], list[Reject]]:
    """Every campaign job in *spool*: the refused ones, and a reject for each."""
    refused: set[Path] = set()
    rejects: list[Reject] = []
    for path in sorted(spool.glob("*.toml")):
        if path.name.startswith(".") or not path.is_file():
            continue
        why = checker(path)
        if why is not None:
            refused.add(path)
            rejects.append(Reject(str(path), None, why))
    return refused, rejects
