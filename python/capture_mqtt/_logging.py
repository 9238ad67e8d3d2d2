"""Hands the Rust core's log records to Python's ``logging`` under the ``capture_mqtt`` logger.

The core queues its records (it never calls Python from the network threads); this daemon thread
takes them in batches and logs them as ``capture_mqtt.<module>`` (e.g. ``capture_mqtt.session.engine``).
"""

from __future__ import annotations

import atexit
import logging
import threading

from . import _core

_started = threading.Lock()
_thread: threading.Thread | None = None
_stopping = threading.Event()


def _forward() -> None:
    root = logging.getLogger("capture_mqtt")
    while not _stopping.is_set():
        try:
            records = _core._next_logs(0.5)
        except Exception:
            return
        for level, target, message in records:
            logger = root.getChild(target) if target else root
            if logger.isEnabledFor(level):
                logger.log(level, "%s", message)


def start() -> None:
    """Starts the forwarding thread once per process."""
    global _thread  # noqa: PLW0603 - one thread per process
    with _started:
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_forward, name="capture-mqtt-log", daemon=True)
            _thread.start()


@atexit.register  # registered first, so it runs after the clients' own exit handler has closed them
def _stop() -> None:
    """Ends the forwarding thread before the interpreter finalizes: a daemon thread still waiting in
    the core then would be ended by CPython with a forced unwind through Rust frames, which can crash
    the process at exit."""
    try:
        _stopping.set()
        _core._close_logs()  # wakes the wait; what is still queued is forwarded first
        thread = _thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2.0)
    finally:
        # The last of the package's exit handlers (even after a Ctrl-C during the join): from here on
        # a daemon thread coming back from a wait in the core parks rather than take the interpreter
        # lock back while the interpreter finalizes.
        _core._interpreter_exiting()
