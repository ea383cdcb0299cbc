"""`fastmta load` as a load tester: open loop, per-phase latency, workload options, workers, JSON schema, plot.

The 30-second acceptance check (issue 7, item 2: open loop below capacity
holds the rate within 2 % over 30 s) is the last test here; it is skipped
unless FASTMTA_LONG=1, so the suite stays fast:

    FASTMTA_LONG=1 python -m pytest tests/test_load_open.py -k thirty -s

or by hand: ``fastmta load --sink --rate 1000 --duration 30 --connections 10``
and read the ``rate`` line (or ``rate_achieved`` / ``rate_target`` in --json).
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import dkim
import pytest
from cryptography.hazmat.primitives import serialization

from fastmta.load.driver import _Source, run_load
from fastmta.load.processes import run_load_processes, split_spec
from fastmta.load.report import Progress, merge_results
from fastmta.load.schema import SCHEMA, validate
from fastmta.load.spec import DkimOptions, LoadSpec, SizeDistribution
from fastmta.load.workload import Workload
from scripted import ScriptedSMTP
from servers import free_port, postfix_smtp_sink

Run = Callable[[Coroutine[Any, Any, Any]], Any]
ROOT = Path(__file__).resolve().parent.parent
TEST_KEY = ROOT / "src" / "fastmta" / "examples" / "spool" / "dkim-test-ed25519.key.pem"


# --- a scriptable loopback server: answers like a sink, with an optional stall ---------


class Scripted(ScriptedSMTP):
    """A pipelining sink; ``stall_after`` delays one end-of-data reply by ``stall`` seconds."""

    stall_after = -1
    stall = 0.0
    messages = 0  # over all connections (class attribute on purpose: one server per test)
    _delay = 0.0

    def message_done(self) -> bytes:
        type(self).messages += 1
        if type(self).messages == self.stall_after:
            self._delay = self.stall
        return self.queued

    def send(self, out: bytes) -> None:
        delay, self._delay = self._delay, 0.0
        if delay:
            asyncio.get_running_loop().call_later(delay, self.t.write, out)
        else:
            self.t.write(out)


def scripted(**attrs: Any) -> type[Scripted]:
    return type("ScriptedServer", (Scripted,), dict(attrs, messages=0))


async def serve(protocol: type[asyncio.Protocol], spec_for: Callable[[int], LoadSpec]) -> Any:
    server = await asyncio.get_running_loop().create_server(protocol, "127.0.0.1", 0)
    async with server:
        return await run_load(spec_for(server.sockets[0].getsockname()[1]))


# --- pure parts ---------------------------------------------------------------------


def test_size_distributions_parse_and_sample() -> None:
    import random

    rng = random.Random(1)
    assert SizeDistribution.parse("2048") == SizeDistribution.fixed(2048)
    assert SizeDistribution.parse("2k").values == (2048,)
    u = SizeDistribution.parse("uniform:1k:20k")
    assert all(1024 <= u.sample(rng) <= 20480 for _ in range(500))
    ln = SizeDistribution.parse("lognormal:4k:1.0")
    samples = sorted(ln.sample(rng) for _ in range(2001))
    assert 3000 < samples[1000] < 5500  # the median is about 4 KiB
    c = SizeDistribution.parse("choice:2k@80,20k@20")
    picks = [c.sample(rng) for _ in range(2000)]
    assert set(picks) == {2048, 20480} and 0.7 < picks.count(2048) / 2000 < 0.9
    for text in ("uniform:1k:20k", "lognormal:4096:1", "choice:2048@80,20480@20", "2048"):
        assert str(SizeDistribution.parse(str(SizeDistribution.parse(text)))) == str(SizeDistribution.parse(text))
    for bad in ("huge", "uniform:9k:1k", "lognormal:4k", "choice:2k@0", "100g", "gauss:1:2"):
        with pytest.raises(ValueError):
            SizeDistribution.parse(bad)


def test_open_loop_schedule_and_ramp() -> None:
    loop = asyncio.new_event_loop()
    try:
        flat = _Source(LoadSpec("h", 1, rate=100.0, duration=5), 0.0, loop)
        assert [flat.offset(i) for i in (0, 1, 100)] == [0.0, 0.01, 1.0]
        ramped = _Source(LoadSpec("h", 1, rate=100.0, ramp=2.0, duration=5), 0.0, loop)
        # Linear ramp 0 -> 100/s over 2 s: 25 messages due in the first second, 100 in two, then 100/s.
        assert ramped.offset(25) == pytest.approx(1.0)
        assert ramped.offset(100) == pytest.approx(2.0)
        assert ramped.offset(200) == pytest.approx(3.0)
        offsets = [ramped.offset(i) for i in range(300)]
        assert offsets == sorted(offsets)
    finally:
        loop.close()


def test_spec_is_checked_and_split_between_workers() -> None:
    with pytest.raises(ValueError):
        LoadSpec("h", 1, messages=None).check()  # neither a count nor a duration
    with pytest.raises(ValueError):
        LoadSpec("h", 1, ramp=5).check()  # a ramp without a rate
    parts = split_spec(LoadSpec("h", 1, messages=1001, connections=5, rate=300.0), 2)
    assert [p.messages for p in parts] == [501, 500]
    assert [p.connections for p in parts] == [3, 2]
    assert [p.rate for p in parts] == [150.0, 150.0]
    with pytest.raises(ValueError):
        split_spec(LoadSpec("h", 1, connections=1), 2)


def test_templated_dkim_signed_bodies_verify() -> None:
    spec = LoadSpec("h", 1, messages=10, size=SizeDistribution.parse("uniform:3k:8k"), recipients=2, domains=3,
                    template=True, dkim=DkimOptions(str(TEST_KEY), "load.fastmta.test", "s1"))
    w = Workload(spec)
    text = TEST_KEY.read_bytes()
    key = serialization.load_pem_private_key(text[text.index(b"-----BEGIN"):], None)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"s1._domainkey.load.fastmta.test."
        return b"v=DKIM1; k=ed25519; p=" + base64.b64encode(raw)

    bodies = set()
    for i in range(6):
        t = w.transaction(i, None)
        assert len(t.recipients) == 2 and t.recipients[0] != w.transaction(i + 1, None).recipients[0]
        content = t.body.raw
        assert content.startswith(b"DKIM-Signature:") and b"multipart/alternative" in content
        assert f"To: {['Ada', 'Grace', 'Alan', 'Edsger', 'Barbara', 'Donald'][i]}".encode() in content
        assert dkim.verify(content, dnsfunc=dnsfunc)
        bodies.add(content)
    assert len(bodies) == 6 and w.describe() == "templated, DKIM-signed"


# --- against servers --------------------------------------------------------------


def test_open_loop_holds_the_rate_and_reports_latencies(run_uvloop: Run) -> None:
    """A short version of acceptance item 2: 300 msg/s for 3 s, well below capacity."""
    with postfix_smtp_sink() as sink:
        spec = LoadSpec(sink.host, sink.port, messages=None, duration=3.0, rate=300.0, connections=4,
                        interval=0.5, timeout=30)
        r = run_uvloop(run_load(spec))
    assert r.mode == "open" and r.complete and not r.timed_out, r.errors
    assert r.messages_attempted == 900 and r.messages_unsent == 0  # exactly rate x duration were due
    # 2 % in the 30 s acceptance run; a loaded test machine gets 5 % on 3 s.
    assert r.rate_achieved == pytest.approx(300.0, rel=0.05)
    assert r.rate_window_s == pytest.approx(3.0)
    h = r.histograms
    assert h["message"].count == h["queue"].count == h["envelope"].count == h["end_of_data"].count == 900
    assert h["connect"].count == h["greeting"].count == h["ehlo"].count == 4
    stats = r.latency_ms("message")
    assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["p99_9"] <= stats["max"] < 3000
    assert len(r.series) in (6, 7) and sum(iv.sent for iv in r.series) == 900
    # Steady state: every full half-second after the first sends 150 messages, give or take one tick.
    assert all(abs(iv.sent - 150) <= 15 for iv in r.series[1:6]), [iv.sent for iv in r.series]


def test_open_loop_measures_from_intended_time_so_stalls_show(run: Run) -> None:
    """Coordinated omission: one 1 s stall delays ~100 messages due meanwhile; each must show it."""
    server = scripted(stall_after=50, stall=1.0)
    r = run(serve(server, lambda port: LoadSpec(
        "127.0.0.1", port, messages=200, rate=100.0, connections=1, depth=1, timeout=20, interval=0.5)))
    assert r.complete and r.messages_accepted == 200
    msg = r.histograms["message"]
    # ~100 messages fall due during the stall, waiting 1.0 .. 0 s: the median of all 200 is
    # small but p90 is far above any service time. Measured from the send instead, only one
    # message would show the stall.
    assert msg.percentile(90) >= 400_000 and msg.max >= 900_000
    assert r.histograms["queue"].percentile(90) >= 300_000
    assert r.histograms["end_of_data"].percentile(90) < 100_000
    # The time series shows the hole (nothing completes during the stall) and the catch-up burst.
    completed = [iv.completed for iv in r.series]
    assert min(completed[1:3]) <= 1 and max(completed) > 60, completed


def test_closed_loop_for_a_duration(run: Run) -> None:
    r = run(serve(scripted(), lambda port: LoadSpec(
        "127.0.0.1", port, messages=None, duration=1.0, connections=2, recipients=2, size=600, interval=0.25)))
    assert r.mode == "closed" and r.complete, r.errors
    assert r.messages_attempted > 50 and r.recipients_accepted == 2 * r.messages_attempted
    assert 1.0 <= r.elapsed_s < 3.0
    assert r.rate_achieved is None and r.histograms["queue"].count == 0
    assert r.histograms["message"].count == r.messages_attempted


def test_live_progress_reports_rate_classes_and_percentiles(run_uvloop: Run) -> None:
    seen: list[Progress] = []

    async def main() -> Any:
        server = await asyncio.get_running_loop().create_server(scripted(), "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            spec = LoadSpec("127.0.0.1", port, messages=None, duration=1.2, rate=200.0, connections=2, interval=0.25)
            return await run_load(spec, seen.append, progress_interval=0.2)

    r = run_uvloop(main())
    assert r.complete and len(seen) >= 4
    last = seen[-1]
    assert last.sent > 150 and last.reply_classes == {"2xx": last.accepted} and last.failed == 0
    assert last.sent_per_s == pytest.approx(200.0, rel=0.25)  # 50 per 0.25 s interval
    assert 0 < last.p50_ms <= last.p99_ms
    merged = Progress.merge([last, last])
    assert merged.sent == 2 * last.sent and merged.p99_ms == pytest.approx(last.p99_ms)


def test_one_message_per_connection_measures_every_session(run: Run) -> None:
    r = run(serve(scripted(), lambda port: LoadSpec(
        "127.0.0.1", port, messages=30, connections=3, messages_per_connection=1, rate=200.0, timeout=20)))
    assert r.complete and r.messages_accepted == 30
    assert 30 <= r.connections_opened <= 33
    assert r.histograms["connect"].count == r.connections_opened == r.histograms["ehlo"].count


def test_lockstep_and_bdat_still_time_phases(run: Run) -> None:
    r = run(serve(scripted(), lambda port: LoadSpec(
        "127.0.0.1", port, messages=20, connections=1, pipelining=False, timeout=20)))
    assert r.complete and r.histograms["envelope"].count == 20 and r.histograms["end_of_data"].count == 20


def test_open_loop_against_a_server_that_is_down_ends_early(run: Run) -> None:
    t0 = time.monotonic()
    r = run(run_load(LoadSpec("127.0.0.1", free_port(), messages=None, duration=10.0, rate=50.0, connections=2)))
    assert time.monotonic() - t0 < 5  # every connection slot gave up; no waiting for the duration
    assert not r.complete and r.messages_attempted == 0 and r.messages_unsent > 0
    assert r.connect_failures == 6 and any("refused" in e.lower() for e in r.errors)


class Silent(asyncio.Protocol):
    """Accepts the connection and never says anything (a tarpit before the greeting)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport


