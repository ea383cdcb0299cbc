"""What is sent: the messages and recipients of a load run, built from its ``LoadSpec``.

:class:`Workload` turns message index *i* into a ``Transaction``: recipients
from a fixed address pool spread over the spec's domains, and a body of a size
drawn from the spec's :class:`~fastmta.load.spec.SizeDistribution` -- a fixed
text (:func:`make_message`), or a newsletter-like campaign template rendered
per recipient, optionally DKIM-signed per message. The per-message cost of
the fixed case is kept to a list index, so that the client measures the
server, not itself.
"""

from __future__ import annotations

import email.utils
import random
from typing import Any

from fastmta.errors import ConfigError
from fastmta.load.spec import DkimOptions, LoadSpec, SizeDistribution
from fastmta.smtp.protocol import Body, Transaction

BODY_POOL = 64  # distinct bodies drawn from a size distribution (wire forms cached per body)


def make_message(size: int, sender: str = "load@fastmta.test", rcpt: str = "rcpt@load.test") -> bytes:
    """A plausible RFC 5322 message of about *size* bytes (at least its headers)."""
    head = (
        f"From: Load Test <{sender}>\r\n"
        f"To: <{rcpt}>\r\n"
        f"Subject: fastmta load test\r\n"
        f"Date: {email.utils.formatdate(localtime=False)}\r\n"
        f"Message-ID: {email.utils.make_msgid(domain='fastmta.test')}\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
    ).encode()
    line = b"The quick brown fox jumps over the lazy dog; 0123456789 abcdefghijklmnopq\r\n"  # 76 + CRLF
    body = bytearray()
    while len(head) + len(body) + len(line) <= size:
        body += line
    rest = size - len(head) - len(body)
    if rest > 2:
        body += b"x" * (rest - 2) + b"\r\n"
    return head + bytes(body)


_FIRST_NAMES = ("Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Radia", "Dennis", "Zoë", "José")
_LAST_NAMES = ("Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Thompson", "Perlman", "Ritchie")
_PARAGRAPH = (
    "This week: the release notes, three articles from the community and an invitation to the "
    "next meetup. Thank you for reading; reply to this message if you have questions. "
)


def _template_for(size: int, sender: str) -> dict[str, Any]:
    """A newsletter-like campaign template (text + HTML, merge fields) of about *size* bytes."""
    # Headers and MIME structure take ~900 bytes; the rest is split between
    # the two parts, the HTML one a little larger, as in real newsletters.
    room = max(0, size - 900)
    text_fill = (_PARAGRAPH * (room * 2 // 5 // len(_PARAGRAPH) + 1))[: room * 2 // 5]
    html_fill = (_PARAGRAPH * (room * 3 // 5 // len(_PARAGRAPH) + 1))[: room * 3 // 5 // 2]
    return {
        "headers": {
            "From": f"fastmta News <{sender}>",
            "To": "{{ first_name }} {{ last_name }} <{{ email }}>",
            "Subject": "Your weekly digest, {{ first_name }}",
            "List-Unsubscribe": "<https://news.fastmta.test/u?id={{ id | urlencode }}>",
        },
        "text": "Hello {{ first_name }},\n\n" + "\n".join(
            text_fill[i : i + 72] for i in range(0, len(text_fill), 72)
        ) + "\n\nUnsubscribe: https://news.fastmta.test/u?id={{ id }}\n",
        "html": (
            "<html><body><h1>Hello {{ first_name }}</h1>\n<p>"
            + "</p>\n<p>".join(html_fill[i : i + 160] for i in range(0, len(html_fill), 160))
            + '</p>\n<p><a href="https://news.fastmta.test/u?id={{ id | urlencode }}">Unsubscribe</a></p>'
            "</body></html>\n"
        ),
    }


class Workload:
    """Builds transaction *i*: its recipients and its body.

    The common case (fixed bodies) costs a list index per message: the
    bodies are built once, and ``Body`` caches their wire forms. Templated
    bodies and DKIM signing are per message, on purpose: they put the
    compiled core's render and sign cost on every message, as a campaign does.
    """

    def __init__(self, spec: LoadSpec) -> None:
        self.sender = spec.sender
        self.n_rcpt = spec.recipients
        rng = random.Random(spec.seed)
        pool_size = min(max(spec.messages or 0, 1_000) * spec.recipients, 100_000)
        self.addresses = [f"r{i}@d{i % spec.domains}.load.test" for i in range(pool_size)]
        dist = spec.size if isinstance(spec.size, SizeDistribution) else SizeDistribution.fixed(spec.size)
        # A pool of sizes drawn once and cycled: the distribution is kept while
        # the per-message cost stays one index (and one cached wire form).
        sizes = [dist.sample(rng) for _ in range(1 if dist.kind == "fixed" else BODY_POOL)]
        self.sizes = sizes
        self.signer = None
        if spec.dkim is not None:
            self.signer = _load_signer(spec.dkim)
        self.campaigns = None
        if spec.template:
            from fastmta.message.mime import compile_campaign

            compiled = {s: compile_campaign(_template_for(s, spec.sender), source="load template") for s in set(sizes)}
            self.campaigns = [compiled[s] for s in sizes]
        self.bodies = [Body(make_message(s, spec.sender)) for s in sizes]
        if self.campaigns is None and self.signer is None:
            for body in self.bodies:
                _ = body.data_wire, body.bdat_wire  # encode once, before the clock starts

    def recipients(self, index: int) -> list[str]:
        pool = self.addresses
        start = (index * self.n_rcpt) % len(pool)
        rcpts = pool[start : start + self.n_rcpt]
        if len(rcpts) < self.n_rcpt:
            rcpts = rcpts + pool[: self.n_rcpt - len(rcpts)]
        return rcpts

    def transaction(self, index: int, tag: object) -> Transaction:
        rcpts = self.recipients(index)
        k = index % len(self.bodies)
        if self.campaigns is None and self.signer is None:
            return Transaction(self.sender, rcpts, self.bodies[k], tag)
        if self.campaigns is not None:
            first = rcpts[0]
            raw = self.campaigns[k].render(
                {
                    "email": first,
                    "first_name": _FIRST_NAMES[index % len(_FIRST_NAMES)],
                    "last_name": _LAST_NAMES[index % len(_LAST_NAMES)],
                    "id": f"u{index}",
                },
                recipient_id=first,
            )
        else:
            raw = self.bodies[k].raw
        if self.signer is not None:
            raw = self.signer.sign(raw)
        return Transaction(self.sender, rcpts, Body(raw), tag)

    def describe(self) -> str:
        return ("templated" if self.campaigns is not None else "fixed") + (", DKIM-signed" if self.signer else "")


def _load_signer(opts: DkimOptions) -> Any:
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from fastmta.message.dkim import DkimKeyConfig, DkimSigner, load_signing_key

    try:
        with open(opts.key_path, "rb") as f:
            key = load_pem_private_key(f.read(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"DKIM key {opts.key_path}: {exc}") from None
    ed = isinstance(key, ed25519.Ed25519PrivateKey)
    cfg = DkimKeyConfig(domain=opts.domain, selector=opts.selector, key_path=opts.key_path,
                        algorithm="ed25519-sha256" if ed else "rsa-sha256")
    return DkimSigner([load_signing_key(cfg, source="fastmta load")])

