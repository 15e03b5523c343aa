#!/usr/bin/env bash
# Installs everything pxopt and its tests need on a fresh Debian machine.
# Idempotent: a second run installs nothing new. Usage: scripts/install.sh [--test]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

apt_packages=(dataset-fashion-mnist)
if [[ "${1:-}" == "--test" ]]; then
    apt_packages+=(chromium postgresql)
fi
missing=()
for pkg in "${apt_packages[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ((${#missing[@]})); then
    if command -v apt-get >/dev/null && [[ $(id -u) == 0 ]]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "warning: please install the Debian packages: ${missing[*]}" >&2
    fi
fi

# torch first, pinned, so pip takes the builds that lie on this machine's disk.
$PY -m pip install -q torch==2.14.1 torchvision==0.29.1
if [[ "${1:-}" == "--test" ]]; then
    $PY -m pip install -q -e '.[test]'
else
    $PY -m pip install -q -e .
fi
