"""A throw-away Kafka-compatible broker (Tansu, memory storage) for the tests.

The implementation lives in ``purged.embedded.broker`` (the demo uses it too). Storage is
memory only: a broker that stops loses its topics, data and committed offsets. One broker per
test session is enough: tests use unique topic names and group ids (``unique(prefix)``).
"""

from __future__ import annotations

from purged.embedded.broker import Broker, make_event, rfc3339, tansu_binary

__all__ = ["Broker", "make_event", "rfc3339", "tansu_binary"]
