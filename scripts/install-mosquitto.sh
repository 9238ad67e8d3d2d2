#!/usr/bin/env bash
# Installs Mosquitto (broker and clients) from Debian's packages when `mosquitto` is not on the PATH.
# The package's service is not started: tests and the emulator start their own brokers on loopback.
set -euo pipefail
if command -v mosquitto >/dev/null 2>&1 && command -v mosquitto_sub >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "Mosquitto is missing; install it with: sudo apt-get install mosquitto mosquitto-clients" >&2
    exit 1
fi
"$(dirname "$0")/apt-install.sh" mosquitto mosquitto-clients
command -v mosquitto >/dev/null
