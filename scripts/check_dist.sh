#!/usr/bin/env bash
# The installable product (run by .ci/run): build the sdist and the wheel with
# `python -m build`, check what each carries, install the wheel into a fresh
# virtual environment and run the main job from / (outside the source tree).
# Usage: scripts/check_dist.sh PYTHON   (a Python with `build` installed)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${1:-python3}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
"$PYTHON" -m build --outdir "$OUT/dist" . >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
wheel=$(ls "$OUT"/dist/*.whl)
sdist=$(ls "$OUT"/dist/*.tar.gz)
"$PYTHON" - "$wheel" "$sdist" <<'PY'
import sys, tarfile, zipfile
wheel, sdist = sys.argv[1], sys.argv[2]
names = zipfile.ZipFile(wheel).namelist()
problems = [f"wheel ships generated C: {n}" for n in names if n.endswith(".c")]
for need in ("fastmta/py.typed", "fastmta/examples/spool/welcome.toml", "fastmta/feedback/classify_rules.toml"):
    if need not in names:
        problems.append(f"wheel lacks {need}")
if not any(n.startswith("fastmta/message/_core.") and n.endswith(".so") for n in names):
    problems.append("wheel lacks the compiled core")
members = {m.split("/", 1)[1] for m in tarfile.open(sdist).getnames() if "/" in m}
for need in ("LICENSE", "README.md", "setup.py", "tests/conftest.py", "tests/servers.py",
             "tests/data/SOURCES.md", "src/fastmta/message/_core.pyx", "src/fastmta/smtp/_client.pyx",
             "src/fastmta/examples/spool/welcome.toml", "scripts/test.sh", "contrib/fastmta.service"):
    if need not in members:
        problems.append(f"sdist lacks {need}")
problems += [f"sdist ships a build product: {m}" for m in members if m.endswith((".so", ".c"))]
print("\n".join(problems) or f"dist ok: {len(names)} files in the wheel, {len(members)} in the sdist")
sys.exit(1 if problems else 0)
PY
"$PYTHON" -m venv "$OUT/venv"
"$OUT/venv/bin/python" -m pip install -q "$wheel"
(cd / && "$OUT/venv/bin/fastmta" demo --quiet --dir "$OUT/demo")
"$PYTHON" - "$OUT/demo/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
assert s["delivered"] == s["recipients"] > 10_000 and s["unfinished"] == 0 and not s["rejected"], s
print(f"installed wheel: fastmta demo delivered {s['delivered']} recipients from /")
PY
