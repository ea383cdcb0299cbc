"""Templates: syntax, context escaping, Jinja2-identical output, whole messages a mail reader parses back."""

from __future__ import annotations

import email
import email.policy
import re
import tomllib
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import jinja2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastmta.errors import ConfigError, InputError
from fastmta.message import core
from fastmta.message.mime import CampaignTemplate, compile_campaign
from fastmta.message.template import CompiledText, Context

pytestmark = pytest.mark.core


def html(tpl: str, **values: Any) -> str:
    return CompiledText(tpl, Context.HTML, source="t.html").render(values).decode()


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


# ---------------------------------------------------------------- syntax


def test_fields_defaults_and_filters() -> None:
    t = CompiledText(
        'Hi {{ first_name | default("friend") }} {{name|upper}} {{ name | lower }} {{ name | title }} '
        "{{ q | urlencode }} {{ day | date('%d/%m/%Y') }} {{ day | date }}",
        Context.TEXT,
        source="t.txt",
    )
    out = t.render({"name": "aNNa smith", "q": "a b&c/é", "day": "2024-03-05T10:00:00"})
    assert out.decode() == "Hi friend ANNA SMITH anna smith Anna Smith a%20b%26c%2F%C3%A9 05/03/2024 2024-03-05"
    # default also covers an empty value (a blank CSV cell)
    assert t.render({"first_name": "", "name": "x", "q": "", "day": "2024-01-01"}).startswith(b"Hi friend ")
    assert t.render({"first_name": "Bo", "name": "x", "q": "", "day": "2024-01-01"}).startswith(b"Hi Bo ")


def test_default_argument_may_contain_quotes_and_pipes() -> None:
    t = CompiledText('{{ a | default("say \\"hi\\" | bye") }}', Context.TEXT, source="t")
    assert t.render({}) == b'say "hi" | bye'


@pytest.mark.parametrize(
    ("tpl", "match", "line"),
    [
        ("line1\n{{ user.name }}", "attribute access", 2),
        ("{{ name | shout }}", "unknown or malformed filter 'shout'", 1),
        ("{{ name | default }}", "needs an argument", 1),
        ("{{ name | upper('x') }}", "takes no argument", 1),
        ("a\nb\n{{ name ", "without a closing", 3),
        ("{{ __import__('os') }}", "invalid field name", 1),
        ("{{ }}", "invalid field name", 1),
    ],
)
def test_syntax_errors_name_source_and_line(tpl: str, match: str, line: int) -> None:
    with pytest.raises(InputError, match=re.escape(match)) as err:
        CompiledText(tpl, Context.HTML, source="welcome.html")
    assert err.value.source == "welcome.html" and err.value.line == line
    assert f"welcome.html:{line}" in str(err.value)


def test_missing_field_names_field_recipient_and_line() -> None:
    t = CompiledText("Dear {{ title }}\n{{ last_name }}", Context.TEXT, source="body.txt")
    with pytest.raises(InputError) as err:
        t.render({"title": "Dr", "email": "x@example.com"})
    msg = str(err.value)
    assert "'last_name'" in msg and "x@example.com" in msg and "body.txt:2" in msg
    with pytest.raises(InputError, match="recipient row-7"):
        t.render({"title": "Dr"}, recipient_id="row-7")


def test_bad_date_value_is_an_error_naming_the_field() -> None:
    t = CompiledText("{{ d | date }}", Context.TEXT, source="t")
    with pytest.raises(InputError, match="field 'd'.*not an ISO 8601 date"):
        t.render({"d": "yesterday", "email": "a@b.c"})


def test_non_string_values_are_converted() -> None:
    assert CompiledText("{{ n }}/{{ m }}", Context.TEXT, source="t").render({"n": 3, "m": 1.5}) == b"3/1.5"


# ---------------------------------------------------------------- context escaping


