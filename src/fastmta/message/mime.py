"""Campaign templates: a MIME message compiled once, rendered per recipient to wire bytes.

Input format (a ``[template]`` table of a campaign TOML, decoded into
``CampaignTemplate``; file paths are relative to the campaign file)::

    [template]
    text_file = "welcome.txt"          # or text = "...";  text and/or html
    html_file = "welcome.html"         # or html = "..."
    message_id_domain = "example.com"  # optional: default is the From domain

    [template.headers]                 # in this order on the message
    From = "News <news@example.com>"
    To = "{{ name }} <{{ email }}>"
    Subject = "Hello {{ first_name | default(\\"friend\\") }}"
    List-Unsubscribe = "<https://example.com/u/{{ id }}>"

    [[template.attachments]]           # optional; read and base64-encoded once
    path = "terms.pdf"
    content_type = "application/pdf"   # optional, guessed from the name
    filename = "terms.pdf"             # optional, default: the file's name

From and To are required. Date, Message-ID, MIME-Version, Content-Type and
Content-Transfer-Encoding are generated and may not be given. In address
headers (From, To, Cc, Bcc, Reply-To, Sender) a field inside ``<...>`` (or
making up the whole value) must hold exactly one ASCII address, and a field
elsewhere is a display name, quoted or encoded so that it can never add an
address.

Output (``CompiledCampaign.render``): the message with CRLF line ends, every
line at most 998 octets (headers folded, RFC 2047 for non-ASCII; a body part
goes 7bit when it is ASCII with short lines, quoted-printable otherwise;
attachments base64), ready for ``core.to_wire`` and DKIM signing. Text only
or HTML only is a single part; both make multipart/alternative; attachments
wrap that in multipart/mixed.
"""

from __future__ import annotations

import base64
import itertools
import mimetypes
import os
import re
import secrets
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import format_datetime, parseaddr
from pathlib import Path
from typing import Any

import msgspec

from fastmta.errors import ConfigError
from fastmta.message import core
from fastmta.message.headers import HOST_NAME, SOFT_LIMIT, format_header
from fastmta.message.template import ADDRESS_HEADERS, CompiledText, Context

GENERATED_HEADERS = frozenset({"date", "message-id", "mime-version", "content-type", "content-transfer-encoding"})
_HEADER_NAME_RE = re.compile(r"[!-9;-~]+")  # RFC 5322 ftext: printable ASCII but ':'


class AttachmentSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    path: str
    filename: str | None = None
    content_type: str | None = None


