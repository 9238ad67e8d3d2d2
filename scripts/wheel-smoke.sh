#!/usr/bin/env bash
# What a user without a compiler gets from pip: the wheel of `make wheel` installed into a fresh venv,
# with no cargo or rustc on the PATH and nothing compiled (--only-binary), and tests/wheel_smoke.py run
# there (import, parse, the emulator, subscribe, push). Dependencies keep the pins of pyproject.toml's
# `dev` extra.
set -euo pipefail
cd "$(dirname "$0")/.."
shopt -s nullglob
wheels=(dist/capture_mqtt-*.whl)
if [ "${#wheels[@]}" != 1 ]; then
    echo "wheel-smoke: expected one wheel in dist/, found ${#wheels[@]}: run make wheel" >&2
    exit 1
fi
wheel="$PWD/${wheels[0]}"
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)

# The system's directories only, and none that holds a Rust toolchain.
path=""
for dir in /usr/local/sbin /usr/local/bin /usr/sbin /usr/bin /sbin /bin; do
    if [ -d "$dir" ] && [ ! -e "$dir/cargo" ] && [ ! -e "$dir/rustc" ]; then
        path="$path:$dir"
    fi
done
python=$(command -v python3)
work=$(mktemp -d /tmp/capture-mqtt-wheel-XXXXXX)
trap 'rm -rf "$work"' EXIT
"$python" -m venv "$work/venv"
run() { env -i HOME="$HOME" LANG=C.UTF-8 PATH="$work/venv/bin$path" "$@"; }
if run bash -c 'command -v cargo || command -v rustc'; then
    echo "wheel-smoke: a Rust toolchain is still on the PATH" >&2
    exit 1
fi
run "$work/venv/bin/python" -m pip install --quiet --disable-pip-version-check --only-binary :all: \
    -c .stamps/requirements.txt "$wheel[testing]"
cp tests/wheel_smoke.py "$work/"
(cd "$work" && run "$work/venv/bin/python" -I wheel_smoke.py "$version")
