"""The sink's SMTP state machine, driven by a raw socket client on loopback.

Raw bytes so that pipelining, odd splits, and bad input are exactly what the
test says; every test runs under asyncio's loop and uvloop.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from test_sink_support import RawClient, captures, read_capture, sink, stuff, wait_for

EHLO = b"EHLO client.example\r\n"


async def _ehlo(c: RawClient) -> None:
    r = await c.cmd(EHLO.strip())
    assert r.code == 250


def test_ehlo_advertises_every_extension(run) -> None:
    async def main() -> None:
        async with sink(max_message_size=123456) as (_, [addr]):
            c = await RawClient.connect(addr)
            r = await c.cmd(b"EHLO client.example")
            assert r.code == 250
            keywords = {line.split()[0] for line in r.lines[1:]}
            assert keywords == {
                "PIPELINING", "SIZE", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "CHUNKING", "STARTTLS",
            }  # fmt: skip
            assert "SIZE 123456" in r.lines
            helo = await c.cmd(b"HELO client.example")
            assert helo.code == 250 and len(helo.lines) == 1
            assert (await c.cmd(b"QUIT")).code == 221
            assert await c.closed_by_server()

    run(main())


def test_pipelined_group_answered_in_order_and_arrives_in_one_read(run) -> None:
    async def main() -> None:
        async with sink(trace=True) as (server, [addr]):
            c = await RawClient.connect(addr)
            await _ehlo(c)
            group = (
                b"MAIL FROM:<a@example.com>\r\n"
                b"RCPT TO:<one@example.org>\r\n"
                b"RCPT TO:<not an address>\r\n"
                b"RCPT TO:<two@example.org>\r\n"
                b"DATA\r\n"
            )
            await c.send(group)  # one sendall: one segment on loopback
            replies = await c.replies(5)
            assert [r.code for r in replies] == [250, 250, 501, 250, 354]
            assert replies[2].enhanced == "5.1.3"
            await c.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
            assert (await c.replies(1))[0].code == 250
            await c.close()
            await wait_for(lambda: server.stats.active_connections == 0)
        trace = server.traces[0]
        # From the server side: the whole envelope and DATA came in one read.
        group_reads = [i for i, cmds in enumerate(trace.commands) if "MAIL" in cmds]
        assert len(group_reads) == 1
        assert trace.commands[group_reads[0]] == ["MAIL", "RCPT", "RCPT", "RCPT", "DATA"]
        assert trace.reads[group_reads[0]] == group
        assert server.stats.messages == 1 and server.stats.recipients == 2

    run(main())


def test_bad_syntax_gets_5xx_and_session_goes_on(run) -> None:
    cases = [
        (b"MAIL FROM:<a@example.com>", 503),  # before EHLO
        (b"EHLO", 501),  # no host name
        (b"FROB", 500),
        (b"MAILX FROM:<a@example.com>", 500),
    ]

    async def main() -> None:
        async with sink(max_errors=100) as (server, [addr]):
            c = await RawClient.connect(addr)
            for line, code in cases:
                assert (await c.cmd(line)).code == code, line
            await _ehlo(c)
            for line, code in [
                (b"RCPT TO:<b@example.com>", 503),
                (b"DATA", 503),
                (b"MAIL FROM:a@example.com", 501),
                (b"MAIL FROM <a@example.com>", 501),
                (b"MAIL FROM:<a@@example.com>", 501),
                (b"MAIL FROM:<a@example.com>junk", 501),
                (b"MAIL FROM:<a@example.com> FROB=1", 555),
                (b"MAIL FROM:<a@example.com> SIZE=abc", 501),
                (b"MAIL FROM:<a@example.com> BODY=BINARYMIME", 501),
                (b"MAIL FROM:<a@example.com>", 250),
                (b"MAIL FROM:<a@example.com>", 503),  # nested
                (b"DATA", 554),  # no valid recipients
                (b"RCPT TO:b@example.com", 501),
                (b"RCPT TO:<b@example.com> NOTIFY=NEVER", 555),
                (b"RCPT TO:<postmaster>", 250),
                (b"DATA extra", 501),
                (b"RSET", 250),
                (b"RCPT TO:<b@example.com>", 503),  # RSET ended the transaction
                (b"VRFY someone", 252),
                (b"EXPN list", 502),
                (b"NOOP", 250),
            ]:
                r = await c.cmd(line)
                assert r.code == code, (line, r)
            await c.close()
        assert server.stats.transactions == 1
        assert server.stats.messages == 0

    run(main())


def test_cr_and_nul_cannot_inject_commands(run) -> None:
    async def main() -> None:
        async with sink() as (server, [addr]):
            c = await RawClient.connect(addr)
            await _ehlo(c)
            # A bare CR is not a line end: this is one bad line, not two commands.
            r = await c.cmd(b"MAIL FROM:<a@example.com>\rRCPT TO:<b@example.com>")
            assert r.code == 500 and r.enhanced == "5.5.2"
            r = await c.cmd(b"MAIL FROM:<a\x00@example.com>")
            assert r.code == 500
            assert (await c.cmd(b"RCPT TO:<b@example.com>")).code == 503
            await c.close()
        assert server.stats.transactions == 0 and server.stats.recipients == 0

    run(main())


def test_command_line_too_long(run) -> None:
    async def main() -> None:
        async with sink(max_line_length=600) as (_, [addr]):
            c = await RawClient.connect(addr)
            await _ehlo(c)
            r = await c.cmd(b"NOOP " + b"x" * 700)
            assert (r.code, r.enhanced) == (500, "5.5.2")
            # Longer than a read, never terminated for a while: refused once,
            # the rest of the line skipped, the session still usable.
            await c.send(b"NOOP " + b"y" * 5000)
            r = (await c.replies(1))[0]
            assert r.code == 500
            await c.send(b"y" * 100 + b"\r\n")
            assert (await c.cmd(b"NOOP")).code == 250
            ok = await c.cmd(b"MAIL FROM:<" + b"a" * 64 + b"@example.com>")
            assert ok.code == 250
            await c.close()

    run(main())


def test_too_many_recipients(run, tmp_path: Path) -> None:
    async def main() -> None:
        async with sink(max_recipients=3, capture_dir=tmp_path) as (server, [addr]):
            c = await RawClient.connect(addr)
            await _ehlo(c)
            await c.send(b"MAIL FROM:<a@example.com>\r\n" + b"".join(b"RCPT TO:<r%d@example.com>\r\n" % i for i in range(5)))
            replies = await c.replies(6)
            assert [r.code for r in replies] == [250, 250, 250, 250, 452, 452]
            assert replies[4].enhanced == "4.5.3"
            assert (await c.cmd(b"DATA")).code == 354
            await c.send(b"hi\r\n.\r\n")
            assert (await c.replies(1))[0].code == 250
            await c.close()
        [path] = captures(tmp_path)
        assert read_capture(path)[1] == ["r0@example.com", "r1@example.com", "r2@example.com"]
        assert server.stats.recipients == 3

    run(main())


def test_message_too_large_by_size_and_by_content(run, tmp_path: Path) -> None:
    async def main() -> None:
        async with sink(max_message_size=1000, capture_dir=tmp_path) as (server, [addr]):
            c = await RawClient.connect(addr)
            await _ehlo(c)
            r = await c.cmd(b"MAIL FROM:<a@example.com> SIZE=1001")
            assert (r.code, r.enhanced) == (552, "5.3.4")
            assert (await c.cmd(b"MAIL FROM:<a@example.com> SIZE=500")).code == 250
            assert (await c.cmd(b"RCPT TO:<b@example.com>")).code == 250
            assert (await c.cmd(b"DATA")).code == 354
            await c.send(b"x" * 998 + b"\r\n" + b"y" * 4000 + b"\r\n.\r\n")
            r = (await c.replies(1))[0]
            assert (r.code, r.enhanced) == (552, "5.3.4")
            # Exactly at the limit is fine, and the session was not lost.
            assert (await c.cmd(b"MAIL FROM:<a@example.com>")).code == 250
            assert (await c.cmd(b"RCPT TO:<b@example.com>")).code == 250
            assert (await c.cmd(b"DATA")).code == 354
            await c.send(b"z" * 998 + b"\r\n.\r\n")
            assert (await c.replies(1))[0].code == 250
            await c.close()
        assert server.stats.messages == 1 and server.stats.rejected_messages == 1
        [path] = captures(tmp_path)
        assert read_capture(path)[2] == b"z" * 998 + b"\r\n"

    run(main())


def test_dot_unstuffing_and_8bit_byte_for_byte_across_any_split(run, tmp_path: Path) -> None:
    content = (
        b"Subject: dots\r\n\r\n"
        b".\r\n..\r\n.leading dot\r\n...three\r\nend.\r\n"
        b"caf\xc3\xa9 \xff\xfe raw 8-bit\r\n"
        b"\r\n.\r\n"  # an empty line then a lone dot as content, stuffed on the wire
        b"last line"
    )
    wire = stuff(content)
    expected = content + b"\r\n"  # the sender adds the CRLF before the final dot

    async def main() -> None:
        async with sink(capture_dir=tmp_path) as (server, [addr]):
            c = await RawClient.connect(addr)
            await _ehlo(c)
            # Split the content at every offset near the end and a few others,
            # so the terminator straddles reads in every possible way.
            splits = sorted({1, 2, 3, 20, *range(len(wire) - 8, len(wire))})
            for cut in splits:
                await c.send(b"MAIL FROM:<a@example.com> BODY=8BITMIME\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
                assert [r.code for r in await c.replies(3)] == [250, 250, 354]
                await c.send(wire[:cut])
                await asyncio.sleep(0.002)
                await c.send(wire[cut:])
                r = (await c.replies(1))[0]
                assert r.code == 250, cut
            await c.close()
            assert server.stats.messages == len(splits)
        files = captures(tmp_path)
        assert len(files) == len(splits)
        for path in files:
            sender, rcpts, got = read_capture(path)
            assert (sender, rcpts) == ("a@example.com", ["b@example.com"])
            assert got == expected

    run(main())


def test_empty_message_and_byte_by_byte_terminator(run, tmp_path: Path) -> None:
    async def main() -> None:
        async with sink(capture_dir=tmp_path) as (server, [addr]):
            c = await RawClient.connect(addr)
            await _ehlo(c)
            await c.send(b"MAIL FROM:<>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
            assert [r.code for r in await c.replies(3)] == [250, 250, 354]
            await c.send(b".\r\n")
            assert (await c.replies(1))[0].code == 250
            await c.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
            assert [r.code for r in await c.replies(3)] == [250, 250, 354]
            for byte in b"x\r\n.\r\n":
                await c.send(bytes([byte]))
                await asyncio.sleep(0.001)
            assert (await c.replies(1))[0].code == 250
            await c.close()
        first, second = captures(tmp_path)
        assert read_capture(first) == ("<>", ["b@example.com"], b"")
        assert read_capture(second)[2] == b"x\r\n"
        assert server.stats.bytes == 3

    run(main())


def test_bare_lf_dot_does_not_end_the_message(run, tmp_path: Path) -> None:
    """SMTP smuggling: only CRLF.CRLF ends DATA, so a hidden second message stays content."""
    smuggled = b"Subject: one\r\n\r\nhi\n.\nMAIL FROM:<evil@example.com>\nRCPT TO:<victim@example.com>\nDATA\n"

    async def main() -> None:
        async with sink(capture_dir=tmp_path) as (server, [addr]):
            c = await RawClient.connect(addr)
            await _ehlo(c)
            await c.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
            assert [r.code for r in await c.replies(3)] == [250, 250, 354]
            await c.send(smuggled + b"\r\n.\r\n")
            assert (await c.replies(1))[0].code == 250
            await c.close()
        assert server.stats.transactions == 1 and server.stats.messages == 1
        [path] = captures(tmp_path)
        assert read_capture(path)[2] == smuggled + b"\r\n"

    run(main())


def test_bdat_chunks_pipelined_and_captured_verbatim(run, tmp_path: Path) -> None:
    part1 = b"Subject: bdat\r\n\r\n.line with dot\r\n"
    part2 = b"\r\n.\r\nnot a terminator in BDAT\r\n\xe2\x82\xac\r\n"

    async def main() -> None:
        async with sink(capture_dir=tmp_path) as (server, [addr]):
            c = await RawClient.connect(addr)
            await _ehlo(c)
            await c.send(
                b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n"
                + b"BDAT %d\r\n" % len(part1) + part1
                + b"BDAT %d LAST\r\n" % len(part2) + part2
                + b"NOOP\r\n"
            )  # fmt: skip
            replies = await c.replies(5)
            assert [r.code for r in replies] == [250, 250, 250, 250, 250]
            assert str(len(part1)) in replies[2].text
            # BDAT outside a transaction: the chunk is still read, then refused.
            await c.send(b"BDAT 6 LAST\r\nQUIT\r\nNOOP\r\n")
            r = await c.replies(2)
            assert [x.code for x in r] == [503, 250]
            # DATA after BDAT in one transaction is a sequence error; BDAT 0 LAST ends it.
            await c.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nBDAT 3\r\nabcDATA\r\nBDAT 0 LAST\r\n")
            assert [x.code for x in await c.replies(5)] == [250, 250, 250, 503, 250]
            assert (await c.cmd(b"BDAT x")).code == 501
            await c.close()
        first, second = captures(tmp_path)
        assert read_capture(first)[2] == part1 + part2
        assert read_capture(second)[2] == b"abc"
        assert server.stats.messages == 2

    run(main())


def test_too_many_errors_disconnects(run) -> None:
    async def main() -> None:
        async with sink(max_errors=3) as (_, [addr]):
            c = await RawClient.connect(addr)
            await c.send(b"FROB\r\nFROB\r\nFROB\r\nNOOP\r\n")
            replies = await c.replies(4)
            assert [r.code for r in replies] == [500, 500, 500, 421]
            assert await c.closed_by_server()

    run(main())


def test_starttls_discards_pipelined_plaintext(run) -> None:
    """RFC 3207 6: commands sent with STARTTLS before the handshake must not run."""
    import ssl

    async def main() -> None:
        async with sink() as (server, [addr]):
            assert server.certificate_pem is not None
            ctx = ssl.create_default_context(cadata=server.certificate_pem.decode())
            c = await RawClient.connect(addr)
            await _ehlo(c)
            await c.send(b"STARTTLS\r\nMAIL FROM:<evil@example.com>\r\n")
            assert (await c.replies(1))[0].code == 220
            await c.writer.start_tls(ctx, server_hostname="localhost")
            c.parser = type(c.parser)()
            r = await c.cmd(b"MAIL FROM:<a@example.com>")
            assert r.code == 503  # must EHLO again; the injected MAIL never ran
            r = await c.cmd(b"EHLO client.example")
            assert "STARTTLS" not in " ".join(r.lines)
            assert (await c.cmd(b"STARTTLS")).code == 503
            await c.close()
            await wait_for(lambda: server.stats.active_connections == 0)
        assert server.stats.transactions == 0
        assert server.stats.tls_sessions == 1

    run(main())


def test_close_says_421_to_connected_clients(run) -> None:
    async def main() -> None:
        async with sink() as (server, [addr]):
            c = await RawClient.connect(addr)
            await _ehlo(c)
            await server.close()
            r = (await c.replies(1))[0]
            assert (r.code, r.enhanced) == (421, "4.3.2")
            assert await c.closed_by_server()

    run(main())


def test_idle_connections_are_closed(run) -> None:
    async def main() -> None:
        async with sink(idle_timeout=0.2) as (server, [addr]):
            c = await RawClient.connect(addr)
            r = (await c.replies(1, timeout=3))[0]
            assert (r.code, r.enhanced) == (421, "4.4.2")
            assert await c.closed_by_server()
            await wait_for(lambda: server.stats.active_connections == 0)

    run(main())


async def _trickle(c: RawClient, data: bytes, gap: float, until: float) -> float:
    """Send *data* one byte every *gap* seconds until the server closes; return when it did."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    closed = asyncio.ensure_future(c.closed_by_server(timeout=until))
    for i in range(len(data)):
        if closed.done() or loop.time() - t0 > until:
            break
        try:
            await c.send(data[i : i + 1])
        except (ConnectionError, OSError):
            break
        await asyncio.sleep(gap)
    assert await closed, "the server never closed the trickling connection"
    return loop.time() - t0


