"""The HTTP injection API: messages and templated campaigns in, per-recipient status out.

Endpoints (``/v1/*`` need ``Authorization: Bearer TOKEN``; health and metrics do not)::

    POST /v1/messages        {"sender", "recipients": [...], "content" | "content_base64", "meta"?}
                             or Content-Type: message/rfc822, envelope in ?sender=&recipient=&recipient=
                             -> 202 {"id", "recipients": n}
    POST /v1/campaigns       {"sender", "campaign"?, "template": {...}, "recipients": [{"email", "data"?, "meta"?}]}
                             -> 202 {"campaign", "accepted": [{"email", "id"}], "rejected": [{"email", "index", "error"}]}
    GET  /v1/messages/{id}   -> 200 {"id", "final", "recipients": [...]} (engine.control.show: queued recipients'
                             state, or the accounting records of final ones), 404 unknown
    GET  /healthz            -> 200 while the process runs
    GET  /readyz             -> 200 ready, 503 {"ready": false, "reason"}
    GET  /metrics            -> the Prometheus exposition

A 202 is sent only after :meth:`ServiceAPI.inject` returned, i.e. once the
message is in the journal: a client that got its id may forget the message.
Every error is JSON ``{"error": ..., "field": ...}`` (``field`` names the
request field at fault when there is one): 400 bad input, 401 no or unknown
token, 413 over the size limit, 415 wrong content type, 503 with
``Retry-After`` when the service cannot store mail now.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import inspect
import json
import logging
import re
import secrets
import urllib.parse
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from fastmta.errors import ConfigError, InputError
from fastmta.intake.campaign import merge_field_error
from fastmta.message.mime import CampaignTemplate, CompiledCampaign, compile_campaign
from fastmta.queue.records import mailbox_key, once_each, split_address
from fastmta.serve.api import ServiceAPI, Unavailable
from fastmta.serve.config import SERVICE_META

log = logging.getLogger("fastmta.serve.http")

__all__ = [
    "DEFAULT_MAX_REQUEST_SIZE",
    "MAX_SIZE",
    "RETRY_AFTER",
    "ApiError",
    "bearer_auth_middleware",
    "bearer_principal",
    "build_api_app",
    "error_middleware",
    "json_response",
    "message_status",
]

#: The largest request body (a message, or a campaign with its recipients).
DEFAULT_MAX_REQUEST_SIZE = 50 * 1024 * 1024
#: Seconds a client is asked to wait when the service cannot take mail.
RETRY_AFTER = 15
#: Meta reaches accounting (one JSON line per recipient outcome): kept small and plain.
MAX_META_KEYS = 32
#: Rows of one /v1/campaigns request (its answer has one entry a row).
MAX_CAMPAIGN_ROWS = 100_000
MAX_META_SIZE = 4096
_META_KEY = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f]")
#: Campaign recipients injected at once: concurrent injects share the journal's group-commit fsync.
_INJECT_WINDOW = 64

_SERVICE = web.AppKey("service", ServiceAPI)
MAX_SIZE = web.AppKey("max_request_size", int)


class ApiError(Exception):
    """An error answer: status, message and (for bad input) the request field at fault."""

    def __init__(
        self, status: int, message: str, *, field: str | None = None, headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.headers = headers or {}
        self.extra = extra


def _dumps(data: Any) -> str:
    # default=str: control results may hold enums or paths; ensure_ascii keeps
    # every answer 7-bit, so no control character reaches a client's terminal raw.
    return json.dumps(data, default=str)


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(data, status=status, headers=headers, dumps=_dumps)


def _error_body(exc: ApiError) -> dict[str, Any]:
    body: dict[str, Any] = {"error": exc.message}
    if exc.field is not None:
        body["field"] = exc.field
    body.update(exc.extra)
    return body


@web.middleware
async def error_middleware(
    request: web.Request, handler: Handler
) -> web.StreamResponse:
    """Every error as JSON (aiohttp's own 404/405/413 included), so a client parses one shape."""
    try:
        return await handler(request)
    except ApiError as exc:
        return json_response(_error_body(exc), exc.status, exc.headers)
    except web.HTTPRequestEntityTooLarge as exc:
        limit = request.app.get(MAX_SIZE)
        return json_response({"error": f"request body over the limit of {limit} bytes"}, exc.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "www-authenticate")}
        return json_response({"error": exc.reason}, exc.status, headers)
    except ConnectionResetError:
        # The client went away (or the connection guard closed a body too slow): nothing to answer,
        # and no bug of ours to log with a traceback.
        log.debug("%s %s: the client's connection closed", request.method, request.path)
        return json_response({"error": "connection closed"}, 400)
    except Exception:
        # Logged with its traceback here; the client gets JSON like every other error, without internals.
        log.exception("%s %s failed", request.method, request.path)
        return json_response({"error": "internal error (logged by the server)"}, 500)


