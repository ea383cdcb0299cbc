"""``fastmta load``: the load generator, its latency histograms, report schema and plot."""