def test_a_command_trickled_byte_by_byte_cannot_hold_a_connection(run) -> None:
    # Slowloris: a byte every 0.1 s resets nothing; only complete lines are progress.
    async def main() -> float:
        async with sink(idle_timeout=0.4) as (server, [addr]):
            c = await RawClient.connect(addr)
            elapsed = await _trickle(c, b"EHLO " + b"x" * 200 + b"\r\n", 0.1, until=5)
            await wait_for(lambda: server.stats.active_connections == 0)
            return elapsed

    assert run(main()) < 2.0


def test_message_content_trickled_cannot_hold_a_connection(run) -> None:
    async def main() -> float:
        async with sink(idle_timeout=0.4, min_data_rate=100) as (server, [addr]):
            c = await RawClient.connect(addr)
            await _ehlo(c)
            for line in (b"MAIL FROM:<a@a.test>", b"RCPT TO:<b@b.test>"):
                assert (await c.cmd(line)).code == 250
            assert (await c.cmd(b"DATA")).code == 354
            elapsed = await _trickle(c, b"Subject: slow\r\n\r\n" + b"y" * 400, 0.1, until=5)
            assert server.stats.messages == 0  # closed mid-content: nothing accepted
            return elapsed

    assert run(main()) < 2.0


def test_a_slow_but_steady_client_is_not_cut_off(run) -> None:
    # One complete command every 0.25 s for 2 s: progress in every 0.4 s period.
    async def main() -> None:
        async with sink(idle_timeout=0.4) as (server, [addr]):
            c = await RawClient.connect(addr)
            await _ehlo(c)
            for _ in range(8):
                assert (await c.cmd(b"NOOP")).code == 250
                await asyncio.sleep(0.25)
            assert (await c.cmd(b"QUIT")).code == 221
            assert server.stats.connections == 1

    run(main())


