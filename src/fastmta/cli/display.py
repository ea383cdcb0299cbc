"""The live progress display and the final summary of ``fastmta send`` (rich).

On a terminal: a live panel refreshed four times a second. Elsewhere (CI,
pipes): one plain progress line every few seconds on stderr, so logs stay
readable. The summary is printed either way.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from fastmta.cli.terminal import plain, safe_text
from fastmta.delivery.engine import Engine
from fastmta.intake.reader import Reject


class Progress:
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.console = Console(stderr=True)
        self.out = Console()
        self.rejects: list[Reject] = []
        self.messages = 0
        self.recipients = 0
        self._engine: Engine | None = None
        self._live: Live | None = None
        self._task: asyncio.Task[None] | None = None
        self._notes: list[str] = []
        self._started = time.perf_counter()
        self._rate_window: list[tuple[float, int]] = []
        self._last_event: object = None

    # --- feeding ------------------------------------------------------------

    def start(self, engine: Engine) -> None:
        self._engine = engine
        self._started = time.perf_counter()
        if not self.enabled:
            return
        if self.console.is_terminal:
            self._live = Live(self._render(), console=self.console, refresh_per_second=4, transient=False)
            self._live.start()
        self._task = asyncio.ensure_future(self._tick())

    def submitted(self, messages: int, recipients: int) -> None:
        self.messages, self.recipients = messages, recipients

    def reject(self, reject: Reject) -> None:
        self.rejects.append(reject)
        self.console.print(Text.assemble(("rejected ", "red"), plain(reject)), highlight=False)

    def note(self, text: str) -> None:
        self._notes.append(text)
        self.console.print(plain(text, "yellow"), highlight=False)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._live is not None:
            self._live.update(self._render())
            self._live.stop()

    # --- rendering ------------------------------------------------------------

    def _final(self) -> int:
        assert self._engine is not None
        c = self._engine.counts
        return c["delivered"] + c["bounced"] + c["expired"]

    def _rate(self) -> float:
        now = time.perf_counter()
        self._rate_window.append((now, self._final()))
        while len(self._rate_window) > 2 and now - self._rate_window[0][0] > 5.0:
            self._rate_window.pop(0)
        (t0, n0), (t1, n1) = self._rate_window[0], self._rate_window[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    async def _tick(self) -> None:
        interval = 0.25 if self._live is not None else 3.0
        while True:
            await asyncio.sleep(interval)
            if self._live is not None:
                self._live.update(self._render())
            else:
                assert self._engine is not None
                events = list(self._engine.throttle_events)
                fresh = events[events.index(self._last_event) + 1 :] if self._last_event in events else events
                for event in fresh:
                    print(f"throttle: {safe_text(event)}", file=sys.stderr, flush=True)
                if events:
                    self._last_event = events[-1]
                c = self._engine.counts
                print(
                    f"[{time.perf_counter() - self._started:7.1f}s] queued {self.recipients}  delivered {c['delivered']}  "
                    f"deferred {c['deferred']}  bounced {c['bounced']}  expired {c['expired']}  "
                    f"{self._rate():,.0f} rcpt/s",
                    file=sys.stderr, flush=True,
                )

    def site_table(self, engine: Engine, limit: int | None = 5) -> list[dict[str, Any]]:
        rows: dict[str, dict[str, Any]] = {}
        for q in engine.queue_stats():
            row = rows.setdefault(q["site"], {"site": q["site"], "ready": 0, "connections": 0, "transactions": 0,
                                              "window": 0, "rate": None, "suspended_for": 0.0})
            row["ready"] += q["ready"]
            row["connections"] += q["connections"]
            row["transactions"] += q["transactions"]
            row["window"] += q["window"]
            if q["rate"] is not None:
                row["rate"] = (row["rate"] or 0.0) + q["rate"]
            row["suspended_for"] = max(row["suspended_for"], q["suspended_for"])
        for site, counts in engine.site_counts.items():
            row = rows.setdefault(site, {"site": site, "ready": 0, "connections": 0, "transactions": 0})
            row.update({k: counts.get(k, 0) for k in ("delivered", "deferred", "bounced", "expired")})
        ordered = sorted(rows.values(), key=lambda r: (-(r["ready"] + r["connections"]), -r.get("delivered", 0)))
        return ordered[:limit] if limit else ordered

    def _render(self) -> Group:
        assert self._engine is not None
        c = self._engine.counts
        head = Text.assemble(
            ("fastmta send  ", "bold"),
            (f"{time.perf_counter() - self._started:6.1f}s  ", "dim"),
            (f"queued {self.recipients:,}  ", ""),
            (f"delivered {c['delivered']:,}  ", "green"),
            (f"deferred {c['deferred']:,}  ", "yellow"),
            (f"bounced {c['bounced']:,}  ", "red"),
            (f"expired {c['expired']:,}  ", "magenta"),
            (f"{self._rate():,.0f} rcpt/s  ", "bold cyan"),
            (f"rejected {len(self.rejects)}", "red" if self.rejects else "dim"),
        )
        table = Table(title="busiest sites", title_justify="left", expand=False, box=None, pad_edge=False)
        for col in ("site", "conns", "window", "rate/s", "ready", "delivered", "deferred", "bounced"):
            table.add_column(col, justify="left" if col == "site" else "right")
        for row in self.site_table(self._engine):
            rate = "-" if row.get("rate") is None else f"{row['rate']:,.1f}"
            if row.get("suspended_for"):
                rate = f"suspended {row['suspended_for']:.0f}s"
            table.add_row(
                plain(row["site"][:60]), str(row["connections"]), str(row.get("window", "")), rate, str(row["ready"]),
                str(row.get("delivered", 0)), str(row.get("deferred", 0)), str(row.get("bounced", 0)),
            )
        # Every change of window, rate, suspension or warm-up step, with its reason.
        events = [plain(e, "yellow") for e in list(self._engine.throttle_events)[-4:]]
        return Group(head, table, *events)

    def _print_guard(self, g: dict[str, Any] | None) -> None:
        """The reputation guard: what it did (pauses, sources out of rotation) and each campaign's KPIs."""
        if not g:
            return
        for e in g.get("events", []):
            if e["status"] == "campaign_paused":
                reasons = "; ".join(f"{r['count']:,}x {r['reply']}" for r in e.get("top_reasons", [])[:3])
                self.out.print(Text.assemble(("paused ", "red"), plain(
                    f"campaign {e['campaign']}: {e['reason']}" + (f" (top: {reasons})" if reasons else ""))),
                    highlight=False)
            else:
                self.out.print(Text.assemble(("guard ", "yellow"), plain(
                    f"{e['status']}: {e.get('source')} at {e.get('provider')}")), highlight=False)
        campaigns = g.get("campaigns", [])
        if not campaigns:
            return
        table = Table(title="campaign KPIs", title_justify="left", box=None, pad_edge=False)
        for col in ("campaign", "sent", "delivered", "hard", "hard %", "suspected filter", "soft", "deferrals",
                    "blocked"):
            table.add_column(col, justify="left" if col == "campaign" else "right")
        for c in campaigns:
            rate = c.get("hard_bounce_rate")
            table.add_row(plain(str(c["campaign"])[:40]), f"{c['sent']:,}", f"{c['delivered']:,}", f"{c['hard']:,}",
                          "-" if rate is None else f"{rate:.1%}", f"{c['suspected_filter']:,}", f"{c['soft']:,}",
                          f"{c['deferred']:,}", f"{c['blocked']:,}")
        self.out.print(table)

    def print_summary(self, s: dict[str, Any]) -> None:
        table = Table(title="fastmta send: summary", title_justify="left", show_header=False)
        table.add_column("", style="bold")
        table.add_column("", justify="right")
        rows = [
            ("spool", s["spool"]),
            ("messages accepted", f"{s['messages']:,}"),
            ("recipients", f"{s['recipients']:,}"),
            # Taken up again from the queue a run left (a crash): beside "recipients 0" they explain the rest.
            *([("resumed from the last run", f"{s['resumed_recipients']:,}")] if s.get("resumed_recipients") else []),
            # Inputs known by content (sent by an earlier run, or a file of the same bytes as another): not sent.
            *([("inputs already sent, skipped", f"{s['inputs_already_done']:,}")] if s.get("inputs_already_done") else []),
            ("delivered", f"{s['delivered']:,}"),
            ("bounced", f"{s['bounced']:,}"),
            ("  of them suspected filter", f"{sum(f['suspected'] for f in s.get('suspected_filters', [])):,}"),
            ("expired", f"{s['expired']:,}"),
            ("sunset (inactive, not sent)", f"{s.get('sunset', 0):,}"),
            ("paused campaigns", f"{len(s.get('paused', [])):,}"),
            ("deferrals (retried)", f"{s['deferrals']:,}"),
            ("not final", f"{s['unfinished']:,}"),
            ("input rejected", f"{len(s['rejected']):,}"),
            ("lost (queue damage)", f"{len(s.get('lost', [])):,}"),
            ("elapsed", f"{s['elapsed_s']:.2f} s"),
            ("throughput", f"{s['recipients_per_s']:,.0f} recipients/s"),
            ("sites", f"{len(s['sites']):,}"),
        ]
        if s.get("accounting"):
            rows.append(("accounting", s["accounting"]))
        for k, v in rows:
            table.add_row(k, plain(v))
        self.out.print(table)
        for f in s.get("suspected_filters", []):
            # "User unknown" held as unconfirmed: soft, not suppressed; the addresses are likely fine.
            self.out.print(Text.assemble(
                ("suspected filter ", "yellow"),
                plain(f"{f['domain']}: {f['suspected']:,} 'user unknown' held as unconfirmed "
                      f"(signals: {', '.join(f['signals'])}"
                      + (f"; appliance: {f['appliance']}" if f["appliance"] else "")
                      + f"; {f['hard_unknown']:,} taken as hard)"),
            ), highlight=False)
        self._print_guard(s.get("guard"))
        for r in s["rejected"]:
            where = f"{r['file']}:{r['line']}" if r["line"] is not None else r["file"]
            self.out.print(Text.assemble(("rejected ", "red"), plain(f"{where}: {r['reason']}")), highlight=False)