def test_html_text_and_attributes_are_escaped_unless_raw() -> None:
    v = "<b>\"Tom\" & 'Jerry'</b>"
    assert html("<p>{{ v }}</p>", v=v) == "<p>&lt;b&gt;&#34;Tom&#34; &amp; &#39;Jerry&#39;&lt;/b&gt;</p>"
    assert html('<p title="{{ v }}">', v=v) == '<p title="&lt;b&gt;&#34;Tom&#34; &amp; &#39;Jerry&#39;&lt;/b&gt;">'
    assert html("<p>{{ v | raw }}</p>", v=v) == f"<p>{v}</p>"


def test_href_whole_url_and_component() -> None:
    assert (
        html('<a href="{{ u }}">x</a>', u="https://ex.com/a b?x=1&y='2'\"")
        == '<a href="https://ex.com/a%20b?x=1&amp;y=&#39;2&#39;%22">x</a>'
    )
    assert html('<a href="https://ex.com/u?id={{ id }}&t=1">', id="a&b c/é\"") == (
        '<a href="https://ex.com/u?id=a%26b%20c%2F%C3%A9%22&t=1">'
    )
    assert html("<a href='{{ u | urlencode }}'>", u="a b") == "<a href='a%20b'>"
    # outside a tag, "href=" is just text
    assert html("href={{ v }}", v="<x>") == "href=&lt;x&gt;"


@pytest.mark.parametrize("url", ["javascript:alert(1)", " JavaScript:alert(1)", "data:text/html,<x>", "vbscript:x"])
def test_dangerous_url_schemes_are_refused(url: str) -> None:
    with pytest.raises(InputError, match="URL scheme not allowed"):
        html('<a href="{{ u }}">', u=url, email="r@example.com")


def test_text_part_inserts_as_is() -> None:
    t = CompiledText("{{ v }}", Context.TEXT, source="t")
    assert t.render({"v": "<a> & \"b\"\nline"}) == b'<a> & "b"\nline'


def test_header_values_can_never_break_the_line() -> None:
    t = CompiledText("Hi {{ v }}", Context.HEADER, source="t")
    out = t.render({"v": "x\r\nBcc: evil@example.org\0\n"})
    assert out == b"Hi x  Bcc: evil@example.org  "


# ---------------------------------------------------------------- same bytes as Jinja2

JINJA_HTML = (
    "<html><body><h1>Hello {{ first_name }}!</h1>\n<p>{{ company }} &amp; {{ city }}</p>\n"
    + "<p>lorem ipsum dolor sit amet</p>\n" * 5
    + '<p title="{{ title }}">{{ a }} {{ b }}</p><div>{{ c }}</div>\n</body></html>\n'
)

value_text = st.text(max_size=40)


@settings(max_examples=150)
@given(st.fixed_dictionaries({k: value_text for k in ("first_name", "company", "city", "title", "a", "b", "c")}))
def test_html_render_is_byte_identical_to_jinja2_autoescape(values: dict[str, str]) -> None:
    ours = CompiledText(JINJA_HTML, Context.HTML, source="t").render(values)
    env = jinja2.Environment(autoescape=True, keep_trailing_newline=True)
    assert ours == env.from_string(JINJA_HTML).render(**values).encode()


# ---------------------------------------------------------------- whole messages

SPEC: dict[str, Any] = {
    "headers": {
        "From": "News <news@example.com>",
        "To": "{{ name }} <{{ email }}>",
        "Subject": 'Hello {{ first_name | default("friend") }}, your offer',
        "List-Unsubscribe": "<https://example.com/u/{{ id | urlencode }}>",
    },
    "text": "Hi {{ first_name | default(\"friend\") }},\nyour code: {{ id }}\n",
    "html": '<p>Hi {{ first_name | default("friend") }}</p><a href="https://example.com/u?id={{ id }}">u</a>\n',
}


def rcpt(**kw: str) -> dict[str, str]:
    base = {"name": "Ann Lee", "email": "ann@example.net", "first_name": "Ann", "id": "42"}
    base.update(kw)
    return base


def crlf_to_lf(text: str) -> str:
    """Parts decode with the wire's CRLF line ends; compare as text lines."""
    return text.replace("\r\n", "\n")


def assert_wire_shape(raw: bytes) -> None:
    assert b"\n" not in raw.replace(b"\r\n", b"") and b"\r" not in raw.replace(b"\r\n", b"")
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))


