"""The accounting log: JSONL unchanged, CSV with PowerMTA-like columns, rotation, batching."""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from fastmta.delivery.accounting import CSV_COLUMNS, AccountingLog, detect_format
from fastmta.queue.records import Outcome, Status
from fastmta.smtp.reply import Reply

T0 = 1_700_000_000.25

JSONL_KEYS = ["time", "message_id", "recipient", "status", "code", "enhanced", "text", "attempts",
              "queued_at", "time_in_queue", "sender", "size", "category", "bounce_type", "site", "mx_host", "mx_ip", "source_ip"]


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def outcome(i: int, status: Status = Status.DELIVERED, reply: Reply | None = None,
            meta: dict[str, Any] | None = None, **kw: Any) -> Outcome:
    if reply is None:
        reply = {
            Status.DELIVERED: Reply(250, ("2.0.0 Ok: queued as X1",), "2.0.0"),
            Status.BOUNCED: Reply(550, ("5.1.1 <u@example.com>: user unknown",), "5.1.1"),
            Status.DEFERRED: Reply(451, ("4.7.1 greylisted, try later",), "4.7.1"),
            Status.EXPIRED: Reply(451, ("4.4.7 queue lifetime exceeded",), "4.4.7"),
        }[status]
    fields: dict[str, Any] = {
        "site": "example.com", "mx_host": "mx1.example.com", "mx_ip": "192.0.2.7", "source_ip": "198.51.100.1",
        "meta": {"job": "spring", "file": "list.csv"} if meta is None else meta,
        "category": None if status is Status.DELIVERED else "invalid_recipient",
        "bounce": None if status is Status.DELIVERED else "hard",
    }
    if status is Status.DEFERRED:
        fields["next_attempt"] = T0 + i + 300
    fields.update(kw)
    return Outcome(f"m{i:05d}", f"user{i}@example.com", status, reply, 1 + i % 3, T0 - 60, T0 + i, **fields)


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def all_files(log: AccountingLog) -> list[Path]:
    return [*log.rotated, log.path]


