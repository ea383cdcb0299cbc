"""TLS per site ([sites."PATTERN"] tls / tls_verify; Postfix's smtp_tls_policy_maps, PowerMTA's
use-starttls / require-starttls): a partner over TLS or not at all, another never, the rest as [smtp] says."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from fastmta.delivery.config import config_from_dict
from fastmta.delivery.engine import Engine
from fastmta.errors import ConfigError
from fastmta.queue.records import Status
from fastmta.sink import SinkServer
from fastmta.sink.config import ListenerConfig, SinkConfig

Run = Callable[[Coroutine[Any, Any, Any]], Any]
BODY = b"From: a@sender.test\r\nTo: x@y.test\r\nSubject: tls\r\n\r\nhello\r\n"
# domain -> (sink address, offers STARTTLS, the site's [sites] entry)
SITES = {
    "default.test": ("127.0.0.2", True, {}),
    "never.test": ("127.0.0.4", True, {"tls": "never"}),
    "required.test": ("127.0.0.3", False, {"tls": "required"}),
    "verify.test": ("127.0.0.5", True, {"tls_verify": True}),  # the sink's own certificate: nobody can verify it
    "verify-clear.test": ("127.0.0.6", False, {"tls_verify": True}),  # no STARTTLS: never in clear instead
}


def test_each_site_gets_its_own_tls_policy(run: Run) -> None:
    async def main() -> None:
        sinks = {d: SinkServer(SinkConfig(listeners=(ListenerConfig(ip, 0),), starttls=tls))
                 for d, (ip, tls, _) in SITES.items()}
        routes = {}
        for d, sink in sinks.items():
            (host, port), = await sink.start()
            routes[d] = [f"{host}:{port}"]
        cfg = config_from_dict({
            "routing": {"static": routes},
            "queue": {"retry_initial": 30, "retry_jitter": 0.0},
            "sites": {**{f"{ip}:*": {**entry, "adaptive": {"enabled": False}} for ip, _, entry in SITES.values()}},
        })
        try:
            async with Engine(cfg) as engine:
                ids = {d: await engine.submit(BODY, "a@sender.test", [f"r@{d}"]) for d in SITES}
                done = {d: (await asyncio.wait_for(engine.result(ids[d]), 20))[0] for d in ("default.test", "never.test")}
                await asyncio.sleep(0.5)
                assert done["default.test"].status is Status.DELIVERED and done["default.test"].tls_version
                assert done["never.test"].status is Status.DELIVERED and done["never.test"].tls_version is None
                assert engine.counts["deferred"] == 3  # required in clear; a certificate that cannot be verified, or none
            assert {d: s.stats.messages for d, s in sinks.items()} == {
                "default.test": 1, "never.test": 1, "required.test": 0, "verify.test": 0, "verify-clear.test": 0}
            assert sinks["never.test"].stats.tls_sessions == 0 and sinks["default.test"].stats.tls_sessions == 1
        finally:
            for sink in sinks.values():
                await sink.close()

    run(main())


def test_a_site_tls_policy_is_checked() -> None:
    with pytest.raises(ConfigError, match="tls must be"):
        config_from_dict({"sites": {"*.example": {"tls": "sometimes"}}})