def test_plaintext_after_starttls_fails_the_handshake_and_is_never_run(run) -> None:
    async def main() -> None:
        async with sink() as (server, [addr]):
            c = await RawClient.connect(addr)
            await _ehlo(c)
            assert (await c.cmd(b"STARTTLS")).code == 220
            # No handshake: the next write is a plaintext command.
            await c.send(b"MAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.com>\r\n")
            assert await c.closed_by_server()
            await wait_for(lambda: server.stats.active_connections == 0)
        assert server.stats.transactions == 0
        assert server.stats.tls_sessions == 0

    run(main())


def test_data_line_limit_when_asked(run, tmp_path: Path) -> None:
    async def main() -> None:
        async with sink(max_data_line=1000, capture_dir=tmp_path) as (server, [addr]):
            c = await RawClient.connect(addr)
            await _ehlo(c)
            ok_line = b"a" * 998 + b"\r\n"  # exactly 1000 with CRLF
            long_line = b"b" * 999 + b"\r\n"
            for content, code in ((ok_line, 250), (b"x\r\n" + long_line + b"y\r\n", 554), (ok_line * 3, 250)):
                await c.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
                assert [r.code for r in await c.replies(3)] == [250, 250, 354]
                # Split mid-line, so the length is carried across reads.
                await c.send(content[:500])
                await asyncio.sleep(0.002)
                await c.send(content[500:] + b".\r\n")
                r = (await c.replies(1))[0]
                assert r.code == code, (len(content), r)
            # BDAT chunks are held to the same limit.
            await c.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n")
            await c.send(b"BDAT %d\r\n" % 600 + long_line[:600] + b"BDAT %d LAST\r\n" % 401 + long_line[600:])
            replies = await c.replies(4)
            assert [r.code for r in replies] == [250, 250, 250, 554]
            assert replies[3].enhanced == "5.6.0"
            await c.close()
        assert server.stats.messages == 2 and server.stats.rejected_messages == 2
        assert len(captures(tmp_path)) == 2

    run(main())