def test_message_headers_and_parts() -> None:
    c = compile_campaign(SPEC, source="c.toml")
    raw = c.render(rcpt(), now=1_700_000_000)
    assert_wire_shape(raw)
    msg = parse(raw)
    assert msg["From"] == "News <news@example.com>"
    assert msg["To"] == "Ann Lee <ann@example.net>"
    assert msg["Subject"] == "Hello Ann, your offer"
    assert msg["Date"] == "Tue, 14 Nov 2023 22:13:20 +0000"
    assert msg["MIME-Version"] == "1.0"
    assert re.fullmatch(r"<[0-9a-f.]+@example\.com>", msg["Message-ID"])
    assert msg.get_content_type() == "multipart/alternative"
    text = msg.get_body(("plain",))
    html_part = msg.get_body(("html",))
    assert text is not None and html_part is not None
    assert crlf_to_lf(text.get_content()) == "Hi Ann,\nyour code: 42\n"
    assert crlf_to_lf(html_part.get_content()) == '<p>Hi Ann</p><a href="https://example.com/u?id=42">u</a>\n'
    # Without a first name the default is used everywhere.
    r = rcpt()
    del r["first_name"]
    assert parse(c.render(r))["Subject"] == "Hello friend, your offer"


@pytest.mark.parametrize("name", ["Lee, Ann", 'x <evil@example.org>, y', 'Q "uoted" \\ name', "Jörg; Müller"])
def test_display_names_cannot_add_addresses(name: str) -> None:
    msg = parse(compile_campaign(SPEC).render(rcpt(name=name)))
    [addr] = msg["To"].addresses
    assert addr.addr_spec == "ann@example.net"
    assert name in addr.display_name  # readers may keep the quotes of an encoded quoted-string


@pytest.mark.parametrize("email_value", ["a@example.net, evil@example.org", "a@example.net>", "not-an-address", "a b@x.y"])
def test_address_fields_must_be_one_address(email_value: str) -> None:
    with pytest.raises(InputError, match="field 'email'.*not a single email address") as err:
        compile_campaign(SPEC, source="c.toml").render(rcpt(email=email_value), recipient_id="row 3")
    assert "row 3" in str(err.value) and "c.toml:template.headers.To" in str(err.value)


@pytest.mark.parametrize("email_value", ["renée@example.net", "kunde@bücher.test", "用户@例子.测试"])
def test_internationalised_addresses_are_taken_as_they_are(email_value: str) -> None:
    # RFC 6532: a UTF-8 addr-spec stays UTF-8 in the header (the message then needs SMTPUTF8).
    raw = compile_campaign(SPEC).render(rcpt(email=email_value))
    head = raw.split(b"\r\n\r\n", 1)[0].decode("utf-8")
    to = next(line for line in head.split("\r\n") if line.startswith("To:"))
    assert to.endswith(f"<{email_value}>")


@pytest.mark.parametrize("email_value", ["a\u2028b@example.net", "a@exa\u00a0mple.net", "a@example.net\u0085"])
def test_unicode_separators_and_controls_are_not_an_address(email_value: str) -> None:
    with pytest.raises(InputError, match="not a single email address"):
        compile_campaign(SPEC).render(rcpt(email=email_value))


def test_message_ids_are_unique() -> None:
    c = compile_campaign(SPEC)
    ids = {parse(c.render(rcpt()))["Message-ID"] for _ in range(200)}
    assert len(ids) == 200


def test_non_ascii_headers_use_encoded_words() -> None:
    c = compile_campaign(SPEC)
    raw = c.render(rcpt(name="Jörg Müller", first_name="Zoë  🎉"))
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert head.isascii() and b"=?utf-8?b?" in head
    msg = parse(raw)
    assert msg["To"].addresses[0].display_name == "Jörg Müller"
    assert msg["To"].addresses[0].addr_spec == "ann@example.net"
    assert msg["Subject"] == "Hello Zoë  🎉, your offer"  # unstructured: every space kept


