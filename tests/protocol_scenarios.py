"""Random client-protocol sessions, recorded as traces, for the twin comparison.

``python tests/protocol_scenarios.py FIRST COUNT`` runs the sessions seeded
FIRST .. FIRST+COUNT-1 against ``fastmta.smtp.protocol.ClientProtocol`` and prints
their traces as JSON: after every step, the bytes to send, the events, any
error and the session's public state. tests/test_client_twins.py runs it
twice, once with the compiled core and once with FASTMTA_NO_EXTENSIONS=1, and
the traces must be identical. A separate process per run, because the core is
chosen when fastmta.smtp.protocol is imported.

Server replies are drawn at random rather than made to fit the commands: the
state machine must handle any reply to anything (including replies nobody
asked for), and random ones reach odd corners (354 to RCPT, 250 to DATA,
421 in the middle of a pipelined group) that a well-behaved server never
would.
"""

from __future__ import annotations

import json
import random
import sys
from typing import Any

from fastmta.errors import FastMTAError
from fastmta.smtp.protocol import (
    Body,
    ClientProtocol,
    Closed,
    Event,
    Phase,
    Ready,
    SessionFailed,
    StartTLS,
    TLSPolicy,
    Transaction,
    TransactionDone,
)
from fastmta.smtp.reply import Reply

BODIES = [
    Body(b"Subject: a\r\n\r\nhello\r\n"),
    Body(b"Subject: b\r\n\r\n.dot\r\ncaf\xc3\xa9 8-bit\r\n"),
    Body(b"Subject: c\r\n\r\n" + b"x" * 300 + b"\r\n"),
]
CODES = [250] * 10 + [354] * 4 + [220, 221, 251, 421, 450, 451, 452, 500, 502, 530, 550, 552, 553, 554]
KEYWORDS = ["PIPELINING", "8BITMIME", "SMTPUTF8", "CHUNKING", "STARTTLS", "ENHANCEDSTATUSCODES"]


def _reply_bytes(rng: random.Random, code: int) -> bytes:
    if rng.random() < 0.15:
        return b"%d-first line\r\n%d 2.0.0 last line\r\n" % (code, code)
    return b"%d %d.1.0 text %d\r\n" % (code, code // 100, rng.randrange(100))


def _ehlo(rng: random.Random) -> bytes:
    if rng.random() < 0.1:
        return b"502 5.5.1 EHLO not understood\r\n"
    lines = ["mx.test hello"] + [k for k in KEYWORDS if rng.random() < 0.6]
    size = rng.choice([None, "", " 0", " 200", " 100000", " 99999999999999999999", " -5", " x"])
    if size is not None:
        lines.append("SIZE" + size)
    return b"".join(b"250%s%s\r\n" % (b" " if i == len(lines) - 1 else b"-", line.encode()) for i, line in enumerate(lines))


GOOD = {Phase.GREETING: 220, Phase.STARTTLS: 220, Phase.DATA: 354, Phase.QUIT: 221}


def _answers(rng: random.Random, p: ClientProtocol) -> bytes:
    """Replies to some of what the session awaits: mostly the expected code, sometimes anything.

    Reads the awaited phases from ``_expect``, which both twins keep, so the
    sessions get deep (deliveries, RSET, QUIT) instead of mostly ending on an
    unsolicited reply; one time in twenty a reply too many is added.
    """
    awaited = [phase for phase, _, _ in p._expect]
    n = rng.randrange(1, len(awaited) + 1) if awaited else 0
    if rng.random() < 0.05 or not n:
        n += 1
    codes = [
        GOOD.get(awaited[i], 250) if i < len(awaited) and rng.random() < 0.85 else rng.choice(CODES)
        for i in range(n)
    ]
    return b"".join(_reply_bytes(rng, code) for code in codes)


def _reply(r: Reply | None) -> Any:
    return None if r is None else [r.code, list(r.lines), r.enhanced]


def _event(e: Event) -> Any:
    if isinstance(e, TransactionDone):
        r = e.result
        return ["done", r.transaction.tag, _reply(r.mail_reply), [_reply(x) for x in r.rcpt_replies],
                _reply(r.data_reply), _reply(r.final_reply), _reply(r.error),
                r.error_phase.value if r.error_phase else None]
    if isinstance(e, Ready):
        return ["ready", sorted(e.extensions.keywords.items()), e.extensions.size, _reply(e.ehlo_reply)]
    if isinstance(e, SessionFailed):
        return ["failed", _reply(e.reply), e.phase.value]
    if isinstance(e, Closed):
        return ["closed", _reply(e.reply)]
    if isinstance(e, StartTLS):
        return ["starttls"]
    raise AssertionError(f"unknown event {e!r}")


def _state(p: ClientProtocol) -> Any:
    waiting = p.waiting_for
    return [waiting.value if isinstance(waiting, Phase) else None, p.in_flight, p.is_ready, p.is_closed, p.pipelining,
            p.accepts_transactions]


def run_session(seed: int) -> list[Any]:
    rng = random.Random(seed)
    p = ClientProtocol(
        "client.test",
        pipelining=rng.random() < 0.8,
        use_bdat=rng.random() < 0.5,
        tls=rng.choice([TLSPolicy.NEVER, TLSPolicy.NEVER, TLSPolicy.OPPORTUNISTIC, TLSPolicy.REQUIRED]),
    )
    trace: list[Any] = []
    steps: list[tuple[str, Any]] = [("feed", b"220 mx.test ESMTP\r\n" if rng.random() < 0.95 else b"554 go away\r\n"),
                                    ("feed", _ehlo(rng))]
    tag = 0
    for _ in range(rng.randrange(1, 40)):
        x = rng.random()
        if x < 0.3:
            tag += 1
            rcpts = [rng.choice(["a@x.test", "b@y.test", "\u00fc@z.test"]) for _ in range(rng.randrange(1, 4))]
            sender = "s@a.test" if rng.random() < 0.9 else "\u00e9@a.test"
            steps.append(("start", (sender, rcpts, rng.randrange(len(BODIES)), tag)))
        elif x < 0.9:
            steps.append(("answer", None))
        elif x < 0.95:
            steps.append(("quit", None))
        elif x < 0.97:
            steps.append(("tls", None))
        else:
            steps.append(("abort", None))
    for kind, arg in steps:
        events: list[Event] = []
        error = None
        if kind == "answer":
            kind, arg = "feed", _answers(rng, p)
        try:
            if kind == "feed":
                events = p.receive_data(arg)
            elif kind == "start":
                sender, rcpts, body, t = arg
                events = p.start_transaction(Transaction(sender, rcpts, BODIES[body], t))
            elif kind == "quit":
                events = p.quit()
            elif kind == "tls":
                events = p.tls_established()
            else:
                events = p.abort(Reply.local(451, "4.4.2", "connection lost"))
        except FastMTAError as exc:
            error = [type(exc).__name__, str(exc)]
        trace.append([kind, [_event(e) for e in events], error, p.data_to_send().decode("latin-1"), _state(p)])
        if error is not None and kind == "feed":
            break  # a protocol error ends the connection
    return trace


def main() -> None:
    first, count = int(sys.argv[1]), int(sys.argv[2])
    json.dump([run_session(seed) for seed in range(first, first + count)], sys.stdout)


if __name__ == "__main__":
    main()
