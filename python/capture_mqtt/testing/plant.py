"""A simulated plant: sources on a :class:`CaptureEmulator` pushing realistic measurements at a steady
rate and answering ``writedata`` commands, for the demo, the notebooks and tests."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import random
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

if TYPE_CHECKING:
    import capture_mqtt as cm

    from .emulator import CaptureEmulator, Company, Source

__all__ = ["Machine", "SimulatedPlant"]

log = logging.getLogger("capture_mqtt.testing")

CONNECTION = "PLC"
SETPOINT = (CONNECTION, "Process", "Setpoint")


@dataclass
class Machine:
    """One simulated press: a source whose temperature follows its setpoint with some noise."""

    name: str
    source: Source
    client: cm.SourceClient
    setpoint: float = 60.0
    temperature: float = 20.0
    cycles: int = 0
    commands: list[Any] = field(default_factory=list)

    def step(self, dt: float, rng: random.Random) -> dict[str, Any]:
        """Advances the machine by ``dt`` seconds and returns the fields to push."""
        self.temperature += (self.setpoint - self.temperature) * min(1.0, dt / 3.0) + rng.gauss(0, 0.2)
        self.cycles += 1
        running = self.temperature > self.setpoint - 10
        return {
            "Temperature": round(self.temperature, 3),
            "Pressure": round(4.0 + 0.5 * math.sin(self.cycles / 20) + rng.gauss(0, 0.05), 4),
            "Speed": round(rng.uniform(118, 122), 2) if running else 0.0,
            "State": "Running" if running else "Heating",
        }


class SimulatedPlant:
    """``sources`` machines of ``company`` (Press1, Press2, ...), each pushing one ``Process``
    measurement (Temperature, Pressure, Speed, State; tag ``MachineName``) ``rate`` times a second on
    connection ``PLC``. A ``writedata`` command to ``PLC/Process/Setpoint`` changes the machine's
    setpoint, and the machine answers by pushing the new ``Setpoint`` at once.

    >>> from capture_mqtt.testing import CaptureEmulator
    >>> from capture_mqtt.testing.plant import SimulatedPlant
    >>> with CaptureEmulator() as emu, SimulatedPlant(emu, emu.add_company("AcmeCorp"), sources=2) as plant:
    ...     [machine.name for machine in plant.machines]
    ['Press1', 'Press2']
    """

    def __init__(
        self, emulator: CaptureEmulator, company: Company, *, sources: int = 3, rate: float = 5.0, seed: int = 7
    ) -> None:
        if sources < 1 or rate <= 0:
            raise ValueError(f"a plant needs at least one source and a positive rate, got {sources=}, {rate=}")
        self.emulator = emulator
        self.company = company
        self.rate = rate
        self.pushes = 0
        self._rng = random.Random(seed)  # noqa: S311 - a simulation, not cryptography
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.machines: list[Machine] = []
        try:
            for number in range(1, sources + 1):
                source = emulator.add_source(company)
                machine = Machine(f"Press{number}", source, emulator.source_client(source))
                machine.setpoint = 60.0 + 5 * number
                machine.client.on_command(functools.partial(self._on_command, machine), verb="writedata")
                self.machines.append(machine)
        except BaseException:
            self.stop()
            raise

    def machine(self, name: str) -> Machine:
        """The machine called ``name`` (``"Press1"``)."""
        for machine in self.machines:
            if machine.name == name:
                return machine
        raise KeyError(f"no machine {name!r}; the plant has {[m.name for m in self.machines]}")

    def _on_command(self, machine: Machine, command: Any) -> None:
        machine.commands.append(command)
        if (command.connection, command.measurement, command.variable) != SETPOINT:
            log.warning("%s ignores a command for %s", machine.name, command.topic)
            return
        try:
            machine.setpoint = float(command.data)
        except (TypeError, ValueError):
            log.warning("%s ignores a setpoint that is not a number: %r", machine.name, command.data)
            return
        machine.client.push_field(*SETPOINT, machine.setpoint, tags={"MachineName": machine.name}, qos=1, wait=False)

    def start(self) -> Self:
        """Starts pushing in a background thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="capture-simulated-plant", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        period = 1.0 / self.rate
        next_tick = time.monotonic()
        while not self._stop.is_set():
            for machine in self.machines:
                fields = machine.step(period, self._rng)
                try:
                    machine.client.push(CONNECTION, "Process", fields, tags={"MachineName": machine.name}, wait=False)
                    self.pushes += 1
                except Exception as err:  # a simulated device keeps running, as a real one would
                    log.warning("%s could not push: %s", machine.name, err)
            next_tick += period
            self._stop.wait(max(0.0, next_tick - time.monotonic()))

    def stop(self) -> None:
        """Stops pushing and closes the machines' clients."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for machine in self.machines:
            with contextlib.suppress(Exception):
                machine.client.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
