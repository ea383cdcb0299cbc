"""fastmta: a high-throughput email delivery engine."""

__version__ = "0.1.0"
