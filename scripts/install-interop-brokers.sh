#!/usr/bin/env bash
# Installs the brokers of `make interop` that are missing: RabbitMQ (its MQTT plugin) and ActiveMQ
# with the jars of its MQTT connector from Debian's packages, rumqttd built with cargo from
# interop/rumqttd (its own Cargo.lock). Mosquitto comes from install-mosquitto.sh and amqtt from the
# `dev` extra. A broker that cannot be installed is reported here, and as skipped, with the reason,
# in the table; the others still run. No packaged service is started.
set -uo pipefail
cd "$(dirname "$0")/.."

packages=()
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || packages+=(rabbitmq-server)
[ -e /usr/share/activemq/lib/activemq-mqtt.jar ] || packages+=(activemq)
[ -e /usr/share/java/mqtt-client.jar ] || packages+=(libmqtt-client-java)
[ -e /usr/share/java/hawtdispatch-transport.jar ] || packages+=(libhawtdispatch-java)
if [ "${#packages[@]}" -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "interop: not installed: ${packages[*]} (sudo apt-get install ${packages[*]}); skipped" >&2
    else
        scripts/apt-install.sh "${packages[@]}" \
            || echo "interop: apt-get could not install ${packages[*]}; those brokers are skipped" >&2
    fi
fi

# Incremental: a second run only checks that nothing changed.
cargo build --quiet --release --locked --manifest-path interop/rumqttd/Cargo.toml --target-dir target/interop \
    || echo "interop: rumqttd could not be built with cargo; it is skipped" >&2
exit 0