def _noise(rng: random.Random) -> bytes:
    """A random mix of valid commands, message content and garbage."""
    parts: list[bytes] = []
    for _ in range(150):
        k = rng.randrange(12)
        if k == 0:
            parts.append(b"EHLO fuzz.example\r\n")
        elif k == 1:
            parts.append(b"MAIL FROM:<f%d@example.com>\r\n" % rng.randrange(5))
        elif k == 2:
            parts.append(b"RCPT TO:<r%d@example.org>\r\n" % rng.randrange(5))
        elif k == 3:
            body = bytes(rng.choice(b"ab.\r\n\x00\xff") for _ in range(rng.randrange(60)))
            parts.append(b"DATA\r\n" + body + b"\r\n.\r\n")
        elif k == 4:
            chunk = bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
            parts.append(b"BDAT %d%s\r\n" % (len(chunk), b" LAST" if rng.random() < 0.5 else b"") + chunk)
        elif k == 5:
            parts.append(rng.choice([b"RSET\r\n", b"NOOP\r\n", b"VRFY x\r\n", b"HELP\r\n"]))
        elif k == 6:
            parts.append(b"X" * rng.randrange(100, 5000) + b"\r\n")
        else:
            parts.append(bytes(rng.choice(b"MAILRCPTDATA<>:@ \r\n\x00\x7f\xc3") for _ in range(rng.randrange(30))))
    return b"".join(parts)


