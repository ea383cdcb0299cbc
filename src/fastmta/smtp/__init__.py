"""The wire: SMTP reply parsing, transaction records, the sans-IO client protocol
(with its compiled twin) and the asyncio connection that drives it, TLS helpers.

Knows nothing of queues, routing or retries; ``fastmta.delivery`` and
``fastmta.load`` build on it.
"""
