"""Rate specs and the GCRA limiter, on explicit times."""

from __future__ import annotations

import pytest

from fastmta.delivery.ratelimit import Gcra, RateSpec, RateSpecError, parse_rate


@pytest.mark.parametrize(
    ("text", "limit", "period"),
    [("20/s", 20, 1.0), ("50/min", 50, 60.0), ("1,000/h", 1000, 3600.0), ("10_000/day", 10000, 86400.0),
     ("100/5min", 100, 300.0), (" 7 / hour ", 7, 3600.0), ("3/d", 3, 86400.0)],
)  # fmt: skip
def test_parse(text: str, limit: int, period: float) -> None:
    spec = parse_rate(text)
    assert (spec.limit, spec.period) == (limit, period)


@pytest.mark.parametrize(
    ("text", "message"),
    [("5/fortnight", "unknown unit 'fortnight'"), ("fast", "expected 'N/unit'"), ("0/s", "at least 1"),
     ("-1/s", "expected 'N/unit'"), ("10", "expected 'N/unit'"), ("5/0s", "period must be positive")],
)  # fmt: skip
def test_parse_errors(text: str, message: str) -> None:
    with pytest.raises(RateSpecError, match=message):
        parse_rate(text)


def test_str_round_trip() -> None:
    assert str(parse_rate("1,000/hour")) == "1000/h" and str(parse_rate("100/5min")) == "100/300s"
    assert parse_rate("20/s").per_second == 20.0


def test_gcra_spec_allows_burst_then_paces() -> None:
    g = Gcra.from_spec(parse_rate("10/min"))  # burst 10, then one per 6 s
    assert all(g.try_take(0.0) == 0.0 for _ in range(10))
    assert g.try_take(0.0) == pytest.approx(6.0)
    assert g.try_take(5.9) == pytest.approx(0.1)
    assert g.try_take(6.0) == 0.0 and g.wait(6.0) == pytest.approx(6.0)


def test_gcra_smoothing_burst_and_weights() -> None:
    g = Gcra.from_spec(RateSpec(100, 1.0, burst=5))
    assert g.try_take(0.0, 5) == 0.0
    assert g.wait(0.0) == pytest.approx(0.01)
    g2 = Gcra(1.0, burst=2)
    assert g2.wait(0.0, 10) == 0.0  # heavier than the burst: goes when idle, then pays
    g2.take(0.0, 10)
    assert g2.wait(5.0) == pytest.approx(4.0)


def test_gcra_rate_change_caps_old_debt() -> None:
    g = Gcra(10.0)  # 0.1/s
    g.take(0.0)
    assert g.wait(0.0) == pytest.approx(10.0)
    g.set_rate(10.0, 0.0)
    assert g.wait(0.0) == pytest.approx(0.1)