def bearer_auth_middleware(check: Callable[[str], str | None], *, prefix: str = "/v1/") -> Middleware:
    """Require ``Authorization: Bearer T`` with *check(T)* naming a principal on paths under *prefix*."""

    @web.middleware
    async def auth(
        request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        if request.path.startswith(prefix):
            token = _bearer_token(request)
            if token is None:
                raise ApiError(401, "authorization required: send 'Authorization: Bearer TOKEN'",
                               headers={"WWW-Authenticate": 'Bearer realm="fastmta"'})
            if check(token) is None:
                raise ApiError(401, "unknown token",
                               headers={"WWW-Authenticate": 'Bearer realm="fastmta", error="invalid_token"'})
        return await handler(request)

    return auth


def _bearer_token(request: web.Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def bearer_principal(request: web.Request, check: Callable[[str], str | None]) -> str | None:
    """Who the request's bearer token names (the auth middleware already refused unknown ones)."""
    # Asked again rather than kept on the request: aiohttp's typed request
    # keys are newer than the aiohttp this package supports.
    token = _bearer_token(request)
    return None if token is None else check(token)


def build_api_app(service: ServiceAPI, *, max_request_size: int = DEFAULT_MAX_REQUEST_SIZE) -> web.Application:
    """The injection API over *service*; the caller runs it (``web.AppRunner`` + a site)."""
    app = web.Application(
        client_max_size=max_request_size,
        middlewares=[error_middleware, bearer_auth_middleware(service.http_principal)],
    )
    app[_SERVICE] = service
    app[MAX_SIZE] = max_request_size
    app.router.add_post("/v1/messages", _post_message)
    app.router.add_post("/v1/campaigns", _post_campaign)
    app.router.add_get("/v1/messages/{id}", _get_message)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    return app


# ------------------------------------------------------------------ health


async def _healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    ready, why = request.app[_SERVICE].ready()
    if ready:
        return json_response({"ready": True})
    return json_response({"ready": False, "reason": why}, 503, {"Retry-After": str(RETRY_AFTER)})


async def _metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[_SERVICE].render_metrics()
    # Set as a header: aiohttp's content_type= refuses the charset parameter the exposition carries.
    return web.Response(body=body, headers={"Content-Type": content_type})


def _require_ready(service: ServiceAPI) -> None:
    """503 before the body is read: a client is not made to upload 50 MB to be told to come back."""
    ready, why = service.ready()
    if not ready:
        raise ApiError(503, f"not accepting mail: {why}", headers={"Retry-After": str(RETRY_AFTER)})


def _unavailable(exc: Unavailable) -> ApiError:
    return ApiError(503, f"not accepting mail: {exc}", headers={"Retry-After": str(RETRY_AFTER)})


# ------------------------------------------------------------------ request parsing


async def _json_object(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise ApiError(415, f"expected Content-Type: application/json, got {request.content_type}")
    raw = await request.read()  # over client_max_size: 413 (error_middleware)
    try:
        data = json.loads(raw)
    except UnicodeDecodeError:
        raise ApiError(400, "request body is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:  # [[[[...]]]] thousands deep: a 500 before
        raise ApiError(400, "malformed JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return data


def _check_keys(obj: dict[str, Any], allowed: tuple[str, ...], where: str = "") -> None:
    # Unknown fields are refused, not ignored: "recipient" for "recipients"
    # would otherwise be a message sent to nobody or to the wrong list.
    for key in obj:
        if key not in allowed:
            raise ApiError(400, f"unknown field {key!r} (expected: {', '.join(allowed)})", field=f"{where}{key}")


def _string(obj: dict[str, Any], key: str, where: str = "", *, required: bool = True) -> str | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise ApiError(400, f"missing field {where}{key}", field=f"{where}{key}")
        return None
    if not isinstance(value, str):
        raise ApiError(400, f"{where}{key} must be a string", field=f"{where}{key}")
    return value


def _address(value: Any, field: str, what: str) -> str:
    if not isinstance(value, str):
        raise ApiError(400, f"{field} must be a string address", field=field)
    if what == "sender" and value == "":
        return value  # the null reverse-path (a bounce or DSN)
    try:
        return split_address(value, what)[0]
    except InputError as exc:
        raise ApiError(400, exc.reason, field=field) from None


def _recipients(value: Any, field: str = "recipients") -> list[str]:
    if value is None:
        raise ApiError(400, f"missing field {field}", field=field)
    if not isinstance(value, list) or not value:
        raise ApiError(400, f"{field} must be a non-empty list of addresses", field=field)
    # Each once (the engine keeps one of a duplicate too): the count answered is the count queued.
    return list(once_each([_address(r, f"{field}[{i}]", "recipient") for i, r in enumerate(value)]))


def _meta(value: Any, field: str) -> dict[str, str]:
    """Caller-supplied meta: string values only, small, single-line (it lands in accounting and logs)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ApiError(400, f"{field} must be an object of strings", field=field)
    if len(value) > MAX_META_KEYS:
        raise ApiError(400, f"{field} has {len(value)} keys; at most {MAX_META_KEYS}", field=field)
    size = 0
    for key, item in value.items():
        if not _META_KEY.fullmatch(key):
            raise ApiError(400, f"{field} key {key!r}: 1-64 characters of A-Z a-z 0-9 _ . -", field=f"{field}.{key}")
        if key in SERVICE_META:  # how it came in (via, auth), DSN parameters, where it went: the service's to say
            raise ApiError(400, f"{field}.{key} is reserved", field=f"{field}.{key}")
        if not isinstance(item, str):
            raise ApiError(400, f"{field}.{key} must be a string", field=f"{field}.{key}")
        if _CONTROL.search(item):
            raise ApiError(400, f"{field}.{key} contains a control character", field=f"{field}.{key}")
        try:
            size += len(key) + len(item.encode())
        except UnicodeEncodeError:
            raise ApiError(400, f"{field}.{key} is not valid Unicode (a lone surrogate)", field=f"{field}.{key}") from None
    if size > MAX_META_SIZE:
        raise ApiError(400, f"{field} is {size} bytes; at most {MAX_META_SIZE}", field=field)
    return dict(value)


def _inject_error_field(exc: InputError) -> str | None:
    """Which request field an InputError from inject is about (addresses were checked before)."""
    reason = exc.reason.lower()
    if reason.startswith("meta."):  # "meta.pool: ...": what the engine said of a meta key
        return reason.split(":", 1)[0]
    for prefix, field in (("sender", "sender"), ("recipient", "recipients"), ("message", "content")):
        if reason.startswith(prefix):
            return field
    return None


# ------------------------------------------------------------------ messages


async def _post_message(request: web.Request) -> web.Response:
    service = request.app[_SERVICE]
    try:
        _require_ready(service)
        if request.content_type == "message/rfc822":
            content, sender, recipients, meta = await _raw_message(request)
        else:
            data = await _json_object(request)
            _check_keys(data, ("sender", "recipients", "content", "content_base64", "meta"))
            if "sender" not in data:
                raise ApiError(400, "missing field sender", field="sender")
            sender = _address(data["sender"], "sender", "sender")
            recipients = _recipients(data.get("recipients"))
            content = _content(data)
            meta = _meta(data.get("meta"), "meta")
    except ApiError as exc:  # refused before inject, which counts its own refusals
        service.refused("http", "unavailable" if exc.status == 503 else "invalid")
        raise
    except web.HTTPRequestEntityTooLarge:
        service.refused("http", "too_big")
        raise
    try:
        message_id = await service.inject(content, sender, recipients, via="http", meta=meta or None)
    except InputError as exc:
        raise ApiError(400, exc.reason, field=_inject_error_field(exc)) from None
    except Unavailable as exc:
        raise _unavailable(exc) from None
    return json_response({"id": message_id, "recipients": len(recipients)}, 202)


def _content(data: dict[str, Any]) -> bytes:
    text, b64 = data.get("content"), data.get("content_base64")
    if (text is None) == (b64 is None):
        raise ApiError(400, "give exactly one of content (text) or content_base64 (8-bit or binary)",
                       field="content")
    if text is not None:
        if not isinstance(text, str):
            raise ApiError(400, "content must be a string (the RFC 5322 message)", field="content")
        try:
            content = text.encode("utf-8")
        except UnicodeEncodeError as exc:  # a JSON "\ud800": it went out as bytes that are no UTF-8 at all
            raise ApiError(400, f"content is not valid Unicode (a lone surrogate at character {exc.start}); "
                           "send 8-bit or binary content as content_base64", field="content") from None
    else:
        if not isinstance(b64, str):
            raise ApiError(400, "content_base64 must be a base64 string", field="content_base64")
        try:
            content = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "content_base64 is not valid base64", field="content_base64") from None
    if not content:
        raise ApiError(400, "the message is empty", field="content" if text is not None else "content_base64")
    return content


async def _raw_message(request: web.Request) -> tuple[bytes, str, list[str], dict[str, str]]:
    """``message/rfc822`` body, envelope in the query string (as KumoMTA's and SES's raw injection)."""
    try:
        # aiohttp decodes the query leniently: an address of bytes that are not UTF-8 became one of
        # U+FFFD, which the client never gave, and was relayed (found by an attack on serve).
        urllib.parse.parse_qsl(request.rel_url.raw_query_string, keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        raise ApiError(400, "the query string is not UTF-8 once percent-decoded", field="sender") from None
    query = request.query
    for key in query:
        if key not in ("sender", "recipient"):
            raise ApiError(400, f"unknown query parameter {key!r} (expected: sender, recipient)", field=key)
    senders = query.getall("sender", [])
    if len(senders) != 1:
        raise ApiError(400, "give the envelope sender once: ?sender=ADDRESS", field="sender")
    sender = _address(senders[0], "sender", "sender")
    recipients = _recipients(query.getall("recipient", []) or None, "recipient")
    content = await request.read()
    if not content:
        raise ApiError(400, "the message (request body) is empty", field="content")
    return content, sender, recipients, {}


async def _get_message(request: web.Request) -> web.Response:
    engine = request.app[_SERVICE].engine
    return json_response(await message_status(engine, request.match_info["id"]))


async def message_status(engine: Any, message_id: str) -> dict[str, Any]:
    """The queue's view of one message (engine.control), else what the engine's results know; 404 if none."""
    control = getattr(engine, "control", None)
    try:
        if control is not None:
            shown = control.show(message_id)
            result: dict[str, Any] = await shown if inspect.isawaitable(shown) else shown
            return result
        future = engine.result(message_id)
    except KeyError:
        raise ApiError(404, f"unknown message {message_id!r}", field="id") from None
    if not future.done():
        return {"id": message_id, "final": False, "recipients": []}
    outcomes = future.result()
    return {"id": message_id, "final": True, "recipients": [o.as_record() for o in outcomes]}


# ------------------------------------------------------------------ campaigns

#: The API's template: inline text only. No *_file or attachments keys: a
#: client must not be able to make the server read its own files into mail.
_TEMPLATE_KEYS = ("from", "to", "subject", "headers", "text", "html", "message_id_domain")
_SHORTHAND = {"from": "From", "to": "To", "subject": "Subject"}


async def _post_campaign(request: web.Request) -> web.Response:
    service = request.app[_SERVICE]
    _require_ready(service)
    data = await _json_object(request)
    _check_keys(data, ("sender", "campaign", "template", "recipients"))
    if "sender" not in data:
        raise ApiError(400, "missing field sender", field="sender")
    sender = _address(data["sender"], "sender", "sender")
    campaign = _string(data, "campaign", required=False) or f"http-{secrets.token_hex(8)}"
    if len(campaign) > 128 or _CONTROL.search(campaign) or "\t" in campaign:
        raise ApiError(400, "campaign must be 1-128 characters on one line", field="campaign")
    template = data.get("template")
    if not isinstance(template, dict):
        raise ApiError(400, "missing field template (an object)", field="template")
    bad = _lone_surrogate({"campaign": campaign, "template": template})
    if bad is not None:  # it reached the renderer and gave a 500 (found by an attack on serve)
        raise ApiError(400, f"{bad}: not valid Unicode (a lone surrogate, as JSON's \\ud800)", field=bad)
    compiled, field_of = _compile(template)
    rows = data.get("recipients")
    if not isinstance(rows, list) or not rows:
        raise ApiError(400, "recipients must be a non-empty list of {email, data, meta} objects", field="recipients")
    if len(rows) > MAX_CAMPAIGN_ROWS:  # each row is answered: a bound on the answer and on the work of one request
        raise ApiError(413, f"recipients has {len(rows)} rows; at most {MAX_CAMPAIGN_ROWS} a request", field="recipients")

    accepted: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    stopped: str | None = None  # why injecting stopped (the service became unavailable)
    seen: dict[str, int] = {}  # each recipient once a request (its first row), as a `send` campaign does
    # Rendered and injected a window at a time: the rendered messages held at
    # once stay bounded, and the loop serves others between windows.
    for start in range(0, len(rows), _INJECT_WINDOW):
        window: list[tuple[int, str, bytes, dict[str, str]]] = []
        for index, row in enumerate(rows[start : start + _INJECT_WINDOW], start):
            email = row.get("email") if isinstance(row, dict) else None
            email = email if isinstance(email, str) else None
            if stopped is not None:
                rejected.append({"email": email, "index": index, "error": stopped, "retry": True})
                continue
            try:
                part = (index, *_render(compiled, field_of, row, campaign))
            except _RowError as exc:
                rejected.append({"email": email, "index": index, "error": str(exc)})
                continue
            first = seen.setdefault(mailbox_key(part[1]), index)
            if first != index:
                rejected.append({"email": email, "index": index,
                                 "error": f"duplicate recipient {part[1]!r} (row {first}): sent once"})
                continue
            window.append(part)
        await asyncio.sleep(0)  # a window of rows that all failed to render awaited nothing: others wait no longer
        results = await asyncio.gather(
            *(service.inject(*_campaign_parts(service, campaign, email, sender, message), via="http", meta=meta)
              for _, email, message, meta in window),
            return_exceptions=True,
        )
        for (index, email, _, _), result in zip(window, results):
            if isinstance(result, str):
                accepted.append({"email": email, "id": result, "index": index})
            elif isinstance(result, InputError):
                rejected.append({"email": email, "index": index, "error": result.reason})
            elif isinstance(result, Unavailable):
                stopped = f"not accepting mail: {result}"
                rejected.append({"email": email, "index": index, "error": stopped, "retry": True})
            elif isinstance(result, Exception):
                # Not accepted (inject raised); logged with its traceback, and
                # reported rather than failing the rows already accepted.
                log.error("campaign %s row %d: inject failed", campaign, index, exc_info=result)
                rejected.append({"email": email, "index": index, "error": "internal error (logged by the server)",
                                 "retry": True})
            else:
                raise result  # a BaseException (cancellation): not ours to absorb
    if stopped is not None and not accepted:
        # Nothing stored: the whole request can simply be sent again later.
        raise ApiError(503, stopped, headers={"Retry-After": str(RETRY_AFTER)})
    accepted.sort(key=lambda a: a["index"])
    rejected.sort(key=lambda r: r["index"])
    return json_response({
        "campaign": campaign,
        "accepted": [{"email": a["email"], "id": a["id"]} for a in accepted],
        "rejected": rejected,
    }, 202)


class _RowError(Exception):
    """One campaign recipient that cannot be sent; reported in ``rejected``, the others go on."""


def _lone_surrogate(value: Any, path: str = "") -> str | None:
    """The first field (dotted path) of *value* holding a string that cannot be UTF-8, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _lone_surrogate(key, path) if isinstance(key, str) else None
        found = found or _lone_surrogate(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


def _compile(template: dict[str, Any]) -> tuple[CompiledCampaign, Callable[[str], str]]:
    """The compiled template, and how to name a template location ("template.headers.Subject") as the client did."""
    _check_keys(template, _TEMPLATE_KEYS, "template.")
    headers: dict[str, str] = {}
    shorthand_field: dict[str, str] = {}  # header name (lower) -> the API field it came from
    for key, name in _SHORTHAND.items():
        value = _string(template, key, "template.", required=False)
        if value is not None:
            headers[name] = value
            shorthand_field[name.lower()] = f"template.{key}"
    extra = template.get("headers", {})
    if not isinstance(extra, dict) or not all(isinstance(v, str) for v in extra.values()):
        raise ApiError(400, "template.headers must be an object of strings", field="template.headers")
    for name, value in extra.items():
        if name.lower() in shorthand_field:
            raise ApiError(400, f"header {name} is given twice (also as {shorthand_field[name.lower()]})",
                           field=f"template.headers.{name}")
        headers[name] = value
    headers.setdefault("To", "{{ email }}")  # the recipient, as a campaign job usually says
    text = _string(template, "text", "template.", required=False)
    html = _string(template, "html", "template.", required=False)
    mid_domain = _string(template, "message_id_domain", "template.", required=False)
    spec = CampaignTemplate(headers=headers, text=text, html=html, message_id_domain=mid_domain)

    def field_of(location: str) -> str:
        # "template.headers.Subject" -> "template.subject" when the client gave it that way.
        prefix = "template.headers."
        if location.startswith(prefix):
            return shorthand_field.get(location[len(prefix):].lower(), location)
        return location

    try:
        # base_dir is never used: the spec above has no file paths.
        return compile_campaign(spec, base_dir="/nonexistent", source="request"), field_of
    except InputError as exc:  # template syntax: names the part and the line
        where = field_of((exc.source or "").removeprefix("request:"))
        raise ApiError(400, exc.reason, field=where or "template", line=exc.line) from None
    except ConfigError as exc:
        text_ = str(exc).removeprefix("request: ")
        found = re.match(r"(template(?:\.[\w-]+)*)", text_)
        field = field_of(found.group(1)) if found else "template"
        required = re.search(r"(\w+) is required", text_)
        if required and required.group(1).lower() in _SHORTHAND:
            field = f"template.{required.group(1).lower()}"  # "From is required": the API calls it "from"
        raise ApiError(400, text_, field=field) from None


def _campaign_parts(
    service: ServiceAPI, campaign: str, email: str, sender: str, message: bytes
) -> tuple[bytes, str, list[str]]:
    """inject()'s (content, sender, recipients) for one rendered row: the service adds return path and headers."""
    envelope, content = service.campaign_message(campaign, email, sender, message)
    return content, envelope, [email]


def _render(
    compiled: CompiledCampaign, field_of: Callable[[str], str], row: Any, campaign: str
) -> tuple[str, bytes, dict[str, str]]:
    """(email, message, meta) for one recipient row, or _RowError saying why not."""
    if not isinstance(row, dict):
        raise _RowError("a recipient must be an object {email, data, meta}")
    unknown = [k for k in row if k not in ("email", "data", "meta")]
    if unknown:
        raise _RowError(f"unknown field {unknown[0]!r} (expected: email, data, meta)")
    email = row.get("email")
    if not isinstance(email, str) or not email:
        raise _RowError("missing field email")
    try:
        email = split_address(email)[0]  # the address to use (a trailing dot dropped): merge field, tokens, MACs
    except InputError as exc:
        raise _RowError(exc.reason) from None
    fields = row.get("data", {})
    if not isinstance(fields, dict):
        raise _RowError("data must be an object of merge fields")
    merge = {**fields, "email": email}
    bad = merge_field_error(merge)
    if bad is not None:
        raise _RowError(bad)
    try:
        meta = _meta(row.get("meta"), "meta")
    except ApiError as exc:
        raise _RowError(exc.message) from None
    if "job" in meta:
        raise _RowError("meta.job is reserved: it is the campaign id")
    try:
        message = compiled.render(merge, recipient_id=email)
    except InputError as exc:
        where = field_of((exc.source or "").removeprefix("request:"))
        raise _RowError(f"{where}:{exc.line}: {exc.reason}" if where else exc.reason) from None
    except (ValueError, TypeError) as exc:  # a value no check above foresaw: this row only, never the batch
        raise _RowError(f"cannot render this row: {type(exc).__name__}: {exc}") from None
    return email, message, {**meta, "job": campaign}



