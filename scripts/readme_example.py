"""The README's library example: print it, or type-check it as a user would.

    python scripts/readme_example.py           # print the example's code
    python scripts/readme_example.py --mypy    # mypy --strict on it (exit status of mypy)

Used by .ci/run and tests/test_readme.py, so the example the README shows is
the one that is checked.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def library_example() -> str:
    """The first ```python block of the README."""
    block = re.search(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    if block is None:
        raise SystemExit(f"{README}: no ```python block")
    return block.group(1)


def main() -> int:
    code = library_example()
    if "--mypy" not in sys.argv[1:]:
        print(code, end="")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "readme_example.py"
        path.write_text(code, encoding="utf-8")
        # --no-incremental: no cache left behind; the config file is not the
        # project's, so the example is checked under plain --strict.
        cmd = [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--config-file", "/dev/null", str(path)]
        return subprocess.run(cmd, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