def test_long_and_8bit_bodies_are_quoted_printable() -> None:
    spec = dict(SPEC, text="{{ v }}\n", html=None)
    c = compile_campaign(spec)
    value = "Grüße " * 400 + "." + "x" * 2000
    raw = c.render(rcpt(v=value))
    assert_wire_shape(raw)
    msg = parse(raw)
    assert msg["Content-Transfer-Encoding"] == "quoted-printable"
    assert crlf_to_lf(msg.get_content()) == value + "\n"
    plain = parse(c.render(rcpt(v="plain ascii")))
    assert plain["Content-Transfer-Encoding"] == "7bit" and crlf_to_lf(plain.get_content()) == "plain ascii\n"


def test_attachments_round_trip(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 40
    (tmp_path / "data.bin").write_bytes(payload)
    (tmp_path / "body.html").write_text("<p>{{ name }}</p>", encoding="utf-8")
    spec = {"headers": SPEC["headers"], "html_file": "body.html", "attachments": [{"path": "data.bin"}]}
    c = compile_campaign(spec, base_dir=tmp_path)
    raw = c.render(rcpt(name="<Ann>"))
    assert_wire_shape(raw)
    msg = parse(raw)
    assert msg.get_content_type() == "multipart/mixed"
    [att] = list(msg.iter_attachments())
    assert att.get_filename() == "data.bin" and att.get_content() == payload
    body = msg.get_body(("html",))
    assert body is not None and crlf_to_lf(body.get_content()) == "<p>&lt;Ann&gt;</p>\n"


def test_template_files_outside_the_jobs_directory_are_refused(tmp_path: Path) -> None:
    # Found by an attack on intake: text_file = "../secret.txt" in a job dropped into serve's pickup
    # directory mailed that file (read with the service's rights) to the whole list.
    from fastmta.errors import ConfigError

    job = tmp_path / "job"
    (job / "parts").mkdir(parents=True)
    (tmp_path / "secret.txt").write_text("root:x:0:0\n")
    (job / "parts" / "ok.txt").write_text("Hello {{ name }}\n")
    (job / "link.txt").symlink_to(tmp_path / "secret.txt")
    (job / ".fastmta").mkdir()
    (job / ".fastmta" / "journal").write_text("queue records\n")
    headers = SPEC["headers"]
    for spec, where in [
        ({"headers": headers, "text_file": "../secret.txt"}, "template.text_file"),
        ({"headers": headers, "html_file": str(tmp_path / "secret.txt")}, "template.html_file"),
        ({"headers": headers, "text_file": "link.txt"}, "template.text_file"),  # a link out counts too
        ({"headers": headers, "text": "x", "attachments": [{"path": "../secret.txt"}]}, "template.attachments"),
        # Hidden entries: the queue's journal and bodies (SPOOL/.fastmta), serve's .rejected.
        ({"headers": headers, "text_file": ".fastmta/journal"}, "template.text_file"),
    ]:
        with pytest.raises(ConfigError, match="outside the job's directory|hidden") as info:
            compile_campaign(spec, base_dir=job, source="job.toml")
        assert where in str(info.value)
    c = compile_campaign({"headers": headers, "text_file": "parts/ok.txt"}, base_dir=job)  # below it: fine
    assert b"Hello Ann" in c.render(rcpt(name="Ann"))


def test_campaign_toml_example_loads(tmp_path: Path) -> None:
    (tmp_path / "welcome.txt").write_text("Hello {{ first_name }}\n", encoding="utf-8")
    doc = tomllib.loads(
        """
        [template]
        text_file = "welcome.txt"
        html = "<p>Hello {{ first_name }}</p>"
        [template.headers]
        From = "News <news@example.com>"
        To = "{{ email }}"
        Subject = "Hi {{ first_name | default(\\"friend\\") }}"
        """
    )
    c = compile_campaign(doc["template"], base_dir=tmp_path, source="campaign.toml")
    assert c.fields == {"first_name", "email"}
    msg = parse(c.render({"email": "a@example.net", "first_name": "Al"}))
    assert msg["Subject"] == "Hi Al"


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"headers": {"From": "a@example.com", "To": "x"}}, "needs text, html or both"),
        ({"headers": {"From": "a@example.com"}, "text": "x"}, "To is required"),
        ({"headers": {"From": "a@example.com", "To": "x", "Date": "y"}, "text": "x"}, "Date is generated"),
        ({"headers": {"From": "a@example.com", "To": "x"}, "text": "x", "text_file": "t"}, "not both"),
        ({"headers": {"From": "a@example.com", "To": "x"}, "text_file": "nope.txt"}, "nope.txt"),
        ({"headers": {"From": "{{ f }}", "To": "x"}, "text": "x"}, "message_id_domain"),
        ({"headers": {"From": "a@example.com", "To": "x"}, "text": "x", "colour": 1}, "colour"),
        ({"headers": {"From": "a@example.com", "To": "x", "Bad Name": "v"}, "text": "x"}, "invalid header name"),
        # Into a header as it is: an HTTP campaign's "x>\r\nBcc: ..." was a header of every message.
        *(({"headers": {"From": "a@example.com", "To": "x"}, "text": "x", "message_id_domain": bad},
           "message_id_domain: not a domain name") for bad in ("x>\r\nBcc: evil@x", "a b", "\u202e.example", "")),
    ],
)
def test_config_errors_name_the_source(spec: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(match)) as err:
        compile_campaign(spec, source="campaign.toml")
    assert "campaign.toml" in str(err.value)