def test_random_input_never_breaks_the_server(run) -> None:
    async def main() -> None:
        loop_errors: list[dict[str, object]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: loop_errors.append(ctx))
        async with sink(max_errors=10_000, max_line_length=1024) as (server, [addr]):
            for seed in range(4):
                rng = random.Random(seed)
                stream = _noise(rng) + b"\r\n.\r\nQUIT\r\n"
                c = await RawClient.connect(addr)
                pos = 0
                while pos < len(stream):  # bounded: every step advances
                    step = rng.randrange(1, 700)
                    await c.send(stream[pos : pos + step])
                    pos += step
                assert await c.closed_by_server(timeout=10)
                # Whatever happened before, the session ended on our QUIT.
                assert c.pending and c.pending[-1].code == 221, (seed, c.pending[-5:])
            await wait_for(lambda: server.stats.active_connections == 0)
            # And the server still serves a normal client afterwards.
            c = await RawClient.connect(addr)
            assert (await c.cmd(b"EHLO after.example")).code == 250
            await c.close()
        assert loop_errors == []

    run(main())


def test_message_end_and_next_envelope_in_one_read(run, tmp_path: Path) -> None:
    """A reused connection: content, its dot and the next envelope in one write."""

    async def main() -> None:
        async with sink(trace=True, capture_dir=tmp_path) as (server, [addr]):
            c = await RawClient.connect(addr)
            await _ehlo(c)
            envelope = b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
            await c.send(envelope)
            assert [r.code for r in await c.replies(3)] == [250, 250, 354]
            joined = b"first\r\n.\r\n" + envelope
            await c.send(joined)
            assert [r.code for r in await c.replies(4)] == [250, 250, 250, 354]
            await c.send(b"second\r\n.\r\nQUIT\r\n")
            assert [r.code for r in await c.replies(2)] == [250, 221]
            assert await c.closed_by_server()
        trace = server.traces[0]
        i = trace.reads.index(joined)
        assert trace.commands[i] == ["MAIL", "RCPT", "DATA"]
        contents = [p.read_bytes().split(b"\r\n", 2)[2] for p in captures(tmp_path)]
        assert contents == [b"first\r\n", b"second\r\n"]

    run(main())


