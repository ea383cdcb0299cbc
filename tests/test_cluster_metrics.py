"""A cluster node's state on /metrics (what an operator alerts on): degraded mode and Redis round trips.

A real redis-server (tests/redisproc.py) of its own, killed in the middle;
the metrics rendered by the service's collector and read back with
prometheus-client's own parser.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fastmta.delivery.config import config_from_dict
from fastmta.delivery.engine import Engine, Status
from fastmta.serve.metrics import ServiceMetrics
from fastmta.sink import ListenerConfig, SinkConfig, SinkServer
from redisproc import have_redis, redis_server

pytestmark = pytest.mark.skipif(not have_redis(), reason="redis-server is not installed (Debian: redis-server)")


def _samples(metrics: ServiceMetrics) -> dict[str, float]:
    body, _ = metrics.render()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            if s.name.startswith("fastmta_cluster_"):
                label = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{label}}}" if label else s.name] = s.value
    return out


def test_metrics_show_redis_calls_and_degraded_mode_when_redis_dies() -> None:
    async def main() -> tuple[dict[str, float], dict[str, float], list[Status]]:
        sink = SinkServer(SinkConfig(listeners=(ListenerConfig("127.0.0.1", 0),), starttls=False))
        host, port = (await sink.start())[0]
        with redis_server() as redis:
            cfg = config_from_dict({
                "routing": {"static": {"*": [f"{host}:{port}"]}}, "smtp": {"tls": "never"},
                "cluster": {"redis": redis.url, "node": "n1", "prefix": f"metrics:{time.monotonic_ns()}:",
                            "batch": 0.1, "timeout": 0.3, "retry": 0.3, "nodes_hint": 2,
                            "limit": [{"scope": "site", "rate": "200/s", "burst": 10}]},
            })
            statuses: list[Status] = []
            try:
                async with Engine(cfg) as engine:
                    metrics = ServiceMetrics(engine, process=False)

                    async def send(n: int, tag: str) -> None:
                        ids = [await engine.submit(b"Subject: m\r\n\r\nhi\r\n", "s@a.test", [f"{tag}{i}@b.test"])
                               for i in range(n)]
                        outs = await asyncio.wait_for(asyncio.gather(*(engine.result(i) for i in ids)), 30)
                        statuses.extend(o.status for out in outs for o in out)

                    await send(20, "a")
                    before = _samples(metrics)
                    redis.kill()
                    await send(20, "b")  # the limiter's next batch finds Redis gone: degraded, still delivering
                    after = _samples(metrics)
            finally:
                await sink.close()
        return before, after, statuses

    before, after, statuses = asyncio.run(main())
    assert statuses == [Status.DELIVERED] * 40  # nothing lost because Redis died
    assert before["fastmta_cluster_degraded"] == 0
    assert before["fastmta_cluster_redis_calls_total"] >= 1
    assert before["fastmta_cluster_degraded_episodes_total"] == 0
    assert after["fastmta_cluster_degraded"] == 1
    assert after["fastmta_cluster_degraded_episodes_total"] == 1
    assert "fastmta_cluster_throttle_total{what=cuts}" in after  # the shared throttle's counters are exported
