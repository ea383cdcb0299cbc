"""``fastmta load --plot FILE.png``: throughput and latency over time.

matplotlib is optional (the ``plot`` extra): it is imported only here, only
when a plot is asked for, and a missing matplotlib is reported before the run
starts (``plot_available``) rather than after minutes of load.

Top panel: messages sent, completed and failed per second in each interval
(and the target rate in open loop). Bottom panel: message latency p50, p99
and max per interval on a log scale, because a stall is orders of magnitude
above the median and would flatten a linear axis.
"""

from __future__ import annotations

import math

from fastmta.load.report import LoadResult


def plot_available() -> str | None:
    """None when plotting works, else what to install."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib is not installed (pip install 'fastmta[plot]' or pip install matplotlib)"
    return None


def plot(result: LoadResult, path: str, title: str | None = None) -> None:
    """Write a PNG of *result*'s time series to *path*."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only, and no GUI toolkit import
    import matplotlib.pyplot as plt

    step = result.interval_s
    series = result.series
    t = [(k + 0.5) * step for k in range(len(series))]  # the middle of each interval
    per_s = 1.0 / step
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 7), sharex=True, constrained_layout=True)
    ax1.plot(t, [iv.sent * per_s for iv in series], label="sent/s", color="tab:blue", linewidth=1.5)
    ax1.plot(t, [iv.completed * per_s for iv in series], label="completed/s", color="tab:green", linewidth=1.0)
    failed = [iv.failed * per_s for iv in series]
    if any(failed):
        ax1.bar(t, failed, width=step * 0.8, label="failed/s", color="tab:red", alpha=0.5)
    if result.rate_target is not None:
        target = _target_curve(result, t)
        ax1.plot(t, target, label=f"target ({result.rate_target:g}/s)", color="black", linestyle="--", linewidth=1)
    ax1.set_ylabel("messages / s")
    ax1.set_ylim(bottom=0)
    ax1.grid(True, alpha=0.3)
    ax1.legend(loc="lower right", fontsize="small")

    def ms(values: list[int]) -> list[float]:
        return [v / 1e3 for v in values]

    has = [k for k, iv in enumerate(series) if iv.latency.count]
    tk = [t[k] for k in has]
    pcts = [series[k].latency.percentiles((50.0, 99.0)) for k in has]
    ax2.plot(tk, ms([p[50.0] for p in pcts]), label="p50", color="tab:blue", marker=".", linewidth=1.5)
    ax2.plot(tk, ms([p[99.0] for p in pcts]), label="p99", color="tab:orange", marker=".", linewidth=1.5)
    ax2.plot(tk, ms([series[k].latency.max for k in has]), label="max", color="tab:red", linewidth=0.8, alpha=0.7)
    if tk:
        ax2.set_yscale("log")
    ax2.set_ylabel("message latency (ms)")
    ax2.set_xlabel("seconds since start")
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend(loc="upper right", fontsize="small")
    total = result.latency_ms("message")
    heading = title or (
        f"fastmta load → {result.target}: {result.mode} loop, {result.connections} connections, "
        f"{result.messages_per_s:,.0f} msg/s accepted, p99 {total['p99']:.1f} ms"
    )
    fig.suptitle(heading, fontsize="medium")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _target_curve(result: LoadResult, t: list[float]) -> list[float]:
    """The offered rate at each point: the ramp, then flat, and nothing after the schedule ends."""
    rate = result.rate_target or 0.0
    ramp = result.ramp_s
    end = result.duration_s if result.duration_s is not None else math.inf
    # NaN leaves a gap: the stragglers completing after the end are not "below target".
    return [math.nan if x > end else rate * min(1.0, x / ramp) if ramp > 0 else rate for x in t]
