"""fastmta serve: the engine as a long-running service (SMTP and HTTP injection, pickup, queue control, metrics, events)."""
