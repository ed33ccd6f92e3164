"""The latency floor: a plain librdkafka consumer, no purged, timing the same events.

`python -m purged.bench.floor BOOTSTRAP TOPIC GROUP COUNT OUT FETCH_WAIT_MS` subscribes,
prints "ready" once it has its partitions, then notes the arrival time of each benchmark
event (by its URL's number) until it has COUNT of them, and writes the times as COUNT native
doubles to OUT. The harness produces the events as in the latency run: the difference between
the two runs' latencies is what purged adds on top of the broker and the client library.
"""

from __future__ import annotations

import sys
import time
from array import array

import msgspec
from confluent_kafka import Consumer

from .sink import URL_PREFIX


class _Meta(msgspec.Struct):
    uri: str


class _Event(msgspec.Struct):
    meta: _Meta


def main(argv: list[str] | None = None) -> int:
    """Consume COUNT benchmark events; write their arrival times."""
    bootstrap, topic, group, count_text, out, fetch_wait = (argv or sys.argv[1:])[:6]
    count = int(count_text)
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "session.timeout.ms": 2000,
            "heartbeat.interval.ms": 500,
            "auto.offset.reset": "earliest",  # a fresh topic: nothing before our events
            "enable.auto.commit": False,
            "fetch.wait.max.ms": int(fetch_wait),
        }
    )
    consumer.subscribe([topic])
    while not consumer.assignment():
        consumer.poll(0.05)
    print("ready", flush=True)
    decoder = msgspec.json.Decoder(_Event)
    skip = len(URL_PREFIX)
    arrivals = array("d", bytes(8 * count))
    seen = 0
    while seen < count:
        messages = consumer.consume(1000, 0.005)
        now = time.time()
        for message in messages:
            if message.error() is not None:
                continue
            seq = int(decoder.decode(message.value() or b"").meta.uri[skip:])
            if 0 <= seq < count and not arrivals[seq]:
                arrivals[seq] = now
                seen += 1
    consumer.close()
    with open(out, "wb") as f:
        arrivals.tofile(f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
