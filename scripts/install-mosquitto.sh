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
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
    # Tell Debian's maintainer scripts not to start the packaged service.
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    created_policy=1
fi
trap '[ "$created_policy" = 1 ] && rm -f "$policy"' EXIT
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mosquitto mosquitto-clients >/dev/null
command -v mosquitto >/dev/null
