#!/usr/bin/env bash
# The test command (README, CI): the whole suite with the compiled core, then
# the core's tests again on the pure-Python reference.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin"   # Debian puts smtp-sink/smtp-source there
python3 -m pytest -q "$@"
FASTMTA_NO_EXTENSIONS=1 python3 -m pytest -q -m core "$@"
