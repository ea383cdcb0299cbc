"""`fastmta queue` against the admin API of a real engine: unix socket, TCP with tokens, exit statuses.

The admin app runs in the test's event loop over the test-local service of
test_http_api (a real Engine with a real Spool, delivering to a loopback
sink); the command runs as a user runs it, ``python -m fastmta queue ...``
in a subprocess, with bounded timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from fastmta.serve.admin import build_admin_app
from test_http_api import ADMIN_TOKEN, MESSAGE, TIMEOUT, TOKEN, Stack, captures, curl, serve_app, service_stack

Run = Callable[[Coroutine[Any, Any, Any]], Any]


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for the socket: a unix socket path is limited to 107 bytes, tmp_path can be longer."""
    path = Path(tempfile.mkdtemp(prefix="fq-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.asynccontextmanager
async def admin_socket(stack: Stack, path: Path) -> AsyncIterator[Path]:
    runner = web.AppRunner(build_admin_app(stack.service, require_token=False))
    await runner.setup()
    try:
        await web.UnixSite(runner, str(path)).start()
        path.chmod(0o600)
        yield path
    finally:
        await runner.cleanup()


async def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``fastmta queue ARGS``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("FASTMTA_ADMIN_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fastmta", "queue", *args, env={**base, **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def delivered(stack: Stack, *recipients: str) -> str:
    message_id = await stack.service.inject(MESSAGE.encode(), "a@sender.test", list(recipients), via="api")
    outcomes = await asyncio.wait_for(stack.engine.result(message_id), TIMEOUT)
    assert {o.status.value for o in outcomes} == {"delivered"}
    return message_id


def test_help_documents_every_subcommand_with_examples() -> None:
    done = subprocess.run([sys.executable, "-m", "fastmta", "queue", "--help"], capture_output=True, text=True,
                          timeout=TIMEOUT, check=False)
    assert done.returncode == 0
    for word in ("summary", "show ID", "suspend TARGET", "resume TARGET", "retry TARGET", "bounce TARGET",
                 "--reason", "delete TARGET", "why ADDRESS_OR_ID", "Examples:", "--socket", "--url", "--token",
                 "FASTMTA_ADMIN_SOCKET", "FASTMTA_ADMIN_TOKEN", "--json", "Exit status"):
        assert word in done.stdout, word


def test_summary_and_show_through_the_unix_socket(run_uvloop: Run, tmp_path: Path, sock_dir: Path) -> None:
    async def main() -> None:
        async with service_stack(tmp_path) as s, admin_socket(s, sock_dir / "admin.sock") as sock:
            message_id = await delivered(s, "x@y.test", "z@y.test")

            code, out, err = await cli("--socket", str(sock), "summary", "--json")
            assert code == 0, err
            queues = json.loads(out)["queues"]
            sites = [q for q in queues if q.get("kind", "site") == "site"]  # control adds a "total" row
            assert sites and all("site" in q and "source" in q and "ready" in q for q in sites)
            code, out, err = await cli("--socket", str(sock), "summary")  # the table
            assert code == 0, err
            assert "site" in out and "source" in out and "ready" in out

            code, out, err = await cli("--json", "show", message_id, env={"FASTMTA_ADMIN_SOCKET": str(sock)})
            assert code == 0, err
            shown = json.loads(out)
            recipients = {r["recipient"]: r["status"] for r in shown["recipients"]}
            assert recipients == {"x@y.test": "delivered", "z@y.test": "delivered"}
            code, out, err = await cli("--socket", str(sock), "show", message_id)
            assert code == 0, err
            assert "x@y.test" in out and "delivered" in out

            # The admin API itself, as curl sees it on the socket.
            status, _, body = await curl("--unix-socket", str(sock), "http://fastmta/v1/queue/summary")
            assert status == 200 and "queues" in json.loads(body)
            status, _, body = await curl("--unix-socket", str(sock), "http://fastmta/v1/queue/messages/nope")
            assert status == 404 and "nope" in json.loads(body)["error"]
            status, _, body = await curl("--unix-socket", str(sock), "-H", "Content-Type: application/json",
                                         "--data-binary", "{not json", "http://fastmta/v1/queue/suspend")
            assert status == 400 and "malformed JSON" in json.loads(body)["error"]
            status, _, body = await curl("--unix-socket", str(sock), "--data-binary", '{"target": "x"}',
                                         "http://fastmta/v1/queue/explode")
            assert status == 404 and "unknown action" in json.loads(body)["error"]
            status, _, body = await curl("--unix-socket", str(sock), "--data-binary", "{}",
                                         "http://fastmta/v1/queue/suspend")
            assert status == 400 and json.loads(body)["field"] == "target"
            status, _, body = await curl("--unix-socket", str(sock), "--data-binary",
                                         '{"target": "domain:y.test", "reason": "r"}', "http://fastmta/v1/queue/retry")
            assert status == 400 and json.loads(body)["field"] == "reason"  # a reason is for bounce only
            status, _, body = await curl("--unix-socket", str(sock), "http://fastmta/v1/queue/why")
            assert status == 400 and json.loads(body)["field"] == "target"

    run_uvloop(main())


def test_refusals_exit_1_and_server_text_cannot_drive_the_terminal(
    run_uvloop: Run, tmp_path: Path, sock_dir: Path
) -> None:
    async def main() -> None:
        async with service_stack(tmp_path) as s, admin_socket(s, sock_dir / "admin.sock") as sock:
            evil = "\x1b]0;pwned\x07\x1b[2Jnope"
            code, out, err = await cli("--socket", str(sock), "show", evil)
            assert code == 1
            assert "unknown message" in err and "\\x1b]0;pwned" in err
            assert "\x1b" not in err + out and "\x07" not in err + out
            code, out, err = await cli("--socket", str(sock), "--json", "show", evil)
            assert code == 1 and "\x1b" not in err + out
            if getattr(s.engine, "control", None) is None:
                code, out, err = await cli("--socket", str(sock), "suspend", "domain:y.test")
                assert code == 1 and "not available" in err

    run_uvloop(main())


def test_no_service_is_exit_2_naming_the_socket_or_url(run_uvloop: Run, sock_dir: Path) -> None:
    async def main() -> None:
        missing = sock_dir / "gone.sock"
        code, _, err = await cli("--socket", str(missing), "summary")
        assert code == 2 and str(missing) in err and "cannot connect" in err
        code, _, err = await cli("summary", env={"FASTMTA_ADMIN_SOCKET": str(missing)})
        assert code == 2 and str(missing) in err
        closed = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = closed.sockets[0].getsockname()[1]
        closed.close()
        await closed.wait_closed()
        code, _, err = await cli("--url", f"http://127.0.0.1:{port}", "summary")
        assert code == 2 and f"127.0.0.1:{port}" in err
        code, _, err = await cli("--url", "ftp://127.0.0.1:1", "summary")
        assert code == 2 and "http://" in err
        code, _, err = await cli("show")  # a missing argument: argparse's usage error
        assert code == 2

    run_uvloop(main())


def test_the_tcp_admin_port_needs_an_admin_token(run_uvloop: Run, tmp_path: Path) -> None:
    async def main() -> None:
        async with service_stack(tmp_path) as s, serve_app(build_admin_app(s.service, require_token=True)) as url:
            code, _, err = await cli("--url", url, "summary")
            assert code == 1 and "token" in err
            code, _, err = await cli("--url", url, "--token", TOKEN, "summary")  # an API token is not an admin one
            assert code == 1 and "unknown token" in err
            code, out, err = await cli("--url", url, "summary", "--json", env={"FASTMTA_ADMIN_TOKEN": ADMIN_TOKEN})
            assert code == 0, err
            assert "queues" in json.loads(out)
            code, out, err = await cli("--url", url, "--token", ADMIN_TOKEN, "show", "nope")
            assert code == 1 and "nope" in err

    run_uvloop(main())


def test_suspend_holds_a_domain_and_resume_releases_it(run_uvloop: Run, tmp_path: Path, sock_dir: Path) -> None:
    async def main() -> None:
        async with service_stack(tmp_path) as s, admin_socket(s, sock_dir / "admin.sock") as sock:
            await delivered(s, "first@held.test")
            code, out, err = await cli("--socket", str(sock), "--json", "suspend", "domain:held.test")
            assert code == 0, err
            assert isinstance(json.loads(out), dict)
            before = len(captures(s.capture))
            message_id = await s.service.inject(MESSAGE.encode(), "a@sender.test", ["second@held.test"], via="api")
            await asyncio.sleep(1.0)
            assert len(captures(s.capture)) == before  # held while suspended
            code, out, err = await cli("--socket", str(sock), "why", "second@held.test")
            assert code == 0, err
            code, out, err = await cli("--socket", str(sock), "summary")
            assert code == 0, err
            code, out, err = await cli("--socket", str(sock), "shape")  # Postfix's qshape: T, then by age
            assert code == 0, err
            lines = out.splitlines()
            assert lines[0].split() == ["T", "5", "10", "20", "40", "80", "160", "320", "640", "1280", "1280+"]
            assert lines[-1].split() == ["TOTAL", "1", "1", "0", "0", "0", "0", "0", "0", "0", "0", "0"], out
            code, out, err = await cli("--socket", str(sock), "resume", "domain:held.test")
            assert code == 0, err
            outcomes = await asyncio.wait_for(s.engine.result(message_id), TIMEOUT)
            assert [o.status.value for o in outcomes] == ["delivered"]
            code, out, err = await cli("--socket", str(sock), "suspend", "two words")
            assert code == 1 and "two words" in err

    run_uvloop(main())


def test_a_suspension_for_a_time_ends_by_itself_and_says_why(run_uvloop: Run, tmp_path: Path, sock_dir: Path) -> None:
    """`suspend --for 1s --reason ...` (kcli suspend --duration): a forgotten suspension does not hold mail for ever."""

    async def main() -> None:
        async with service_stack(tmp_path) as s, admin_socket(s, sock_dir / "admin.sock") as sock:
            code, out, err = await cli("--socket", str(sock), "--json", "suspend", "domain:later.test", "--for", "1.5s",
                                       "--reason", "partner asked: maintenance")
            assert code == 0, err
            [rule] = json.loads(out)["rules"]
            assert rule["reason"] == "partner asked: maintenance" and rule["until"] - rule["since"] == pytest.approx(1.5, abs=0.1)
            message_id = await s.service.inject(MESSAGE.encode(), "a@sender.test", ["x@later.test"], via="api")
            code, out, err = await cli("--socket", str(sock), "summary")
            assert code == 0 and "partner asked: maintenance" in out and "until" in out, out
            await asyncio.sleep(0.5)
            assert s.engine._ledger.message(message_id) is not None  # still held
            outcomes = await asyncio.wait_for(s.engine.result(message_id), TIMEOUT)  # no resume: its time ran out
            assert [o.status.value for o in outcomes] == ["delivered"]
            assert s.engine.control.rules() == []
            code, _, err = await cli("--socket", str(sock), "suspend", "domain:later.test", "--for", "soon")
            assert code == 2 and "not a duration" in err
            code, _, err = await cli("--socket", str(sock), "retry", "domain:later.test", "--reason", "x")
            assert code == 2  # --reason is for bounce and suspend

    run_uvloop(main())


def test_bounce_and_delete_end_queued_recipients(run_uvloop: Run, tmp_path: Path, sock_dir: Path) -> None:
    async def main() -> None:
        async with service_stack(tmp_path) as s, admin_socket(s, sock_dir / "admin.sock") as sock:
            code, _, err = await cli("--socket", str(sock), "suspend", "domain:gone.test")
            assert code == 0, err
            bounced = await s.service.inject(MESSAGE.encode(), "a@sender.test", ["b@gone.test"], via="api")
            deleted = await s.service.inject(MESSAGE.encode(), "a@sender.test", ["d@gone.test"], via="api")
            code, _, err = await cli("--socket", str(sock), "--json", "bounce", bounced, "--reason", "sent by mistake")
            assert code == 0, err
            [outcome] = await asyncio.wait_for(s.engine.result(bounced), TIMEOUT)
            assert outcome.status.value == "bounced"
            code, _, err = await cli("--socket", str(sock), "delete", deleted)
            assert code == 0, err
            await asyncio.wait_for(s.engine.result(deleted), TIMEOUT)
            code, _, err = await cli("--socket", str(sock), "retry", "domain:gone.test")
            assert code == 0, err
            assert captures(s.capture) == []

    run_uvloop(main())


def test_the_summary_table_says_what_the_site_answered_last() -> None:
    # A queue of retries shows the receivers' commonest last reply (PowerMTA's "last error"), its
    # control characters made harmless like every other cell's.
    import io

    from rich.console import Console

    from fastmta.cli.queue import _print_summary

    buf = io.StringIO()
    rows = [{"kind": "site", "source": "default", "site": "mx.defer.test", "ready": 0, "scheduled": 5,
             "top_reply": {"reply": "451 4.3.0 Temporary failure\x1b[2J", "recipients": 5}},
            {"kind": "total", "ready": 0, "scheduled": 5, "unfinished": 5, "suspensions": []}]
    _print_summary(Console(file=buf, width=200, color_system=None), rows)
    out = buf.getvalue()
    assert "last reply: 451 4.3.0 Temporary failure" in out and "(5)" in out
    assert "\x1b" not in out
