#!/usr/bin/env bash
# Installs Debian packages, as root, without starting their services (tests and tools start their
# own servers on loopback): for install-mosquitto.sh and install-interop-brokers.sh.
set -euo pipefail
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
    # Tells Debian's maintainer scripts not to start a packaged service (RabbitMQ's would listen on
    # every interface).
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    created_policy=1
fi
trap '[ "$created_policy" = 1 ] && rm -f "$policy"' EXIT
apt-get update -qq
DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq --no-install-recommends "$@" >/dev/null
