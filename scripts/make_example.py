"""Regenerate the bundled example spool (deterministic: same output every run).

    python scripts/make_example.py

Writes src/fastmta/examples/spool/ (shipped in the package, for ``fastmta demo``):
a campaign job (welcome.toml) with 10,000 recipients over 120 domains under the reserved .example TLD (RFC 2606: these domains
can never receive mail, so nothing can leak if the spool is sent for real),
its text and HTML template, a DKIM Ed25519 key *for tests only*, and a few
pickup files. The key is public in this repository: never use it to sign
real mail.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

SPOOL = Path(__file__).resolve().parents[1] / "src" / "fastmta" / "examples" / "spool"
FIRST = ["Ada", "Alan", "Grace", "Linus", "Margaret", "Dennis", "Barbara", "Ken", "Frances", "Edsger", "Radia", "Donald"]
LAST = ["Lovelace", "Turing", "Hopper", "Torvalds", "Hamilton", "Ritchie", "Liskov", "Thompson", "Allen", "Dijkstra"]


def main() -> None:
    rng = random.Random(2026)
    SPOOL.mkdir(parents=True, exist_ok=True)
    domains = [f"customer{n:03d}.example" for n in range(120)]
    with open(SPOOL / "recipients.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["email", "first_name", "last_name", "id", "signup"])
        for i in range(10_000):
            first = rng.choice(FIRST) if rng.random() > 0.1 else ""  # some without a name: default("friend")
            last = rng.choice(LAST)
            domain = domains[i % len(domains)] if i < 6000 else rng.choice(domains)
            local = f"{(first or 'user').lower()}.{last.lower()}{i}"
            day = 1 + rng.randrange(28)
            w.writerow([f"{local}@{domain}", first, last, f"u{i:06d}", f"2026-{1 + rng.randrange(10):02d}-{day:02d}"])
    key = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(rng.randrange(256) for _ in range(32)))
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    (SPOOL / "dkim-test-ed25519.key.pem").write_bytes(
        b"# TEST KEY ONLY: published in the fastmta repository, never sign real mail with it.\n" + pem
    )
    print(f"wrote {SPOOL}")


if __name__ == "__main__":
    main()
