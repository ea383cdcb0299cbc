"""The README's promises: its library example runs and prints one line per recipient."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_starts_with_the_two_commands() -> None:
    text = README.read_text()
    first_block = re.search(r"```sh\n(.*?)```", text, re.S)
    assert first_block is not None
    commands = [line for line in first_block.group(1).splitlines() if line.strip()]
    assert commands == ["bash scripts/install.sh && .venv/bin/fastmta demo", "bash .ci/run"]
    ci = (README.parent / ".ci" / "run").read_text()
    # CI installs with the README's installer and ends with the test command.
    assert "bash scripts/install.sh test" in ci
    assert ci.rstrip().endswith("bash scripts/test.sh")


def test_readme_library_example_runs() -> None:
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S)
    assert block is not None
    out = subprocess.run([sys.executable, "-c", block.group(1)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert sorted(line.split()[0] for line in lines) == ["b@example.org", "c@example.net"]
    assert all(line.split()[1] == "delivered" and " 250 " in f" {line} " for line in lines)


def test_readme_library_example_type_checks_under_mypy_strict() -> None:
    # What a user's own mypy --strict says of the example (names must be explicitly exported).
    out = subprocess.run(
        [sys.executable, str(README.parent / "scripts" / "readme_example.py"), "--mypy"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Success: no issues found" in out.stdout


def test_readme_configuration_example_loads(tmp_path: Path) -> None:
    # Found by an attack on MTA-STS: a table added in the middle of [smtp] in the example moved the
    # keys after it under the new table ("smtp.mta_sts.max_connections: unknown key").
    from fastmta.delivery.config import parse_config

    text = README.read_text(encoding="utf-8")
    start = text.index("### Configuration (TOML, `--config`)")
    block = text[text.index("```toml\n", start) + len("```toml\n"): text.index("```\n", text.index("```toml\n", start) + 8)]
    (tmp_path / "classify-rules.toml").write_text("")  # the example names a rule file of the operator's
    (tmp_path / "relay.pass").write_text("secret\n")  # and a relay's password file
    config = parse_config(block, "README example", base_dir=tmp_path)
    assert config.smtp.max_connections == 2000 and config.smtp.mta_sts.enabled
    assert config.routing.credentials()[("127.0.0.1", 2525)].password == "secret"
