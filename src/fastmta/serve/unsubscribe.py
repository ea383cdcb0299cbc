"""RFC 8058 one-click unsubscribe over HTTP: ``POST /u/{token}`` records, ``GET /u/{token}`` only asks.

Routes (no authentication: the signed token is the authorization; see
``fastmta.message.unsubscribe``)::

    POST /u/{token}   body List-Unsubscribe=One-Click (application/x-www-form-urlencoded,
                      as Gmail and Yahoo send it, or multipart/form-data)
                      -> 200 text/plain once the unsubscribe is recorded (durably: the
                         *record* callback returned); no redirect, no cookie, no login
                      -> 400 a token that is not ours (tampered, forged, expired) or a body
                         without List-Unsubscribe=One-Click: nothing is recorded
                      -> 413 a body over 16 KiB; 503 + Retry-After if recording failed
    GET  /u/{token}   -> 200 a small HTML page whose button POSTs the same form. A GET never
                         unsubscribes: link scanners and mail previews fetch every URL.

The service passes :meth:`fastmta.serve.feedback_loop.FeedbackLoop.record_unsubscribe`
as *record*: a list-scoped suppression, with group commit (POSTs that arrive
together share one transaction, on a worker thread, never on the event loop)
and an ``unsubscribe`` accounting record.
"""

from __future__ import annotations

import email.parser
import email.policy
import html
import logging
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs

from aiohttp import web

from fastmta.message.unsubscribe import Unsubscribe

__all__ = ["MAX_BODY", "Record", "add_unsubscribe_routes"]

log = logging.getLogger("fastmta.serve.unsubscribe")

#: record(recipient, list_tag, how): store the unsubscribe durably, return once it is.
Record = Callable[[str, str, str], Awaitable[None]]
#: The largest POST body read (the one RFC 8058 asks for is 26 bytes).
MAX_BODY = 16 * 1024
_COMMON = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",  # the token (the address, in base64) stays out of other sites' logs
    "X-Robots-Tag": "noindex, nofollow",
    "X-Content-Type-Options": "nosniff",
}
_HTML = {
    **_COMMON,
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
}
_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<meta name="robots" content="noindex"><title>{title}</title>
<style>body{{font:16px sans-serif;max-width:32em;margin:3em auto;padding:0 1em}}button{{font-size:1em}}</style>
</head><body><h1>{title}</h1>{body}</body></html>
"""


def _page(title: str, body: str, status: int = 200) -> web.Response:
    return web.Response(text=_PAGE.format(title=html.escape(title), body=body), status=status,
                        content_type="text/html", charset="utf-8", headers=_HTML)


def _text(text: str, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(text=text + "\n", status=status, content_type="text/plain", charset="utf-8",
                        headers={**_COMMON, **(headers or {})})


class _TooLarge(Exception):
    pass


async def _body(request: web.Request) -> bytes:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise _TooLarge
    chunks, size = [], 0
    while chunk := await request.content.read(8192):
        size += len(chunk)
        if size > MAX_BODY:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _form(content_type: str, raw_content_type: str, body: bytes) -> dict[str, list[str]]:
    """The POST's form fields: multipart/form-data, else (urlencoded, or no or another type) as urlencoded."""
    if content_type == "multipart/form-data":
        parser = email.parser.BytesParser(policy=email.policy.HTTP)
        msg = parser.parsebytes(b"Content-Type: " + raw_content_type.encode("latin-1") + b"\r\n\r\n" + body)
        fields: dict[str, list[str]] = {}
        if msg.is_multipart():
            for part in msg.iter_parts():
                name = part.get_param("name", header="content-disposition")
                payload = part.get_payload(decode=True)
                if isinstance(name, str) and isinstance(payload, bytes):
                    fields.setdefault(name, []).append(payload.decode("utf-8", "replace").strip())
        return fields
    return parse_qs(body.decode("utf-8", "replace").strip(), keep_blank_values=True)


def add_unsubscribe_routes(
    app: web.Application, unsubscribe: Unsubscribe, record: Record, *, prefix: str = "/u"
) -> None:
    """Add ``POST`` and ``GET {prefix}/{token}`` to *app* (before it starts)."""

    async def post(request: web.Request) -> web.Response:
        found = unsubscribe.verify(request.match_info["token"])
        if found is None:
            return _text("This unsubscribe link is not valid.", 400)
        try:
            body = await _body(request)
        except _TooLarge:
            return _text(f"Request body over {MAX_BODY} bytes.", 413)
        try:
            form = _form(request.content_type, request.headers.get("Content-Type", ""), body)
        except (ValueError, LookupError):
            form = {}
        if "One-Click" not in form.get("List-Unsubscribe", []):
            return _text("The request body must be List-Unsubscribe=One-Click (RFC 8058).", 400)
        list_tag, recipient = found
        try:
            await record(recipient, list_tag, "one-click")
        except Exception:
            log.exception("unsubscribe of a recipient from list %r could not be recorded", list_tag)
            return _text("The unsubscribe could not be recorded now; please try again.", 503, {"Retry-After": "60"})
        log.info("one-click unsubscribe recorded for list %r", list_tag)
        if "text/html" in request.headers.get("Accept", ""):  # the landing page's button, in a browser
            return _page("Unsubscribed", f"<p>{html.escape(recipient)} will get no more mail from "
                                         f"{html.escape(list_tag)}.</p>")
        return _text("Unsubscribed.")

    async def landing(request: web.Request) -> web.Response:
        found = unsubscribe.verify(request.match_info["token"])
        if found is None:
            return _page("Invalid link", "<p>This unsubscribe link is not valid.</p>", 400)
        list_tag, recipient = found
        # No action attribute: the form posts back to this very URL.
        return _page("Unsubscribe", (
            f"<p>Stop mail from <b>{html.escape(list_tag)}</b> to <b>{html.escape(recipient)}</b>?</p>"
            '<form method="post"><input type="hidden" name="List-Unsubscribe" value="One-Click">'
            '<button type="submit">Unsubscribe</button></form>'
        ))

    app.router.add_post(prefix + "/{token}", post)
    app.router.add_get(prefix + "/{token}", landing)
