#!/usr/bin/env bash
# The test command (README, CI): the whole suite with the compiled core, then
# the core's tests again on the pure-Python twins. Both passes always run; the
# exit status is non-zero if either failed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin"   # Debian puts smtp-sink/smtp-source there
PYTHON=python3
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x "${FASTMTA_VENV:-.venv}/bin/python" ]; then
    PYTHON="${FASTMTA_VENV:-.venv}/bin/python"   # the environment scripts/install.sh made
fi
status=0
echo "== tests, compiled core"
"$PYTHON" -m pytest -q "$@" || status=1
echo "== core and client-protocol tests on the pure-Python twins (FASTMTA_NO_EXTENSIONS=1)"
FASTMTA_NO_EXTENSIONS=1 "$PYTHON" -m pytest -q -m core "$@" || status=1
exit $status