def test_a_unicode_message_id_domain_goes_as_its_a_label() -> None:
    spec = {"headers": {"From": "a@b\u00fccher.example", "To": "{{ email }}"}, "text": "x"}
    mid = parse(compile_campaign(spec).render({"email": "b@example.net"}))["Message-ID"]
    assert mid.endswith("@xn--bcher-kva.example>"), mid


def test_spec_struct_is_accepted() -> None:
    spec = CampaignTemplate(headers={"From": "a@example.com", "To": "{{ email }}"}, text="x")
    assert parse(compile_campaign(spec).render({"email": "b@example.net"}))["To"] == "b@example.net"


def test_rendered_message_survives_to_wire() -> None:
    raw = compile_campaign(SPEC).render(rcpt(first_name=".\r\n.\r\nQUIT"))
    wire = core.to_wire(raw)
    assert wire.count(b"\r\n.\r\n") == 1 and wire.endswith(b"\r\n.\r\n")


def test_values_remembered_across_rows_are_right_for_every_row_and_errors_are_never_remembered() -> None:
    """Filtered fields are remembered per value (names and dates repeat in a campaign): same output as fresh."""
    tpl = '{{ name | default("friend") | title }} {{ id }} {{ when | date("%d %B %Y") }}'
    t = CompiledText(tpl, Context.TEXT, source="t.txt")
    # The same kind of slot repeated (a newsletter's sections) shares what it remembers: each repeat right.
    rep = CompiledText('<a href="/r?id={{ id | urlencode }}">{{ n | default("x") }}</a>' * 3, Context.HTML, source="r")
    for i in range(3):
        assert rep.render({"id": f"u {i}&", "n": ""}).decode() == f'<a href="/r?id=u%20{i}%26">x</a>' * 3
    rows = [
        {"name": "ada", "id": "1", "when": "2026-02-21"},
        {"name": "ada", "id": "2", "when": "2026-02-21"},
        {"name": "", "id": "3", "when": "2026-07-18"},
        {"name": "grace", "id": "4", "when": "2026-02-21"},
    ]
    assert [t.render(r).decode() for r in rows] == [
        "Ada 1 21 February 2026", "Ada 2 21 February 2026", "Friend 3 18 July 2026", "Grace 4 21 February 2026",
    ]
    for _ in range(2):  # a bad value fails every time it comes, naming the recipient
        with pytest.raises(InputError, match="r9.*not an ISO 8601 date"):
            t.render({"name": "x", "id": "9", "when": "soon"}, recipient_id="r9")
    # More distinct values than are remembered: still each one's own output.
    many = [{"name": f"n{i}", "id": str(i), "when": "2026-01-01"} for i in range(5000)]
    assert all(t.render(r).decode() == f"N{i} {i} 01 January 2026" for i, r in enumerate(many))
