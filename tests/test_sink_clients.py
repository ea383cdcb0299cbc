"""The sink driven by clients nobody here wrote: aiosmtplib and Postfix's smtp-source."""

from __future__ import annotations

import asyncio
import ssl
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import SMTPUTF8 as POLICY_UTF8
from pathlib import Path

import aiosmtplib
import pytest

from servers import find_postfix_tool
from test_sink_support import captures, read_capture, sink, wait_for


def test_aiosmtplib_sendmail_bytes_captured_byte_for_byte(run, tmp_path: Path) -> None:
    # Lines starting with a dot, a lone dot, 8-bit bytes: aiosmtplib stuffs
    # them on the wire; the capture must hold the original exactly.
    raw = (
        b"From: a@example.com\r\nTo: b@example.org, c@example.org\r\nSubject: dots\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\n"
        b".\r\n..two\r\n.one\r\nGr\xc3\xbc\xc3\x9fe \xe2\x82\xac\r\n\r\nlast\r\n"
    )

    async def main() -> None:
        async with sink(capture_dir=tmp_path) as (server, [(host, port)]):
            async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=10) as smtp:
                errors, reply = await smtp.sendmail(
                    "a@example.com", ["b@example.org", "c@example.org"], raw, mail_options=["BODY=8BITMIME"]
                )
                assert errors == {}
                assert reply.startswith("2.0.0 Ok: queued as ")
            await wait_for(lambda: server.stats.active_connections == 0)
            assert server.stats.messages == 1 and server.stats.recipients == 2
        [path] = captures(tmp_path)
        sender, rcpts, content = read_capture(path)
        assert sender == "a@example.com"
        assert rcpts == ["b@example.org", "c@example.org"]
        assert content == raw

    run(main())


def test_aiosmtplib_send_message_several_messages_one_connection(run, tmp_path: Path) -> None:
    async def main() -> None:
        async with sink(capture_dir=tmp_path) as (server, [(host, port)]):
            async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=10) as smtp:
                for i in range(3):
                    msg = EmailMessage()
                    msg["From"] = "sender@example.com"
                    msg["To"] = ", ".join(f"r{i}{j}@example.net" for j in range(i + 1))
                    msg["Subject"] = f"message {i}"
                    msg.set_content(f"body {i}\n.dot line\n")
                    errors, _ = await smtp.send_message(msg)
                    assert errors == {}
            await wait_for(lambda: server.stats.active_connections == 0)
        assert server.stats.connections == 1
        assert server.stats.messages == 3 and server.stats.recipients == 1 + 2 + 3
        files = captures(tmp_path)
        assert len(files) == 3
        for i, path in enumerate(files):
            _, rcpts, content = read_capture(path)
            assert rcpts == [f"r{i}{j}@example.net" for j in range(i + 1)]
            parsed = BytesParser().parsebytes(content)
            assert parsed["Subject"] == f"message {i}"
            assert parsed.get_payload() == f"body {i}\n.dot line\n".replace("\n", "\r\n")

    run(main())


def test_aiosmtplib_starttls_trusting_the_generated_certificate(run, tmp_path: Path) -> None:
    async def main() -> None:
        async with sink(capture_dir=tmp_path) as (server, [(_, port)]):
            assert server.certificate_pem is not None
            # Trust exactly this certificate; verification stays on.
            ctx = ssl.create_default_context(cadata=server.certificate_pem.decode())
            async with aiosmtplib.SMTP(
                hostname="localhost", port=port, start_tls=True, tls_context=ctx, timeout=10
            ) as smtp:
                assert not smtp.supports_extension("starttls")  # not offered twice
                errors, _ = await smtp.sendmail("a@example.com", ["b@example.org"], b"Subject: tls\r\n\r\nsecret\r\n")
                assert errors == {}
            await wait_for(lambda: server.stats.active_connections == 0)
        assert server.stats.tls_sessions == 1
        [path] = captures(tmp_path)
        assert read_capture(path)[2] == b"Subject: tls\r\n\r\nsecret\r\n"

    run(main())


def test_aiosmtplib_rejects_the_certificate_when_not_trusted(run) -> None:
    """The generated certificate is self-signed: a verifying client must refuse it."""

    async def main() -> None:
        async with sink() as (_, [(_, port)]):
            smtp = aiosmtplib.SMTP(hostname="localhost", port=port, start_tls=True, timeout=10)
            with pytest.raises((ssl.SSLError, aiosmtplib.SMTPConnectError)) as info:
                await smtp.connect()
            text = f"{info.value} {info.value.__cause__}"
            assert "CERTIFICATE_VERIFY_FAILED" in text, text
            smtp.close()

    run(main())


def test_aiosmtplib_smtputf8_addresses(run, tmp_path: Path) -> None:
    async def main() -> None:
        async with sink(capture_dir=tmp_path) as (server, [(host, port)]):
            msg = EmailMessage(policy=POLICY_UTF8)
            msg["From"] = "jörg@bücher.example"
            msg["To"] = "зоя@пример.example"
            msg["Subject"] = "grüße"
            msg.set_content("héllo\n")
            async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=10) as smtp:
                errors, _ = await smtp.send_message(msg)
                assert errors == {}
                # Without SMTPUTF8 the same address is refused with 553 5.6.7.
                with pytest.raises(aiosmtplib.SMTPSenderRefused) as info:
                    await smtp.mail("jörg@bücher.example", encoding="utf-8")
                assert info.value.code == 553
            await wait_for(lambda: server.stats.active_connections == 0)
        [path] = captures(tmp_path)
        sender, rcpts, content = read_capture(path)
        assert (sender, rcpts) == ("jörg@bücher.example", ["зоя@пример.example"])
        parsed = BytesParser(policy=POLICY_UTF8).parsebytes(content)
        assert parsed["Subject"] == "grüße"

    run(main())


def test_smtp_source_drives_the_sink(run) -> None:
    smtp_source = find_postfix_tool("smtp-source")

    async def main() -> None:
        async with sink() as (server, [(host, port)]):
            # 5 sessions in parallel, 300 messages of 2 KB, 2 recipients each;
            # -d: several messages per connection, as a real relay would.
            proc = await asyncio.create_subprocess_exec(
                smtp_source, "-s", "5", "-m", "300", "-l", "2048", "-r", "2", "-d", f"{host}:{port}",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            _, err = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 0, err.decode()
            await wait_for(lambda: server.stats.active_connections == 0)
            # Without -d: one connection per message.
            proc = await asyncio.create_subprocess_exec(
                smtp_source, "-s", "4", "-m", "40", "-l", "100", f"{host}:{port}",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            _, err = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 0, err.decode()
            await wait_for(lambda: server.stats.active_connections == 0)
        stats = server.stats_dict()
        assert stats["messages"] == 340
        assert stats["recipients"] == 300 * 2 + 40
        assert stats["transactions"] == 340
        assert stats["connections"] == 5 + 40  # -s 5 with -d, then one per message
        assert 1 < stats["max_concurrent_connections"] <= 5
        assert stats["replies"].get("354") == 340
        assert not any(code.startswith(("4", "5")) for code in stats["replies"])
        assert stats["per_ip"]["127.0.0.1"]["messages"] == 340
        # smtp-source's messages are a little over the requested length each.
        assert stats["bytes"] >= 300 * 2048

    run(main())
