"""The smoke test of the installed wheel (scripts/wheel-smoke.sh runs it in a fresh venv with no Rust
toolchain on the PATH): the package imports from that venv with the expected version, parses, and
talks to the emulator: a user subscribes, a source pushes, the reading arrives."""

from __future__ import annotations

import sys
from pathlib import Path

import capture_mqtt as cm
from capture_mqtt.testing import CaptureEmulator, wait_for


def main(version: str) -> None:
    where = Path(cm.__file__).resolve()
    assert Path(sys.prefix).resolve() in where.parents, f"capture_mqtt imported from {where}, not the venv"
    assert cm.__version__ == version, f"__version__ {cm.__version__!r}, the crate's version {version!r}"
    point = cm.parse_raw(
        "v1/raw/AcmeCorp/fe453df1-b4a0-492d-a12c-505988eea849/Requester/Monitoring/CPU_Temp",
        b'{"Value": 55, "UtcTimestamp": "2024-11-08T10:22:06.26Z"}',
    )
    assert (point.key, point.value) == ("CPU_Temp", 55), point
    with CaptureEmulator() as emu:
        acme = emu.add_company("AcmeCorp")
        alice, press = emu.add_user(acme, "alice"), emu.add_source(acme)
        with emu.client(alice) as user, emu.source_client(press) as device, user.subscribe_raw(qos=1) as sub:
            device.push("PLC", "Monitoring", {"CPU_Temp": 61})
            got = wait_for(sub, lambda p: p.key == "CPU_Temp", timeout=10)
            assert got.value == 61, got
            assert got.tags["Connection_Tag"] == "PLC", got.tags
    print(f"the wheel works: capture-mqtt {cm.__version__} from {where.parent}, over TLS to the emulator")


if __name__ == "__main__":
    main(sys.argv[1])
