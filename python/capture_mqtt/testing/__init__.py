"""Testing kit: a real local broker with Capture-like accounts and scopes.

>>> from capture_mqtt.testing import Mosquitto
>>> Mosquitto.__name__
'Mosquitto'
"""

from __future__ import annotations

from .mosquitto import Account, Mosquitto, MosquittoNotFoundError, free_port

__all__ = ["Account", "Mosquitto", "MosquittoNotFoundError", "free_port"]