def test_capture_memory_is_bounded_and_overflow_is_retried_not_lost(run, tmp_path: Path) -> None:
    # Three clients stream 600 KB each into a 1 MB capture budget, unterminated;
    # the sink holds at most the budget, and refuses what it could not keep with
    # a 4xx (the client retries), never a 250 for a message it did not write.
    async def main() -> None:
        cap = tmp_path / "cap"
        async with sink(capture_dir=cap, capture_memory=1_000_000) as (server, [addr]):
            clients = []
            for i in range(3):
                c = await RawClient.connect(addr)
                await _ehlo(c)
                for line in (f"MAIL FROM:<a{i}@a.test>".encode(), b"RCPT TO:<b@b.test>"):
                    assert (await c.cmd(line)).code == 250
                assert (await c.cmd(b"DATA")).code == 354
                await c.send(b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 600)
                clients.append(c)
            await asyncio.sleep(0.3)
            assert server.capture is not None and server.capture.held <= 1_000_000
            codes = []
            for c in clients:
                await c.send(b".\r\n")
                codes.append((await c.replies(1))[0].code)
            assert sorted(codes) == [250, 452, 452] or sorted(codes) == [250, 250, 452], codes
            assert len(list(cap.glob("*.eml"))) == codes.count(250)
            for c in clients:
                await c.close()
            await wait_for(lambda: server.stats.active_connections == 0)
            assert server.capture.held == 0  # every reservation given back

    run(main())


def test_a_full_capture_disk_is_a_4xx_and_leaves_no_temporary_files(run_uvloop, small_fs) -> None:
    cap = small_fs(256 * 1024)

    async def main() -> None:
        async with sink(capture_dir=cap) as (server, [addr]):
            c = await RawClient.connect(addr)
            await _ehlo(c)
            codes = []
            for _ in range(4):  # 4 x 100 KB into 256 KB
                for line in (b"MAIL FROM:<a@a.test>", b"RCPT TO:<b@b.test>"):
                    assert (await c.cmd(line)).code == 250
                assert (await c.cmd(b"DATA")).code == 354
                await c.send(b"Subject: s\r\n\r\n" + (b"y" * 998 + b"\r\n") * 100 + b".\r\n")
                codes.append((await c.replies(1))[0])
            assert [r.code for r in codes[:2]] == [250, 250]
            assert codes[-1].code == 451 and codes[-1].enhanced == "4.3.0"
            assert (await c.cmd(b"NOOP")).code == 250  # the session goes on
            assert len(list(cap.glob("*.eml"))) == sum(r.code == 250 for r in codes)
            assert list(cap.glob(".*.tmp")) == []
            assert server.stats.rejected_messages == sum(r.code != 250 for r in codes)

    run_uvloop(main())
