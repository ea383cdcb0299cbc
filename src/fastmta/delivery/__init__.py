"""Getting queued messages to the receivers: the engine, configuration, DNS and
MX routing, per-site connection pools, adaptive throttling, rate limits,
warm-up, and the accounting of every outcome."""
