"""The Kafka source: resource_change events in, purges out, offsets committed when done.

librdkafka does its fetching in its own threads; we call `consume(timeout=0)` from the event
loop, so every callback (rebalance, statistics, errors, commits) also runs on the loop
thread and all state stays single-threaded. Offsets are committed at-least-once: only up to
the low-water mark of each partition's finished messages (see `PartitionTrack`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter
from typing import Any

import msgspec
from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from purged import metrics
from purged.event import EventError, decode_event
from purged.logs import log, ratelimited
from purged.pipeline import PartitionTrack, Pipeline
from purged.url import UrlError, parse_purge_url

BATCH = 1000  # messages per consume() call
COMMIT_INTERVAL = 1.0  # seconds between periodic commits
PAUSED_POLL_INTERVAL = 0.1  # seconds between polls while consumption is paused
MAX_TAGS = 64  # distinct `tag` label values before the rest are counted as "other"
MAX_TAG_LENGTH = 64  # longer tags are counted as "other" too
# librdkafka prefetches up to 64 MiB per consumer by default; purged needs far less to keep
# the caches busy, and the memory bound matters more on a cache host.
DEFAULTS = {"queued.max.messages.kbytes": 16384}
# Set by purged whatever the config file says: offsets are ours to commit (at-least-once).
FORCED = {"enable.auto.commit": False, "enable.auto.offset.store": False}


class FatalKafkaError(Exception):
    """librdkafka reported a fatal error: the consumer cannot go on."""


def consumer_config(config: dict[str, Any]) -> dict[str, Any]:
    """The librdkafka properties purged runs with, from the -kafkaConfig file's."""
    merged = {**DEFAULTS, **config}
    for key, value in FORCED.items():
        if key in config and config[key] != value:
            log.info("kafka config: %s=%s is overridden by purged: %s", key, config[key], value)
    merged.update(FORCED)
    return merged


