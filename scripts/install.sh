#!/usr/bin/env bash
# Install fastmta into a virtual environment, .venv/ in this checkout (or
# $FASTMTA_VENV), with the system's python3: a stock Debian/Ubuntu Python
# refuses `pip install` outside a venv (PEP 668). Builds the compiled core,
# so it needs a C compiler and the Python headers; when they (or the venv
# module) are missing it installs them with apt-get (sudo when not root).
#   bash scripts/install.sh          # fastmta itself
#   bash scripts/install.sh test     # plus what the tests and CI checks use
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FASTMTA_VENV:-.venv}
EXTRAS=${1:-}
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1

missing=()
python3 -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
    || missing+=(python3-dev)
command -v cc >/dev/null || missing+=(gcc libc6-dev)
probe=$(mktemp -d)
python3 -m venv "$probe/v" >/dev/null 2>&1 || missing+=(python3-venv)
rm -rf "$probe"
if ((${#missing[@]})); then
    if ! command -v apt-get >/dev/null; then
        echo "install.sh: need ${missing[*]} (a C compiler, Python headers, the venv module); install them and rerun" >&2
        exit 1
    fi
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    echo "install.sh: installing ${missing[*]} with apt-get" >&2
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e ".${EXTRAS:+[$EXTRAS]}"
# Byte-compile now, as a non-editable install does: with PYTHONDONTWRITEBYTECODE
# set (some images set it) every command would compile the package again (~0.1 s).
"$VENV/bin/python" -m compileall -q src/fastmta >/dev/null
echo "install.sh: fastmta installed in $VENV ($("$VENV/bin/fastmta" --version))" >&2
