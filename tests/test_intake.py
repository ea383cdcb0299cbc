"""Intake of campaign rows and pickup files: what is accepted, what is reported (no network)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fastmta.errors import InputError
from fastmta.examples import SPOOL
from fastmta.intake.campaign import Campaign
from fastmta.intake.items import Reject, SpoolItem
from fastmta.intake.pickup import read_pickup
from fastmta.queue.records import split_address


def campaign(tmp_path: Path, csv_bytes: bytes) -> Campaign:
    for name in ("welcome.toml", "welcome.txt", "welcome.html", "dkim-test-ed25519.key.pem"):
        shutil.copy(SPOOL / name, tmp_path / name)
    (tmp_path / "recipients.csv").write_bytes(csv_bytes)
    return Campaign.load(tmp_path / "welcome.toml")


HEADER = b"email,first_name,last_name,id,signup\r\n"


def test_a_csv_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    # Excel's "CSV UTF-8" starts with EF BB BF; it is not part of the first column's name.
    rows = b"ann@one.example,Ann,Lee,u1,2026-01-01\r\nbob@two.example,Bob,Ray,u2,2026-01-02\r\n"
    items = list(campaign(tmp_path, b"\xef\xbb\xbf" + HEADER + rows).items())
    assert [i.recipients for i in items if isinstance(i, SpoolItem)] == [["ann@one.example"], ["bob@two.example"]]
    assert not [i for i in items if isinstance(i, Reject)]


def test_jsonl_values_no_message_can_carry_spoil_only_their_row(tmp_path: Path) -> None:
    # Found by an attack on intake: a JSON "\ud800" (a lone surrogate) in a merge field or the address
    # stopped the whole reading, on every run; an array or object value was rendered as Python's repr.
    for name in ("welcome.toml", "welcome.txt", "welcome.html", "dkim-test-ed25519.key.pem"):
        shutil.copy(SPOOL / name, tmp_path / name)
    toml = tmp_path / "welcome.toml"
    toml.write_text(toml.read_text().replace('recipients = "recipients.csv"', 'recipients = "r.jsonl"'))
    rows = [
        r'{"email": "a@one.example", "first_name": "Ann", "last_name": "L", "id": "u1", "signup": "2026-01-01"}',
        r'{"email": "b@one.example", "first_name": "\ud800", "last_name": "L", "id": "u2", "signup": "2026-01-01"}',
        r'{"email": "\ud800@one.example", "first_name": "C", "last_name": "L", "id": "u3", "signup": "2026-01-01"}',
        r'{"email": "d@one.example", "first_name": ["\r\nBcc: x@evil.example"], "last_name": "L", "id": "u4", '
        r'"signup": "2026-01-01"}',
        r'{"email": "e@one.example", "first_name": {"a": 1}, "last_name": "L", "id": "u5", "signup": "2026-01-01"}',
        r'{"email": "f@one.example", "first_name": "Fé", "last_name": "L", "id": "u6", "signup": "2026-01-01"}',
    ]
    (tmp_path / "r.jsonl").write_text("\n".join(rows) + "\n")
    items = list(Campaign.load(toml).items())
    assert [i.recipients[0] for i in items if isinstance(i, SpoolItem)] == ["a@one.example", "f@one.example"]
    rejected = {i.line: i.reason for i in items if isinstance(i, Reject)}
    assert set(rejected) == {2, 3, 4, 5}
    assert "first_name" in rejected[2] and "not valid Unicode" in rejected[2]
    assert "email" in rejected[3] and "not valid Unicode" in rejected[3]
    assert "JSON array" in rejected[4] and "JSON object" in rejected[5]


def _job_beside_its_files(tmp_path: Path, rows: bytes) -> tuple[Path, str]:
    """TMP/spool with the example job's templates and key, and r.csv of *rows*; the job's text to edit."""
    spool = tmp_path / "spool"
    spool.mkdir()
    for name in ("welcome.txt", "welcome.html", "dkim-test-ed25519.key.pem"):
        shutil.copy(SPOOL / name, spool / name)
    (spool / "r.csv").write_bytes(HEADER + rows)
    return spool, (SPOOL / "welcome.toml").read_text().replace('recipients = "recipients.csv"', 'recipients = "r.csv"')


def test_a_job_whose_name_is_not_utf8_and_has_no_id_is_read(tmp_path: Path) -> None:
    # Found by a review: its id (the file's stem) kept the undecodable byte, and the queue could not
    # record the input: every run failed. The id goes on record escaped; the queue refuses what it
    # cannot record without keeping a half-made input.
    import os

    from fastmta.intake.reader import SpoolReader
    from fastmta.queue.spool import Spool

    spool, toml = _job_beside_its_files(tmp_path, b"ann@one.example,Ann,Lee,u1,2026-01-01\r\n")
    toml = "\n".join(line for line in toml.splitlines() if not line.startswith("id ="))
    with open(os.path.join(os.fsencode(spool), b"job-\xff.toml"), "w") as f:
        f.write(toml)
    [item] = [e for e in SpoolReader(spool) if isinstance(e, SpoolItem)]
    assert item.meta == {"job": "job-\\xff"} and item.key == "campaign:job-\\xff"
    queue = Spool(tmp_path / "queue")
    try:
        with pytest.raises(InputError, match="cannot be recorded"):
            queue.open_input("campaign:job-\udcff")
        assert queue.input("campaign:job-\udcff") is None  # nothing half-made left behind
        assert queue.open_input(item.key).key == item.key
    finally:
        queue.close_sync()


def test_malformed_addresses_are_rejected_at_intake_with_their_line(tmp_path: Path) -> None:
    rows = (
        b"john doe@b.example,John,Doe,u1,2026-01-01\r\n"
        b"ok@b.example,Ok,Ok,u2,2026-01-01\r\n"
        b"two@@b.example,T,T,u3,2026-01-01\r\n"
        b"a(b)@b.example,A,B,u4,2026-01-01\r\n"
    )
    items = list(campaign(tmp_path, HEADER + rows).items())
    delivered = [i.recipients[0] for i in items if isinstance(i, SpoolItem)]
    rejected = {i.line: i.reason for i in items if isinstance(i, Reject)}
    assert delivered == ["ok@b.example"]
    assert set(rejected) == {2, 4, 5}
    assert "white space" in rejected[2] and "john doe@b.example" in rejected[2]


def test_a_trailing_dot_after_the_domain_is_dropped_and_is_the_same_recipient(tmp_path: Path) -> None:
    # Found by an attack on intake: "r@ok.example." went out as it was (501, counted as a hard bounce)
    # and was not known as a duplicate of "r@ok.example". Postfix drops the dot; so does fastmta.
    rows = b"r@ok.example.,R,R,u1,2026-01-01\r\nr@ok.example,R,R,u2,2026-01-01\r\nq@ok.example..,Q,Q,u3,2026-01-01\r\n"
    items = list(campaign(tmp_path, HEADER + rows).items())
    [item] = [i for i in items if isinstance(i, SpoolItem)]
    assert item.recipients == ["r@ok.example"] and b"\r\nTo: R R <r@ok.example>\r\n" in item.content
    rejected = {i.line: i.reason for i in items if isinstance(i, Reject)}
    assert set(rejected) == {3, 4} and "duplicate recipient" in rejected[3] and "q@ok.example.." in rejected[4]
    assert split_address("Ann@Ok.Example.") == ("Ann@Ok.Example", "ok.example")
    # A row a run before this change took as "r@ok.example." (its key had the dot) is not sent again.
    (tmp_path / "again").mkdir()
    job = campaign(tmp_path / "again", HEADER + b"r@ok.example.,R,R,u1,2026-01-01\r\n")
    assert not [i for i in job.items(taken=frozenset({job.row_key("r@ok.example.")})) if isinstance(i, SpoolItem)]
    assert [i.recipients for i in job.items() if isinstance(i, SpoolItem)] == [["r@ok.example"]]


def test_a_quote_left_open_names_every_line_it_took(tmp_path: Path) -> None:
    # Found by an attack on intake: a quote left open took the rows after it into one cell, reported
    # once at the line where it ended, so the rows it swallowed were neither sent nor named. They
    # are not re-read line by line either: a line of a real multi-line cell would become a recipient.
    rows = (
        b"g1@ok.example,A,B,u1,2026-01-01\r\n"
        b'n@ok.example,"Ann\r\nalso ann.private@two.example",B,u2,2026-01-01\r\n'
        b"g2@ok.example,A,B,u3,2026-01-01\r\n"
        b'q@ok.example,"Unbalanced,B,u4,2026-01-01\r\n'
        b"g3@ok.example,A,B,u5,2026-01-01\r\n"
        b"g4@ok.example,A,B,u6,2026-01-01\r\n"
    )
    items = list(campaign(tmp_path, HEADER + rows).items())
    assert [(i.line, i.recipients[0]) for i in items if isinstance(i, SpoolItem)] == [
        (2, "g1@ok.example"), (5, "g2@ok.example")]
    rejected = {i.line: i.reason for i in items if isinstance(i, Reject)}
    assert set(rejected) == {3, 6}
    assert "lines 3-4" in rejected[3] and "lines 6-8" in rejected[6]
    # The field is named: a line break in a merge value (a CRM's multi-line note), or a quote left open.
    assert "field 'first_name' holds a line break" in rejected[3] and "quote was left open" in rejected[6]
    assert "none of these 3 lines" in rejected[6]


def test_internationalised_rows_are_accepted(tmp_path: Path) -> None:
    rows = "renée@example.net,Renée,R,u1,2026-01-01\r\nkunde@bücher.test,K,K,u2,2026-01-01\r\n".encode()
    items = list(campaign(tmp_path, HEADER + rows).items())
    assert [i.recipients[0] for i in items if isinstance(i, SpoolItem)] == ["renée@example.net", "kunde@bücher.test"]
    # The To: header carries the address as it is (RFC 6532), not an encoded-word.
    first = next(i for i in items if isinstance(i, SpoolItem))
    assert "<renée@example.net>".encode() in first.content.split(b"\r\n\r\n", 1)[0]


@pytest.mark.parametrize(
    ("address", "ok"),
    [
        ("a@b.example", True),
        ('"john doe"@b.example', True),
        ("a..b@docomo.example", True),  # mobile carriers' old addresses: receivers take them
        ("user@[192.0.2.1]", True),
        ("john doe@b.example", False),
        ("a@b..example", False),
        ("a@-b.example", False),
        ("a<b@c.example", False),
        ("noat.example", False),
    ],
)
def test_the_address_grammar(address: str, ok: bool) -> None:
    if ok:
        assert split_address(address)[1] == address.rpartition("@")[2].lower()
    else:
        with pytest.raises(InputError):
            split_address(address)


def test_a_pickup_file_with_a_malformed_recipient_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bad.eml"
    path.write_bytes(b"X-Sender: a@b.example\r\nX-Receiver: john doe@b.example\r\nSubject: x\r\n\r\nbody\r\n")
    with pytest.raises(InputError) as err:
        read_pickup(path)
    assert "john doe@b.example" in str(err.value)


@pytest.mark.parametrize(
    "content",
    [
        b"Subject: a\rBcc: victim@x.example\r\n\r\nbody\r\n",
        b"Subject: a\rBcc: victim@x.example\n\nbody\n",
        b"From: a@b.example\r\nSubject: ok\r\n folded\rTo: x@y.example\r\n\r\nbody\r\n",
    ],
)
def test_a_bare_cr_in_a_pickup_header_is_rejected(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "cr.eml"
    path.write_bytes(b"X-Sender: a@b.example\r\nX-Receiver: c@d.example\r\n" + content)
    with pytest.raises(InputError, match="bare CR") as err:
        read_pickup(path)
    assert str(path) in str(err.value)


def test_bare_cr_in_the_body_and_unix_line_ends_are_fine(tmp_path: Path) -> None:
    path = tmp_path / "ok.eml"
    path.write_bytes(b"X-Sender: a@b.example\nX-Receiver: c@d.example\nSubject: unix\n\nbody with a bare \r CR\n")
    assert read_pickup(path).recipients == ["c@d.example"]


def test_unreadable_spool_entries_are_rejected_with_their_reason_and_the_rest_read(tmp_path: Path) -> None:
    import os

    from fastmta.intake.reader import SpoolReader

    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "good.eml").write_bytes(b"X-Sender: a@b.example\r\nX-Receiver: c@d.example\r\nSubject: s\r\n\r\nx\r\n")
    os.symlink(spool / "loop2.eml", spool / "loop1.eml")  # a symlink loop
    os.symlink(spool / "loop1.eml", spool / "loop2.eml")
    os.symlink(spool / "job2.toml", spool / "job1.toml")
    os.symlink(spool / "job1.toml", spool / "job2.toml")
    os.symlink(spool / "nowhere.eml", spool / "dangling.eml")
    (spool / "dir.eml").mkdir()
    (spool / "dir.toml").mkdir()
    os.mkfifo(spool / "fifo.eml")  # no writer: opening it must not block the reader for ever
    events = list(SpoolReader(spool))
    items = [e for e in events if isinstance(e, SpoolItem)]
    rejects = {Path(e.source).name: e.reason for e in events if isinstance(e, Reject)}
    assert [i.recipients for i in items] == [["c@d.example"]]
    assert set(rejects) == {"loop1.eml", "loop2.eml", "job1.toml", "job2.toml", "dangling.eml", "dir.eml", "dir.toml",
                            "fifo.eml"}
    assert rejects["fifo.eml"] == "cannot read: not a regular file"
    assert "symbolic links" in rejects["loop1.eml"] and "symbolic links" in rejects["job1.toml"]
    assert "No such file" in rejects["dangling.eml"]
    assert "directory" in rejects["dir.eml"] and "directory" in rejects["dir.toml"]


def test_sign_later_leaves_costly_signing_to_the_consumer_and_signs_cheap_messages_here(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    rows = b"ann@one.example,Ann,Lee,u1,2026-01-01\r\n"
    small = campaign(tmp_path, HEADER + rows)  # Ed25519 on a few KB: signed while reading
    [item] = list(small.items(sign_later=True))
    assert isinstance(item, SpoolItem) and item.sign is None and item.content.startswith(b"DKIM-Signature:")
    [same] = list(small.items())  # without sign_later: the same, signed
    assert same.sign is None and same.content.startswith(b"DKIM-Signature:")

    big_dir = tmp_path / "big"
    big_dir.mkdir()
    large = campaign(big_dir, HEADER + rows)
    (big_dir / "welcome.html").write_text("<p>" + "long text " * 5000 + "</p>")
    large = Campaign.load(big_dir / "welcome.toml")
    [item] = list(large.items(sign_later=True))
    assert isinstance(item, SpoolItem) and item.sign is not None
    assert not item.content.startswith(b"DKIM-Signature:")  # unsigned until the consumer signs it
    assert item.sign(item.content).startswith(b"DKIM-Signature:") and item.content in item.sign(item.content)

    rsa_dir = tmp_path / "rsa"
    rsa_dir.mkdir()
    campaign(rsa_dir, HEADER + rows)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (rsa_dir / "rsa.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
    toml = (rsa_dir / "welcome.toml").read_text().replace('key_path = "dkim-test-ed25519.key.pem"\nalgorithm = "ed25519-sha256"',
                                                           'key_path = "rsa.pem"\nalgorithm = "rsa-sha256"')
    (rsa_dir / "welcome.toml").write_text(toml)
    [item] = list(Campaign.load(rsa_dir / "welcome.toml").items(sign_later=True))
    assert isinstance(item, SpoolItem) and item.sign is not None  # an RSA signature: on a thread, however small
    assert b"a=rsa-sha256" in item.sign(item.content).split(b"\r\n\r\n")[0].replace(b"\r\n ", b"")


def test_a_confined_job_signs_and_reads_lists_beside_it_only(tmp_path: Path) -> None:
    # Noticed in a review: a job dropped into serve's pickup directory could sign with any key the
    # service can read ([[dkim]] key_path = "/etc/...") and read any list as its recipients. serve
    # reads its jobs confined (as templates always are); fastmta send's operator may name any key.
    from fastmta.intake.reader import SpoolReader

    outside = tmp_path / "keys"
    outside.mkdir()
    shutil.copy(SPOOL / "dkim-test-ed25519.key.pem", outside / "k.pem")
    (tmp_path / "list.csv").write_bytes(HEADER + b"ann@one.example,Ann,Lee,u1,2026-01-01\r\n")
    spool, base = _job_beside_its_files(tmp_path, b"bob@two.example,Bob,Lee,u2,2026-01-01\r\n")
    assert 'key_path = "dkim-test-ed25519.key.pem"' in base
    jobs = {
        "a-key.toml": (base.replace('key_path = "dkim-test-ed25519.key.pem"', f'key_path = "{outside / "k.pem"}"')
                       .replace('id = "welcome-2026-11"', 'id = "a"'), "dkim[0].key_path"),
        "b-list.toml": (base.replace('recipients = "r.csv"', 'recipients = "../list.csv"')
                        .replace('id = "welcome-2026-11"', 'id = "b"'), "campaign.recipients"),
        "c-fine.toml": (base.replace('id = "welcome-2026-11"', 'id = "c"'), None),
    }
    for name, (text, _) in jobs.items():
        (spool / name).write_text(text)
    events = list(SpoolReader(spool, confined=True))
    rejects = {Path(e.source).name: e.reason for e in events if isinstance(e, Reject)}
    assert sorted(rejects) == ["a-key.toml", "b-list.toml"], rejects
    for name, (_, field) in jobs.items():
        if field is not None:
            assert field in rejects[name] and "outside the job's directory" in rejects[name], rejects[name]
    assert [e.recipients for e in events if isinstance(e, SpoolItem)] == [["bob@two.example"]]
    # Not confined (fastmta send): the operator's key anywhere, and a list beside the job directory.
    assert Campaign.load(spool / "a-key.toml").signer is not None
    assert Campaign.load(spool / "b-list.toml").recipients_path == tmp_path / "list.csv"