class KafkaSource:
    """Consumes the topics into the pipeline, and commits what the pipeline has finished."""

    def __init__(
        self, pipeline: Pipeline, topics: list[str], config: dict[str, Any], max_age: float
    ) -> None:
        self.pipeline = pipeline
        self.topics = topics
        self.max_age = max_age
        self.tracks: dict[tuple[str, int], PartitionTrack] = {}
        self.paused = False
        self.fatal: KafkaError | None = None
        self.consuming = False  # set once the first assignment arrived
        self._closing = False  # close() runs in its own thread from then on
        self._stopping = asyncio.Event()
        self._newest: dict[str, float] = {}
        self._counters: dict[tuple[str, str, str], Any] = {}
        self._tags: set[str] = set()
        properties = consumer_config(config)
        properties.update(
            error_cb=self._on_error,
            on_commit=self._on_commit,
            stats_cb=self._on_stats,
            logger=_RdkafkaLog(),
        )
        # Raises KafkaException for an unknown or invalid property (a config error).
        self.consumer = Consumer(properties)
        metrics.snapshots.topics = tuple(topics)

    # --- consuming --------------------------------------------------------------------
    async def run(self) -> None:
        """Consume until `stop()`; raises FatalKafkaError when librdkafka says so."""
        consumer = self.consumer
        consumer.subscribe(
            self.topics,
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        log.info("consuming topics %s", ",".join(self.topics))
        pipeline = self.pipeline
        room = pipeline.room
        next_commit = time.monotonic() + COMMIT_INTERVAL
        while not self._stopping.is_set():
            if self.fatal is not None:
                raise FatalKafkaError(self.fatal.str())
            if room.is_set():
                if self.paused:
                    self._resume()
                # Never take more than the pipeline has room for: pending stays bounded.
                limit = min(BATCH, max(1, pipeline.max_pending - pipeline.pending))
            else:
                self._pause()
                # Paused partitions return nothing, but polling still serves rebalances and
                # errors, and keeps librdkafka from leaving the group (max.poll.interval.ms).
                limit = BATCH
            messages = consumer.consume(limit, 0)
            if messages:
                self._handle(messages)
            if time.monotonic() >= next_commit:
                self.commit()
                next_commit = time.monotonic() + COMMIT_INTERVAL
            if self.paused:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        _first(room.wait(), self._stopping.wait()), PAUSED_POLL_INTERVAL
                    )
            else:
                # A full batch means more is waiting: yield to the caches, then read on at once.
                await asyncio.sleep(0 if len(messages) == limit else 0.001 if messages else 0.005)
        if self.fatal is not None:
            raise FatalKafkaError(self.fatal.str())

    def stop(self) -> None:
        """Stop consuming (the consumer stays open so that the drain can commit)."""
        self._stopping.set()

    def _handle(self, messages: list[Message]) -> None:
        pipeline, tracks, max_age = self.pipeline, self.tracks, self.max_age
        newest = self._newest
        newest_changed = False
        now = time.time()
        tally: Counter[tuple[str, str, str]] = Counter()  # counted once per batch, not per event
        for message in messages:
            error = message.error()
            if error is not None:
                self._on_error(error)
                continue
            # Never None for a message without error (the stubs cannot say so).
            topic: str = message.topic()  # type: ignore[assignment]
            offset: int = message.offset()  # type: ignore[assignment]
            track = tracks.get((topic, message.partition()))  # type: ignore[arg-type]
            if track is None:  # revoked meanwhile: the next owner reads it again
                continue
            try:
                event = decode_event(message.value() or b"")
            except EventError as error:
                ratelimited.warning("event", "discarding message %s@%d: %s", topic, offset, error)
                tally[("", "discarded", topic)] += 1
                track.skip(offset)
                continue
            timestamp = event.timestamp
            if timestamp is None:
                if event.bad_time:
                    ratelimited.warning(
                        "event-time", "event %s@%d: unparsable time, taken as now", topic, offset
                    )
                timestamp = now
            if timestamp > newest.get(topic, 0.0):
                newest[topic] = timestamp
                newest_changed = True
            if max_age and now - timestamp > max_age:
                tally[(event.tag, "expired", topic)] += 1
                track.skip(offset)
                continue
            try:
                target = parse_purge_url(event.uri)
            except UrlError as error:
                ratelimited.warning(
                    "url", "discarding event %s@%d: %s: %r", topic, offset, error, event.uri[:200]
                )
                metrics.urls_skipped.labels("invalid_url").inc()
                tally[(event.tag, "discarded", topic)] += 1
                track.skip(offset)
                continue
            tally[(event.tag, "ok", topic)] += 1
            pipeline.submit(target, track.ticket(offset))
        for (tag, status, name), count in tally.items():
            self._count(tag, status, name, count)
        if newest_changed:
            metrics.snapshots.publish_newest(newest)

    def _count(self, tag: str, status: str, topic: str, count: int) -> None:
        key = (tag, status, topic)
        counter = self._counters.get(key)
        if counter is None:
            # Label values are bounded in number and length: the rest count as "other".
            if tag in self._tags or (len(self._tags) < MAX_TAGS and len(tag) <= MAX_TAG_LENGTH):
                self._tags.add(tag)
            else:
                key = ("other", status, topic)
                counter = self._counters.get(key)
            if counter is None:
                counter = self._counters[key] = metrics.events_received.labels(*key)
        counter.inc(count)

    # --- backpressure -----------------------------------------------------------------
    def _pause(self) -> None:
        if not self.paused:
            self.paused = True
            metrics.kafka_paused.set(1)
            self.consumer.pause(self.consumer.assignment())
            log.info(
                "pipeline full (%d purges pending): pausing consumption", self.pipeline.pending
            )

    def _resume(self) -> None:
        self.paused = False
        metrics.kafka_paused.set(0)
        self.consumer.resume(self.consumer.assignment())
        log.info("pipeline has room again: resuming consumption")

    # --- offsets ----------------------------------------------------------------------
    def commit(self, partitions: list[TopicPartition] | None = None, wait: bool = False) -> None:
        """Commit the low-water marks that moved (of `partitions`, or of all assigned)."""
        if partitions is None:
            tracks = list(self.tracks.values())
        else:
            found = (self.tracks.get((p.topic, p.partition)) for p in partitions)
            tracks = [track for track in found if track is not None]
        moved = _moved(tracks)
        if moved and self._send_commit(_offsets(moved), wait):
            for track, offset in moved:
                track.committed = offset

    def _send_commit(self, offsets: list[TopicPartition], wait: bool) -> bool:
        """Ask the broker to commit `offsets`; False if the request could not be made."""
        try:
            if wait:
                self.consumer.commit(offsets=offsets, asynchronous=False)
            else:
                self.consumer.commit(offsets=offsets, asynchronous=True)
        except KafkaException as error:
            metrics.kafka_commits.labels("error").inc()
            ratelimited.warning("commit", "offset commit failed: %s", error)
            return False
        if wait:
            metrics.kafka_commits.labels("ok").inc()
        return True

    async def close(self, timeout: float, give_up: asyncio.Event | None = None) -> bool:
        """Commit what is finished and leave the group; False if that took over `timeout` s.

        librdkafka blocks a commit while the group coordinator is unreachable (up to
        session.timeout.ms), so the commit and close run in a thread: the loop stays free to
        serve a second signal (`give_up`), and the process may exit without waiting for it.
        Nothing is committed after a fatal error.
        """
        offsets = [] if self.fatal is not None else _offsets(_moved(list(self.tracks.values())))
        self._closing = True  # from now on callbacks run in the closing thread
        loop = asyncio.get_running_loop()
        closed: asyncio.Future[None] = loop.create_future()

        def set_closed() -> None:
            if not closed.done():
                closed.set_result(None)

        def close_consumer() -> None:
            try:
                if offsets:
                    self._send_commit(offsets, wait=True)
                self.consumer.close()
            finally:
                with contextlib.suppress(RuntimeError):  # the loop is gone: we gave up
                    loop.call_soon_threadsafe(set_closed)

        threading.Thread(target=close_consumer, name="kafka-close", daemon=True).start()
        waits: list[asyncio.Future[Any]] = [closed]
        if give_up is not None:
            waits.append(asyncio.ensure_future(give_up.wait()))
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits[1:]:
                waiting.cancel()
        if not closed.done():
            log.warning(
                "kafka: commit and close did not finish (broker unreachable?); exiting anyway"
            )
            return False
        return True

    @property
    def unfinished(self) -> int:
        """Messages consumed whose offsets cannot be committed yet."""
        return sum(track.unfinished for track in self.tracks.values())

    # --- callbacks (all run on the loop thread, inside consume()) ---------------------
    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for p in partitions:
            self.tracks[(p.topic, p.partition)] = PartitionTrack(p.topic, p.partition)
        log.info("assigned %s", _names(partitions))
        self.consuming = True
        # Assign now, so that the pause state below applies to them: librdkafka keeps a
        # partition's pause across a revoke and a new assignment, paused or not by us now.
        consumer.assign(partitions)
        if self.paused:
            consumer.pause(partitions)
        else:
            consumer.resume(partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("revoked %s", _names(partitions))
        if self._closing:  # close() committed already; the tracks belong to the loop
            return
        self.commit(partitions, wait=True)
        for p in partitions:
            self.tracks.pop((p.topic, p.partition), None)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.warning("lost %s (not committing them)", _names(partitions))
        if self._closing:
            return
        for p in partitions:
            self.tracks.pop((p.topic, p.partition), None)

    def _on_error(self, error: KafkaError) -> None:
        if error.code() == KafkaError._PARTITION_EOF:
            return
        metrics.kafka_errors.labels(error.name()).inc()
        # A fatal error comes as a consumer error with code _FATAL, whose fatal() is False.
        if error.fatal() or error.code() == KafkaError._FATAL:
            log.error("kafka: fatal error: %s", error.str())
            self.fatal = error
            if not self._closing:  # asyncio events are not thread-safe
                self._stopping.set()
        else:
            ratelimited.warning(f"kafka-{error.code()}", "kafka: %s", error.str())

    def _on_commit(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        failed = [p for p in partitions if p.error is not None]
        if error is not None or failed:
            metrics.kafka_commits.labels("error").inc()
            ratelimited.warning("commit", "offset commit failed: %s", error or failed[0].error)
        else:
            metrics.kafka_commits.labels("ok").inc()

    def _on_stats(self, document: str) -> None:
        try:
            stats = msgspec.json.decode(document)
        except msgspec.DecodeError:
            return
        if isinstance(stats, dict):
            metrics.snapshots.publish_rdkafka(stats)


class _RdkafkaLog(logging.Logger):
    """librdkafka's log lines (served on the loop thread), rate-limited per facility.

    librdkafka repeats the same complaint every few ms while a broker is down.
    """

    def __init__(self) -> None:
        super().__init__("purged.kafka")

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        facility = str(args[0]) if args else ""
        text = " ".join(str(a) for a in args[2:]) if len(args) > 2 else str(msg)
        if level >= logging.WARNING:
            ratelimited.warning(f"rdkafka-{facility}", "kafka: %s: %s", facility, text)
        else:
            log.log(level, "kafka: %s: %s", facility, text)


def _moved(tracks: list[PartitionTrack]) -> list[tuple[PartitionTrack, int]]:
    """The tracks whose low-water mark moved since their last commit, with the new mark."""
    return [
        (track, track.committable)
        for track in tracks
        if track.committable is not None and track.committable != track.committed
    ]


def _offsets(moved: list[tuple[PartitionTrack, int]]) -> list[TopicPartition]:
    return [TopicPartition(track.topic, track.partition, offset) for track, offset in moved]


def _names(partitions: list[TopicPartition]) -> str:
    return ",".join(f"{p.topic}[{p.partition}]" for p in partitions) or "nothing"


async def _first(*awaitables: Any) -> None:
    """Wait until the first of several awaitables finishes; cancel the rest."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
