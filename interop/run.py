"""``make interop``: every scenario with this SDK and with paho-mqtt against every broker of the
suite; prints the table and writes it into docs/interoperability.md. A broker that cannot be had on
this machine is reported as skipped with the reason.

    python -m interop.run [broker ...]     (INTEROP_MESSAGES sets the stream size; 10,000)
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

from . import brokers, scenarios
from .scenarios import Cell

DOC = Path(__file__).resolve().parent.parent / "docs" / "interoperability.md"
#: Lines a broker's log may hold that mean a client broke the protocol, in each broker's words
#: (Mosquitto's, amqtt's, rumqttd's "Protocol(...)" and its check of acknowledgement order).
PROTOCOL_ERRORS = re.compile(
    r"protocol error|malformed|invalid packet|bad packet|Protocol\(|out of order", re.IGNORECASE
)
#: What the scenario "a publish over the broker's packet limit" makes brokers log, on purpose.
EXPECTED = re.compile(r"PayloadSizeLimitExceeded|maximum message length was exceeded", re.IGNORECASE)


def protocol_errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if PROTOCOL_ERRORS.search(line) and not EXPECTED.search(line)]


def run_broker(kind: type[brokers.Broker]) -> tuple[dict[str, tuple[Cell, Cell]], list[str]]:
    """The scenarios' cells on one broker (SDK, paho), and the protocol errors in its log."""
    cells: dict[str, tuple[Cell, Cell]] = {}
    with kind() as broker:
        for name, scenario in scenarios.SCENARIOS:
            row = []
            clients: tuple[scenarios.Client, ...] = ("sdk", "paho")
            for client in clients:
                started = time.monotonic()
                cell = scenarios.run_cell(scenario, broker, client)
                print(f"  {name:<52} {client:<5} {cell.status:<5} {time.monotonic() - started:5.1f} s  {cell.detail}")
                row.append(cell)
            cells[name] = (row[0], row[1])
        errors = protocol_errors(broker.log_text())
    return cells, errors


def _cell(mark: str, detail: str, width: int = 110) -> str:
    detail = detail.replace("|", "/").replace("\n", " ")
    if len(detail) > width:
        detail = detail[: width - 1] + "…"
    return f"{mark} {detail}".strip()


def table(results: dict[str, tuple[dict[str, tuple[Cell, Cell]], list[str]] | str]) -> str:
    names = list(results)
    head = "| scenario | " + " | ".join(f"{n}: SDK | {n}: paho" for n in names) + " |"
    rule = "|---|" + "---|---|" * len(names)
    lines = [head, rule]
    mark = {"pass": "pass", "fail": "**FAIL**", "n/a": "n/a"}
    for scenario, _ in scenarios.SCENARIOS:
        row = [scenario]
        for name in names:
            result = results[name]
            if isinstance(result, str):
                row += ["skipped", "skipped"]
                continue
            sdk, paho = result[0][scenario]
            row += [_cell(mark[sdk.status], sdk.detail), _cell(mark[paho.status], paho.detail)]
        lines.append("| " + " | ".join(row) + " |")
    notes = []
    for (broker, scenario), reason in scenarios.KNOWN.items():
        found = results.get(broker)
        if found is not None and not isinstance(found, str) and found[0][scenario][0].status == "fail":
            notes.append(f"- {broker}, {scenario}: {reason}.")
    for name in names:
        result = results[name]
        if isinstance(result, str):
            notes.append(f"- {name}: skipped: {result}")
        elif result[1]:
            notes.append(f"- {name}: protocol errors in its log: {len(result[1])}, first: `{result[1][0][:160]}`")
        else:
            notes.append(f"- {name}: no protocol error in its log")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def main(argv: list[str]) -> int:
    wanted = {a.lower() for a in argv}
    results: dict[str, tuple[dict[str, tuple[Cell, Cell]], list[str]] | str] = {}
    for kind in brokers.ALL:
        if wanted and kind.name.lower() not in wanted:
            continue
        reason = kind.unavailable()
        if reason is not None:
            print(f"{kind.name}: skipped: {reason}")
            results[kind.name] = reason
            continue
        print(f"{kind.name}:")
        try:
            results[kind.name] = run_broker(kind)
        except Exception as err:  # a broker that does not start is skipped, with the reason
            print(f"{kind.name}: skipped: it did not start: {err}")
            results[kind.name] = f"it did not start here: {err}"
    text = table(results)
    print(text)
    if not wanted and DOC.exists():  # the whole table only
        doc = DOC.read_text()
        start, end = "<!-- interop table -->", "<!-- end of interop table -->"
        if start in doc and end in doc:
            before, rest = doc.split(start, 1)
            after = rest.split(end, 1)[1]
            DOC.write_text(f"{before}{start}\n{text}{end}{after}")
    # The SDK's failures where paho passes, but for a broker's departure from the specification that
    # the table explains (scenarios.KNOWN).
    failures = [
        f"{broker}: {scenario}"
        for broker, result in results.items()
        if not isinstance(result, str)
        for scenario, (sdk, paho) in result[0].items()
        if (
            (sdk.count or 0) < (paho.count or 0)
            if scenario in scenarios.MEASURED
            else sdk.status == "fail" and paho.status == "pass" and (broker, scenario) not in scenarios.KNOWN
        )
    ]
    for failure in failures:
        print(f"the SDK failed where paho passed: {failure}")
    # A cell explained as a broker's departure that no longer fails: the explanation is out of date.
    stale = []
    for broker, scenario in scenarios.KNOWN:
        found = results.get(broker)
        if found is not None and not isinstance(found, str) and found[0][scenario][0].status != "fail":
            stale.append(f"{broker}: {scenario}")
    for cell in stale:
        print(f"the SDK no longer fails a cell explained in scenarios.KNOWN: {cell}")
    errors = [name for name, result in results.items() if not isinstance(result, str) and result[1]]
    for name in errors:
        print(f"protocol errors in {name}'s log")
    return 1 if failures or stale or errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
