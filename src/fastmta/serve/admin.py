"""The admin API: look into the queue and act on it (what ``fastmta queue`` talks to).

Endpoints (JSON in, JSON out; errors ``{"error": ...}`` with 400, 404, 501)::

    GET  /v1/queue/summary              -> {"queues": engine.control.summary()}: a row per (source, site)
                                           {kind, source, site, ready, scheduled, in_flight, held, connections,
                                           throttle, suspended_by, oldest_age, ...}, then a "total" row
    GET  /v1/queue/messages/{id}        -> the message and each recipient's state (404 unknown)
    POST /v1/queue/suspend|resume|retry|delete   {"target": T}
    POST /v1/queue/override                      {"target": "campaign:ID"}  (a campaign the reputation guard paused)
    POST /v1/queue/bounce               {"target": T, "reason": "..."}
    POST /v1/queue/suspend              {"target": T, "duration": SECONDS, "reason": "..."} (both optional)
                                        -> what engine.control did (e.g. how many recipients)
    GET  /v1/queue/why?target=ADDRESS_OR_ID -> why it is (not) moving

A target is ``site:NAME``, ``domain:NAME``, ``campaign:ID``, a message id
or a bare word (engine.control resolves it).

Served on a unix socket without a token (the socket's 0600 mode is the
access control, as Postfix's and Exim's local admin interfaces do) and
optionally on a loopback TCP port with admin tokens (``require_token``).
The service starts the sites; this module only builds the application.
"""

from __future__ import annotations

import inspect
import json
import logging
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from fastmta.errors import FastMTAError, InputError
from fastmta.serve.api import ServiceAPI
from fastmta.serve.http_api import (
    MAX_SIZE,
    ApiError,
    bearer_auth_middleware,
    bearer_principal,
    error_middleware,
    json_response,
    message_status,
)

__all__ = ["ACTIONS", "DEFAULT_ADMIN_SOCKET", "build_admin_app"]

log = logging.getLogger("fastmta.serve.admin")

#: Where ``fastmta serve`` listens for admin requests and ``fastmta queue`` connects by default
#: (``$FASTMTA_ADMIN_SOCKET`` overrides it for the client).
DEFAULT_ADMIN_SOCKET = "/var/lib/fastmta/admin.sock"

#: POST /v1/queue/{action}: the engine.control method of the same name.
ACTIONS = ("suspend", "resume", "retry", "bounce", "delete", "override")

#: Admin requests are small (a target and a reason).
_MAX_REQUEST = 64 * 1024

_SERVICE = web.AppKey("admin_service", ServiceAPI)


def build_admin_app(service: ServiceAPI, *, require_token: bool) -> web.Application:
    """The admin API over *service*; with *require_token*, every /v1/ request needs an admin token."""
    middlewares: list[Middleware] = [error_middleware]
    if require_token:
        middlewares.append(bearer_auth_middleware(service.admin_principal))
    app = web.Application(client_max_size=_MAX_REQUEST, middlewares=middlewares)
    app[_SERVICE] = service
    app[MAX_SIZE] = _MAX_REQUEST
    app.router.add_get("/v1/queue/summary", _summary)
    app.router.add_get("/v1/queue/messages/{id}", _show)
    app.router.add_post("/v1/queue/{action}", _act)
    app.router.add_get("/v1/queue/why", _why)
    return app


def _control(request: web.Request) -> Any:
    control = getattr(request.app[_SERVICE].engine, "control", None)
    if control is None:
        raise ApiError(501, "queue control is not available in this engine")
    return control


async def _call(method: Any, *args: Any, **kwargs: Any) -> Any:
    """Call a control method (plain or async) and map its refusals to HTTP answers."""
    try:
        result = method(*args, **kwargs)
        if inspect.isawaitable(result):
            result = await result
    except KeyError as exc:
        # KeyError's str() is the repr of its argument: show the message itself.
        raise ApiError(404, str(exc.args[0]) if exc.args else "not found") from None
    except InputError as exc:
        raise ApiError(400, exc.reason) from None
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    except FastMTAError as exc:
        # E.g. the suspensions file cannot be written: the operator is local and needs the reason.
        raise ApiError(500, str(exc)) from None
    return result


async def _summary(request: web.Request) -> web.Response:
    control = getattr(request.app[_SERVICE].engine, "control", None)
    if control is None:
        # Without queue control the engine's own per-(source, site) figures still answer "what is queued".
        rows = request.app[_SERVICE].engine.queue_stats()
    else:
        rows = await _call(control.summary)
    return json_response({"queues": rows})


async def _show(request: web.Request) -> web.Response:
    return json_response(await message_status(request.app[_SERVICE].engine, request.match_info["id"]))


async def _act(request: web.Request) -> web.Response:
    action = request.match_info["action"]
    if action not in ACTIONS:
        raise ApiError(404, f"unknown action {action!r} (expected: {', '.join(ACTIONS)})")
    data = await _body(request)
    target = data.get("target")
    if not isinstance(target, str) or not target.strip():
        raise ApiError(400, "missing field target (site:NAME, domain:NAME, campaign:ID, a message id)",
                       field="target")
    reason, duration = data.get("reason"), data.get("duration")
    if reason is not None and not isinstance(reason, str):
        raise ApiError(400, "reason must be a string", field="reason")
    if duration is not None and (isinstance(duration, bool) or not isinstance(duration, (int, float))):
        raise ApiError(400, "duration must be a number of seconds", field="duration")
    for key in data:
        if key not in ("target", "reason", "duration"):
            raise ApiError(400, f"unknown field {key!r} (expected: target, reason, duration)", field=key)
    if reason is not None and action not in ("bounce", "suspend"):
        raise ApiError(400, f"reason is for bounce and suspend only, not {action}", field="reason")
    if duration is not None and action != "suspend":
        raise ApiError(400, f"duration is for suspend only, not {action}", field="duration")
    control = _control(request)
    who = bearer_principal(request, request.app[_SERVICE].admin_principal) or "local socket"
    # Operator actions change what happens to mail: on record, with who did it.
    log.warning("admin %s: %s %r%s", who, action, target, f" reason {reason!r}" if reason else "")
    if action == "override":
        # A campaign the reputation guard paused: resume it and let it finish whatever its figures.
        kind, _, campaign = target.strip().partition(":")
        if kind != "campaign" or not campaign:
            raise ApiError(400, "override takes campaign:ID", field="target")
        return json_response(await _call(request.app[_SERVICE].engine.guard.override, campaign))
    method = getattr(control, action)
    if action == "bounce" and reason is not None:
        result = await _call(method, target, reason=reason)
    elif action == "suspend":
        result = await _call(method, target, duration=duration, reason=reason or "")
    else:
        result = await _call(method, target)
    return json_response(result)


async def _why(request: web.Request) -> web.Response:
    target = request.query.get("target", "")
    if not target.strip():
        raise ApiError(400, "missing query parameter target (an address or message id)", field="target")
    return json_response(await _call(_control(request).why, target))


async def _body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        data = json.loads(raw) if raw.strip() else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"malformed JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return data