class CampaignTemplate(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """The ``[template]`` of a campaign: headers plus text and/or HTML, attachments optional."""

    headers: dict[str, str]
    text: str | None = None
    text_file: str | None = None
    html: str | None = None
    html_file: str | None = None
    attachments: tuple[AttachmentSpec, ...] = ()
    message_id_domain: str | None = None


def _read_text(inline: str | None, path: str | None, what: str, base: Path, source: str) -> tuple[str | None, str]:
    if inline is not None and path is not None:
        raise ConfigError(f"{source}: template: give {what} or {what}_file, not both")
    if path is None:
        return inline, f"{source}:template.{what}"
    full = inside_job_dir(base, path, f"{source}: template.{what}_file")
    try:
        # newline="" keeps the file's line ends; the wire stage normalizes them.
        with open(full, encoding="utf-8", newline="") as f:
            return f.read(), str(full)
    except OSError as exc:
        raise ConfigError(f"{source}: template.{what}_file {full}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: template.{what}_file {full} is not UTF-8 ({exc.reason} at byte {exc.start})") from None


def inside_job_dir(base: Path, path: str, where: str) -> Path:
    """*path* (relative to the job's directory *base*), refused when it leads out of that directory.

    What these files hold goes out in every message: a job dropped into
    ``serve``'s pickup directory with ``text_file = "../../etc/shadow"`` (or a
    link to it) mailed that file, read with the service's rights, to its list.
    (serve holds a pickup job's DKIM key and recipients file to the same rule.)
    """
    full = base / path
    try:
        resolved, root = full.resolve(), base.resolve()
    except (OSError, RuntimeError):  # a link loop: open() reports it below
        return full
    if not resolved.is_relative_to(root):
        raise ConfigError(f"{where} {path}: outside the job's directory {base} (only files beside the job or "
                          "below it go into messages)")
    if any(part.startswith(".") for part in resolved.relative_to(root).parts):
        # Hidden entries are the queue's (SPOOL/.fastmta: journal, bodies) or serve's (.rejected, files
        # being written): never a template.
        raise ConfigError(f"{where} {path}: a hidden file or directory (names starting with '.' are the queue's and serve's)")
    return resolved  # opened as checked, not through a link swapped in since


class _Date:
    """RFC 5322 Date of the current second, formatted once per second."""

    def __init__(self) -> None:
        self._second = -1
        self._value = ""

    def __call__(self, now: float | None) -> str:
        second = int(time.time() if now is None else now)
        if second != self._second:
            self._value = format_datetime(datetime.fromtimestamp(second, UTC))
            self._second = second
        return self._value


class CompiledCampaign:
    """A campaign template parsed and pre-encoded; ``render`` per recipient."""

    def __init__(self, spec: CampaignTemplate, *, base_dir: str | os.PathLike[str] = ".", source: str = "campaign") -> None:
        base = Path(base_dir)
        self.source = source
        names = {k.lower() for k in spec.headers}
        for name in spec.headers:
            if not _HEADER_NAME_RE.fullmatch(name):
                raise ConfigError(f"{source}: template.headers: invalid header name {name!r}")
            if name.lower() in GENERATED_HEADERS:
                raise ConfigError(f"{source}: template.headers: {name} is generated and may not be set")
        for required in ("from", "to"):
            if required not in names:
                raise ConfigError(f"{source}: template.headers: {required.title()} is required")
        if len(names) != len(spec.headers):
            raise ConfigError(f"{source}: template.headers: a header is given twice (names are case-insensitive)")
        # (name, template, is an address header)
        self.headers: list[tuple[str, CompiledText, bool]] = []
        for name, value in spec.headers.items():
            if any(c in value for c in "\r\n\0"):
                raise ConfigError(f"{source}: template.headers.{name}: CR, LF or NUL in a header template")
            tpl = CompiledText(
                value,
                Context.HEADER,
                source=f"{source}:template.headers.{name}",
                address_header=name.lower() in ADDRESS_HEADERS,
            )
            self.headers.append((name, tpl, name.lower() in ADDRESS_HEADERS))

        text, text_src = _read_text(spec.text, spec.text_file, "text", base, source)
        html, html_src = _read_text(spec.html, spec.html_file, "html", base, source)
        if text is None and html is None:
            raise ConfigError(f"{source}: template: needs text, html or both")
        self.text = CompiledText(text, Context.TEXT, source=text_src) if text is not None else None
        self.html = CompiledText(html, Context.HTML, source=html_src) if html is not None else None

        # "=_" never occurs in quoted-printable output (a literal '=' is
        # encoded), so a part that goes QP can never contain the boundary.
        self.boundary = "=_fm" + secrets.token_hex(12)
        self._attachments: list[bytes] = [self._attachment(a, base, source) for a in spec.attachments]

        domain = spec.message_id_domain
        if domain is None:
            from_tpl = spec.headers[next(k for k in spec.headers if k.lower() == "from")]
            addr = parseaddr(from_tpl)[1]
            if "{{" in from_tpl or "@" not in addr:
                raise ConfigError(f"{source}: template.message_id_domain is needed (From is not a fixed address)")
            domain = addr.rsplit("@", 1)[1]
        self.message_id_domain = _message_id_domain(domain, source)
        self._mid_prefix = secrets.token_hex(6)
        self._counter = itertools.count()
        self._date = _Date()
        self.fields = frozenset().union(
            *(t.fields for _, t, _ in self.headers), *(t.fields for t in (self.text, self.html) if t is not None)
        )

    @staticmethod
    def _attachment(spec: AttachmentSpec, base: Path, source: str) -> bytes:
        full = inside_job_dir(base, spec.path, f"{source}: template.attachments")
        try:
            data = full.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{source}: template.attachments: {full}: {exc.strerror or exc}") from None
        filename = spec.filename or full.name
        ctype = spec.content_type or mimetypes.guess_type(filename)[0] or "application/octet-stream"
        encoded = base64.encodebytes(data).replace(b"\n", b"\r\n")
        head = format_header("Content-Type", f'{ctype}; name="{filename}"')
        head += format_header("Content-Disposition", f'attachment; filename="{filename}"')
        return head + b"Content-Transfer-Encoding: base64\r\n\r\n" + encoded

    def message_id(self) -> str:
        return f"<{time.time_ns():x}.{self._mid_prefix}.{next(self._counter):x}@{self.message_id_domain}>"

    def _part(self, ctype: str, body: bytes) -> tuple[bytes, bytes]:
        """(Content-Type + CTE header lines, encoded body) for one text part."""
        if core.is_7bit_safe(body, 998) and self.boundary.encode() not in body:
            return (
                f"Content-Type: {ctype}; charset=utf-8\r\nContent-Transfer-Encoding: 7bit\r\n".encode(),
                core.normalize_crlf(body),
            )
        return (
            f"Content-Type: {ctype}; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n".encode(),
            core.quoted_printable(body),
        )

    def render(
        self,
        recipient: Mapping[str, Any],
        *,
        recipient_id: str | None = None,
        now: float | None = None,
        message_id: str | None = None,
    ) -> bytes:
        """The whole message for one recipient (CRLF, not dot-stuffed).

        A missing field without a default raises InputError naming the
        field, the recipient (*recipient_id*, else its ``email``) and the
        template file and line.
        """
        out = []
        for name, tpl, is_address in self.headers:
            value = tpl.render(recipient, recipient_id=recipient_id)
            if value.isascii() and len(name) + 2 + len(value) <= SOFT_LIMIT and (is_address or b"=?" not in value):
                out.append(b"%s: %s\r\n" % (name.encode(), value))
            else:
                # Address headers: display names from fields arrive already
                # encoded (template._safe_phrase) and must not be re-encoded.
                out.append(format_header(name, value.decode("utf-8"), keep_encoded_words=is_address))
        out.append(b"Date: %s\r\nMessage-ID: %s\r\nMIME-Version: 1.0\r\n" % (
            self._date(now).encode(), (message_id or self.message_id()).encode()))
        parts = []
        if self.text is not None:
            parts.append(self._part("text/plain", self.text.render(recipient, recipient_id=recipient_id)))
        if self.html is not None:
            parts.append(self._part("text/html", self.html.render(recipient, recipient_id=recipient_id)))
        if len(parts) == 1 and not self._attachments:
            head, body = parts[0]
            out += [head, b"\r\n", body]
            return b"".join(out)
        b = self.boundary.encode()
        if len(parts) == 1:
            inner = parts[0][0] + b"\r\n" + parts[0][1]
        else:
            alt_b = b + b"a"
            alt = [b'Content-Type: multipart/alternative; boundary="%s"\r\n\r\n' % alt_b]
            # The CRLF before a delimiter belongs to the delimiter (RFC 2046
            # 5.1.1), hence the extra one after each body.
            for head, body in parts:
                alt += [b"--%s\r\n" % alt_b, head, b"\r\n", body, b"\r\n"]
            alt.append(b"--%s--\r\n" % alt_b)
            inner = b"".join(alt)
        if not self._attachments:
            # inner starts with its own Content-Type: it is the whole message body.
            out.append(inner)
            return b"".join(out)
        out.append(b'Content-Type: multipart/mixed; boundary="%s"\r\n\r\n' % b)
        out += [b"--%s\r\n" % b, inner, b"\r\n"]
        for att in self._attachments:
            out += [b"--%s\r\n" % b, att, b"\r\n"]
        out.append(b"--%s--\r\n" % b)
        return b"".join(out)


def compile_campaign(
    spec: CampaignTemplate | Mapping[str, Any], *, base_dir: str | os.PathLike[str] = ".", source: str = "campaign"
) -> CompiledCampaign:
    """Validate and compile a campaign template (a Struct or the decoded TOML table).

    Unknown keys and wrong types are ConfigErrors naming *source*.
    """
    if not isinstance(spec, CampaignTemplate):
        try:
            spec = msgspec.convert(spec, CampaignTemplate)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"{source}: template: {exc}") from None
    return CompiledCampaign(spec, base_dir=base_dir, source=source)




def _message_id_domain(domain: str, source: str) -> str:
    """*domain* as a Message-ID's right side (a host name; a Unicode one as its A-label), or ConfigError.

    It goes into a header as it is: unchecked, "x>\\r\\nBcc: ..." from an HTTP campaign request was a
    header of every message (the API checks CR and LF in its header templates, not here)."""
    name = domain.strip().rstrip(".")
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            name = ""
    if not HOST_NAME.fullmatch(name):
        raise ConfigError(f"{source}: template.message_id_domain: not a domain name: {domain!r}")
    return name