def parse_time(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


# --- JSON Lines ---------------------------------------------------------------------


def test_jsonl_records_unchanged(tmp_path: Path) -> None:
    outs = [outcome(0), outcome(1, Status.BOUNCED), outcome(2, Status.DEFERRED), outcome(3, Status.EXPIRED)]
    log = AccountingLog(tmp_path / "acct.jsonl", batch_lines=2)
    assert log.format == "jsonl"
    for o in outs:
        log.write(o)
    log.close()
    lines = (tmp_path / "acct.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [json.loads(json.dumps(o.as_record())) for o in outs]
    first = json.loads(lines[0])
    assert list(first)[:len(JSONL_KEYS)] == JSONL_KEYS
    assert first["job"] == "spring" and first["file"] == "list.csv"
    assert "next_attempt" in json.loads(lines[2]) and "next_attempt" not in first
    assert log.lines == 4


@pytest.mark.parametrize("meta", [
    None, {}, {"job": "spring"},
    # Meta keys named like record fields: a field that is set wins, one that is unset lets the meta value through.
    {"status": "forged", "next_attempt": 1.0, "bounce_reason": "m", "x": [1, {"y": None}], "text": "t"},
    {"source": "meta-source", "tls_version": "m", "tls_cipher": "c", "site": "s"},
])
@pytest.mark.parametrize("status", list(Status))
def test_jsonl_lines_are_as_record_byte_for_byte(meta: dict[str, Any] | None, status: Status) -> None:
    import msgspec

    from fastmta.delivery.accounting import jsonl_line

    encoder = msgspec.json.Encoder()
    reply = Reply(554, ("no enhanced code", "second line"), None)
    for o in (outcome(7, status, reply, meta=meta), outcome(8, status, reply, meta=meta, reason="suspected_filter",
                                                           sender="", size=None, site=None, next_attempt=T0 + 0.12345),
              outcome(9, status, reply, meta=meta, source="ip2", tls_version="TLSv1.3",
                      tls_cipher="TLS_AES_256_GCM_SHA384")):
        o.meta = meta  # the helper puts a default meta in place of None
        assert jsonl_line(o, encoder) == encoder.encode(o.as_record()) + b"\n"


def test_writes_are_batched(tmp_path: Path) -> None:
    path = tmp_path / "acct.csv"
    log = AccountingLog(path, batch_lines=3)
    header = path.read_bytes()
    log.write(outcome(0))
    log.write(outcome(1))
    assert path.read_bytes() == header  # still in memory
    log.write(outcome(2))  # batch full: written
    assert len(read_csv(path)) == 4
    log.write(outcome(3))
    log.flush()
    assert len(read_csv(path)) == 5
    log.close()
    log.close()  # idempotent


def test_format_choice(tmp_path: Path) -> None:
    assert detect_format("a/acct.CSV") == "csv"
    assert detect_format("acct.jsonl") == "jsonl"
    assert detect_format("acct") == "jsonl"
    with AccountingLog(tmp_path / "acct.log", format="csv") as log:
        log.write(outcome(0))
    assert read_csv(tmp_path / "acct.log")[0] == list(CSV_COLUMNS)
    with pytest.raises(ValueError):
        AccountingLog(tmp_path / "x", format="xml")  # type: ignore[arg-type]


# --- CSV ----------------------------------------------------------------------------


def test_csv_header_and_rows_match_outcomes(tmp_path: Path) -> None:
    outs = [
        outcome(0),
        outcome(1, Status.BOUNCED),
        outcome(2, Status.DEFERRED, category="greylisted", bounce="soft"),
        outcome(3, Status.EXPIRED, category="expired", bounce="soft"),
        outcome(4, Status.BOUNCED, Reply(550, ("no such user",)), meta={}, mx_host=None, mx_ip=None,
                source_ip=None, site=None),
        outcome(5, meta={"job": "j5", "size": 12345, "sender": "bounce@example.org", "file": "a.csv", "row": 7},
                source="ip2", tls_version="TLSv1.3", tls_cipher="TLS_AES_128_GCM_SHA256"),
    ]
    path = tmp_path / "acct.csv"
    with AccountingLog(path) as log:
        for o in outs:
            log.write(o)
    rows = read_csv(path)
    assert rows[0] == list(CSV_COLUMNS)
    assert rows[0][:15] == ["type", "timeLogged", "timeQueued", "totalSecondsQueued", "orig", "rcpt",
                            "dsnAction", "dsnStatus", "dsnDiag", "dsnMta", "bounceCat", "dlvSourceIp",
                            "dlvDestinationIp", "dlvSize", "jobId"]
    records = [dict(zip(rows[0], row, strict=True)) for row in rows[1:]]
    assert len(records) == len(outs)
    for o, r in zip(outs, records, strict=True):
        assert r["rcpt"] == o.recipient
        assert r["messageId"] == o.message_id
        assert r["status"] == o.status.value
        assert abs(parse_time(r["timeLogged"]) - o.time) < 0.001
        assert abs(parse_time(r["timeQueued"]) - o.queued_at) < 0.001
        assert float(r["totalSecondsQueued"]) == pytest.approx(o.time - o.queued_at, abs=0.001)
        assert int(r["dsnCode"]) == o.reply.code
        assert r["dsnDiag"] == f"smtp;{o.reply.code} {' '.join(o.reply.lines)}"
        assert int(r["attempts"]) == o.attempts
        assert r["category"] == (o.category or "")
        assert r["bounceType"] == (o.bounce or "")
        assert r["site"] == (o.site or "")
        assert r["mxHost"] == (o.mx_host or "")
        assert r["dlvSourceIp"] == (o.source_ip or "")
        assert r["dlvDestinationIp"] == (o.mx_ip or "")
        meta = o.meta or {}
        assert r["jobId"] == meta.get("job", "")
        extra = {k: v for k, v in meta.items() if k not in ("job", "size", "sender")}
        assert (json.loads(r["meta"]) if r["meta"] else {}) == extra
        assert (r["vmta"], r["dlvTlsProtocol"], r["dlvTlsCipher"]) == (
            o.source or "", o.tls_version or "", o.tls_cipher or "")
        if o.next_attempt is None:
            assert r["timeNextAttempt"] == ""
        else:
            assert abs(parse_time(r["timeNextAttempt"]) - o.next_attempt) < 0.001

    d, b, t, x, b2, d5 = records
    assert (d["type"], d["dsnAction"], d["dsnStatus"], d["bounceCat"]) == ("d", "relayed", "2.0.0", "")
    assert d["dsnMta"] == "mx1.example.com (192.0.2.7)"
    assert (b["type"], b["dsnAction"], b["dsnStatus"], b["bounceCat"]) == ("b", "failed", "5.1.1", "bad-mailbox")
    assert (t["type"], t["dsnAction"], t["dsnStatus"], t["bounceCat"]) == ("t", "delayed", "4.7.1", "policy-related")
    # Expired: a "b" record, as PowerMTA logs it, told apart by its category and status.
    assert (x["type"], x["dsnAction"], x["bounceCat"], x["status"]) == ("b", "failed", "message-expired", "expired")
    # No enhanced code from the server: the class of the reply code; nothing known stays empty.
    assert (b2["dsnStatus"], b2["dsnMta"], b2["jobId"], b2["meta"], b2["dlvSize"]) == ("5.0.0", "", "", "", "")
    assert (d5["dlvSize"], d5["orig"], d5["jobId"]) == ("12345", "bounce@example.org", "j5")


def test_csv_unix_times(tmp_path: Path) -> None:
    with AccountingLog(tmp_path / "acct.csv", iso_times=False) as log:
        log.write(outcome(1))
    row = dict(zip(*read_csv(tmp_path / "acct.csv"), strict=True))
    assert float(row["timeLogged"]) == pytest.approx(T0 + 1, abs=0.001)
    assert float(row["timeQueued"]) == pytest.approx(T0 - 60, abs=0.001)


def test_csv_hostile_texts_stay_one_row(tmp_path: Path) -> None:
    texts = [
        'a, "quoted", text',
        "line one\r\nline two\rthree\nfour",
        '"\r\n,d,fake,row\r\n',
        "=cmd|' /C calc'!A0",
        "nul\x00 and tab\t and \x7f",
    ]
    outs = [outcome(i, Status.BOUNCED, Reply(550, (f"5.0.0 {t}", "second, line"), "5.0.0"),
                    meta={"job": t, "note": t}) for i, t in enumerate(texts)]
    path = tmp_path / "acct.csv"
    with AccountingLog(path) as log:
        for o in outs:
            log.write(o)
    raw = path.read_bytes()
    assert raw.count(b"\n") == len(outs) + 1  # one physical line per record, header included
    assert raw.count(b"\r\n") == raw.count(b"\n")
    rows = read_csv(path)
    assert len(rows) == len(outs) + 1
    assert all(len(r) == len(CSV_COLUMNS) for r in rows)
    for t, row in zip(texts, rows[1:], strict=True):
        r = dict(zip(rows[0], row, strict=True))
        clean = "".join(" " if ord(c) < 0x20 or c == "\x7f" else c for c in t)
        assert r["dsnDiag"] == f"smtp;550 5.0.0 {clean} second, line"
        assert r["jobId"] == clean
        # Inside the meta JSON, CR/LF are already escapes (no raw line break): kept as sent.
        assert json.loads(r["meta"]) == {"note": t.replace("\x7f", " ")}
        assert r["type"] == "b"


def test_what_a_terminal_would_act_on_never_reaches_the_logs_raw(tmp_path: Path) -> None:
    # Found by a fault-injection attack: a reply's DEL, C1 CSI (U+009B: an escape sequence to a terminal
    # showing the log) and right-to-left override went raw into both logs. JSON keeps them as escapes
    # (the same string read back), CSV as spaces, as it does C0 controls.
    text = "5.7.1 x\x7f y\x9b31m z\u202eevil\u2066 w\u2028 \u00e9"
    o = outcome(0, Status.BOUNCED, Reply(550, (text,), "5.7.1"), meta={"note": "a\x9bb"})
    for name in ("acct.jsonl", "acct.csv"):
        with AccountingLog(tmp_path / name) as log:
            log.write(o)
        raw = (tmp_path / name).read_bytes().decode("utf-8")
        assert not any(0x7F <= ord(c) <= 0x9F or c in "\u202e\u2066\u2028" for c in raw), (name, raw)
        assert "\u00e9" in raw  # other text as it was
    [record] = [json.loads(line) for line in (tmp_path / "acct.jsonl").read_text().splitlines()]
    assert record["text"] == text.split(" ", 1)[1] and record["note"] == "a\x9bb"


def test_csv_formula_guard(tmp_path: Path) -> None:
    with AccountingLog(tmp_path / "acct.csv", guard_formulas=True) as log:
        log.write(outcome(0, meta={"job": "=HYPERLINK(1)"}))
    row = dict(zip(*read_csv(tmp_path / "acct.csv"), strict=True))
    assert row["jobId"] == "'=HYPERLINK(1)"


# --- rotation -----------------------------------------------------------------------


def collect_csv(log: AccountingLog) -> list[str]:
    """Every file's rows, checking each starts with the header; returns the message ids."""
    ids: list[str] = []
    for f in all_files(log):
        rows = read_csv(f)
        assert rows[0] == list(CSV_COLUMNS), f
        ids += [dict(zip(rows[0], r, strict=True))["messageId"] for r in rows[1:]]
    return ids


def test_rotation_by_size_csv(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "acct.csv"
    log = AccountingLog(path, batch_lines=7, max_bytes=2000, clock=clock)
    for i in range(200):
        log.write(outcome(i, Status.DEFERRED if i % 5 == 0 else Status.DELIVERED))
        if i % 13 == 0:
            log.flush()  # flushes of every size, as the engine does
    log.close()
    assert len(log.rotated) > 5
    assert sorted(p.name for p in log.rotated) == [p.name for p in log.rotated]  # names sort in order
    assert all(p.name.startswith("acct-") and p.suffix == ".csv" for p in log.rotated)
    assert all(f.stat().st_size <= 2000 for f in all_files(log))
    assert collect_csv(log) == [f"m{i:05d}" for i in range(200)]  # each line once, in order
    assert {p.name for p in tmp_path.iterdir()} == {p.name for p in all_files(log)}


def test_rotation_by_size_jsonl_never_splits_a_line(tmp_path: Path) -> None:
    path = tmp_path / "acct.jsonl"
    log = AccountingLog(path, batch_lines=50, max_bytes=100, clock=Clock())  # smaller than one line
    for i in range(10):
        log.write(outcome(i))
    log.close()
    files = all_files(log)
    assert len(files) == 10  # one whole line per file
    recs = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert [r["message_id"] for r in recs] == [f"m{i:05d}" for i in range(10)]


def test_rotation_by_time(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "acct.csv"
    log = AccountingLog(path, batch_lines=1000, max_age=60, clock=clock)
    n = 0
    for _minute in range(5):
        for _ in range(7):
            log.write(outcome(n))
            n += 1
            clock.now += 5
        log.flush()  # 35 s: not yet
        clock.now += 30  # 65 s since the file started
        log.flush()  # rotates, even with nothing pending
    log.flush()  # nothing new since the last rotation: no empty file made
    log.close()
    assert len(log.rotated) == 5
    assert collect_csv(log) == [f"m{i:05d}" for i in range(n)]
    assert read_csv(path) == [list(CSV_COLUMNS)]
    # Each rotated file holds one period's lines and is named after its rotation time.
    stamps = [p.name.removeprefix("acct-").removesuffix(".csv") for p in log.rotated]
    expected = [datetime.fromtimestamp(T0 + 65 * k, UTC).strftime("%Y%m%dT%H%M%S") + ".250Z"
                for k in range(1, 6)]
    assert stamps == expected


def test_rotation_same_instant_never_overwrites(tmp_path: Path) -> None:
    log = AccountingLog(tmp_path / "acct.jsonl", batch_lines=1, max_bytes=10, clock=Clock())  # frozen clock
    for i in range(4):
        log.write(outcome(i))
    log.close()
    assert len({p.name for p in log.rotated}) == 3
    recs = [json.loads(line) for f in all_files(log) for line in f.read_text().splitlines()]
    assert [r["message_id"] for r in recs] == [f"m{i:05d}" for i in range(4)]


# --- reopening ----------------------------------------------------------------------


def test_reopen_appends_without_second_header(tmp_path: Path) -> None:
    path = tmp_path / "acct.csv"
    with AccountingLog(path) as log:
        log.write(outcome(0))
    with AccountingLog(path) as log:
        log.write(outcome(1))
        assert not log.rotated
    rows = read_csv(path)
    assert rows[0] == list(CSV_COLUMNS) and len(rows) == 3 and list(CSV_COLUMNS) not in rows[1:]


def test_reopen_torn_or_foreign_csv_is_set_aside(tmp_path: Path) -> None:
    path = tmp_path / "acct.csv"
    with AccountingLog(path) as log:
        log.write(outcome(0))
    data = path.read_bytes()
    path.write_bytes(data + b'd,2023,"unterminated, quoted')  # a crash mid-line
    with AccountingLog(path) as log:
        log.write(outcome(1))
    assert len(log.rotated) == 1 and log.rotated[0].read_bytes().endswith(b"quoted")  # kept whole
    assert [r[CSV_COLUMNS.index("messageId")] for r in read_csv(path)[1:]] == ["m00001"]

    path.write_text("some,other,header\r\n1,2,3\r\n")
    with AccountingLog(path) as log:
        log.write(outcome(2))
    assert log.rotated[0].read_bytes() == b"some,other,header\r\n1,2,3\r\n"
    assert read_csv(path)[0] == list(CSV_COLUMNS)


def test_reopen_torn_jsonl_ends_the_fragment(tmp_path: Path) -> None:
    path = tmp_path / "acct.jsonl"
    path.write_bytes(b'{"message_id": "m0"}\n{"message_id": "m1", "recip')
    with AccountingLog(path) as log:
        log.write(outcome(2))
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[2])["message_id"] == "m00002"