def test_open_loop_tarpit_is_bounded(run: Run) -> None:
    t0 = time.monotonic()
    r = run(serve(Silent, lambda port: LoadSpec(
        "127.0.0.1", port, messages=None, duration=1.0, rate=20.0, connections=2, reply_timeout=0.3,
        max_connect_failures=2)))
    assert time.monotonic() - t0 < 6
    assert not r.complete and r.messages_accepted == 0
    assert any("timeout" in e for e in r.errors), r.errors


def test_workers_merge_their_histograms() -> None:
    with postfix_smtp_sink() as sink:
        r = run_load_processes(LoadSpec(sink.host, sink.port, messages=400, connections=4, timeout=60), 2)
    assert r.workers == 2 and r.complete, r.errors
    assert r.messages_accepted == 400 and r.connections_opened == 4
    assert r.histograms["message"].count == 400 and r.histograms["connect"].count == 4
    assert sum(iv.completed for iv in r.series) == 400
    again = merge_results([r])
    assert again.histograms["message"].to_dict() == r.histograms["message"].to_dict()


# --- CLI: JSON schema, plot ----------------------------------------------------------


def fastmta(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fastmta", *args], capture_output=True, text=True, timeout=timeout)


def test_schema_checker_catches_problems() -> None:
    assert validate({"schema": "fastmta-load/1"})  # missing everything else
    good = {"count": 1, "min": 0.1, "mean": 0.1, "max": 0.1, "p50": 0.1, "p90": 0.1, "p99": 0.1, "p99_9": 0.1}
    latency = SCHEMA["properties"]["latency_ms"]["properties"]["message"]
    assert validate(good, latency) == []
    assert validate({**good, "count": True}, latency)  # a bool is not an integer
    assert validate({**good, "p50": -1}, latency)
    assert validate({**good, "extra": 1}, latency)
    out = fastmta("load", "--schema")
    assert out.returncode == 0 and json.loads(out.stdout) == SCHEMA


def test_cli_json_validates_and_plot_renders(tmp_path: Path) -> None:
    png = tmp_path / "run.png"
    with postfix_smtp_sink() as sink:
        out = fastmta("load", f"{sink.host}:{sink.port}", "--rate", "200", "--ramp", "0.5", "--duration", "2",
                      "--connections", "3", "--recipients", "2", "--domains", "4", "--size", "uniform:1k:4k",
                      "--interval", "0.25", "--json", "--plot", str(png))
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert validate(data) == []
    assert data["mode"] == "open" and data["messages_accepted"] == data["messages_attempted"] > 0
    assert data["workload"]["size"] == "uniform:1024:4096" and data["reply_classes"] == {"2xx": data["recipients_accepted"]}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_cli_json_validates_with_jsonschema_too() -> None:
    import jsonschema

    with postfix_smtp_sink() as sink:
        out = fastmta("load", f"{sink.host}:{sink.port}", "--messages", "200", "--connections", "2",
                      "--workers", "2", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    jsonschema.validate(data, SCHEMA)
    assert validate(data) == [] and data["workers"] == 2 and data["messages_accepted"] == 200


def test_cli_failure_report_for_garbage_server() -> None:
    # A server that is not SMTP at all: a clear error, a report, exit status 1, quickly.
    import socket
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]
    stop = threading.Event()

    def serve_garbage() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except OSError:
                continue
            c.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            c.close()

    th = threading.Thread(target=serve_garbage, daemon=True)
    th.start()
    try:
        t0 = time.monotonic()
        out = fastmta("load", f"127.0.0.1:{port}", "--rate", "50", "--duration", "5", "--connections", "2")
        assert time.monotonic() - t0 < 20
    finally:
        stop.set()
        th.join(2)
        srv.close()
    assert out.returncode == 1
    assert "0 accepted" in out.stdout and "error" in out.stdout and "unsent" in out.stdout


def test_cli_usage_errors() -> None:
    assert fastmta("load", "--sink", "--ramp", "3").returncode == 2
    assert fastmta("load", "--sink", "--workers", "4", "--connections", "2").returncode == 2
    bad = fastmta("load", "--sink", "--size", "gauss:1:2")
    assert bad.returncode == 2 and "bad size" in bad.stderr


def test_help_documents_the_load_tester_options() -> None:
    out = fastmta("load", "--help")
    for option in ("--rate", "--ramp", "--duration", "--workers", "--plot", "--json", "--schema", "--template",
                   "--dkim-key", "--interval", "--per-connection", "--no-pipelining", "--starttls", "lognormal"):
        assert option in out.stdout, option


def test_thirty_seconds_open_loop_within_two_percent(run_uvloop: Run) -> None:
    with postfix_smtp_sink() as sink:
        r = run_uvloop(run_load(LoadSpec(sink.host, sink.port, messages=None, duration=30.0, rate=1000.0,
                                         connections=10, timeout=90)))
    print(f"\nrate {r.rate_achieved:.1f}/s of 1000/s; message p50 {r.latency_ms('message')['p50']:.2f} ms, "
          f"p99 {r.latency_ms('message')['p99']:.2f} ms, p99.9 {r.latency_ms('message')['p99_9']:.2f} ms")
    assert r.complete and r.rate_achieved == pytest.approx(1000.0, rel=0.02)
    assert r.latency_ms("message")["count"] == r.messages_attempted == 30_000
