"""The purge pipeline: one URL goes source → backend → (delay) → frontend → done.

Everything here is owned by the event loop thread; nothing is shared with another thread.
The pipeline accepts purges from the sources, hands them to the backend layer, moves each
answered one to the frontend layer (which holds it for the frontend delay), and when the
frontend has answered, finishes the Kafka messages it carries so their offsets may be
committed. It bounds the number of purges in flight and tells the sources when to pause.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque

from purged import metrics
from purged.url import PurgeTarget, encode_purge


class Ticket:
    """One Kafka message's claim on its partition's commit: done when its purge is finished."""

    __slots__ = ("done", "offset", "track")

    def __init__(self, track: PartitionTrack, offset: int) -> None:
        self.track = track
        self.offset = offset
        self.done = False

    def finish(self) -> None:
        """The message needs nothing more; its offset may be committed once all before it are."""
        self.done = True
        track = self.track
        if track.tickets and track.tickets[0] is self:
            track.advance()


class PartitionTrack:
    """Completion of one partition's messages, in the order they were consumed.

    `committable` is the low-water mark: the offset after the last message of an unbroken
    run of finished ones, i.e. the offset to commit (at-least-once: nothing unfinished is
    ever below it).
    """

    __slots__ = ("committable", "committed", "partition", "tickets", "topic")

    def __init__(self, topic: str, partition: int) -> None:
        self.topic = topic
        self.partition = partition
        self.tickets: deque[Ticket] = deque()
        self.committable: int | None = None  # next offset to consume, once all before are done
        self.committed: int | None = None  # what we last asked the broker to commit

    def ticket(self, offset: int) -> Ticket:
        """A ticket for a message that is being purged."""
        ticket = Ticket(self, offset)
        self.tickets.append(ticket)
        return ticket

    def skip(self, offset: int) -> None:
        """A message that is deliberately not purged (expired, malformed, filtered)."""
        if self.tickets:
            ticket = Ticket(self, offset)
            ticket.done = True
            self.tickets.append(ticket)
        else:
            self.committable = offset + 1

    def advance(self) -> None:
        """Drop the finished tickets at the head and move the low-water mark past them."""
        tickets = self.tickets
        last = None
        while tickets and tickets[0].done:
            last = tickets.popleft()
        if last is not None:
            self.committable = last.offset + 1

    @property
    def unfinished(self) -> int:
        """Messages consumed and not yet finished (or finished behind an unfinished one)."""
        return len(self.tickets)


class Purge:
    """One URL on its way through the layers, with the Kafka messages waiting for it."""

    __slots__ = ("attempts", "dead", "due", "latest_due", "request", "tickets")

    def __init__(self, request: bytes, tickets: list[Ticket]) -> None:
        self.request = request  # the complete PURGE request, the same bytes for both layers
        self.tickets = tickets
        self.attempts = 0  # 5xx answers in the current layer
        self.due = 0.0  # loop time when the frontend may send it
        self.latest_due = 0.0  # (frontend) however often superseded, sent by this time
        self.dead = False  # superseded by a later purge of the same URL: skip it


class Layer:
    """What the pipeline needs of a cache layer (implemented in `purged.cache`)."""

    def enqueue(self, purge: Purge) -> bool:
        """Queue a purge; False when it was merged into one already waiting (coalesced)."""
        raise NotImplementedError


class Pipeline:
    """Accepts purges, bounds them, and carries each from the backend to the frontend."""

    def __init__(self, *, max_pending: int, host_regex: re.Pattern[str] | None = None) -> None:
        self.max_pending = max_pending
        # Resume at half: librdkafka takes up to ~1 s to fetch again after a resume, and the
        # caches must not run dry meanwhile.
        self._resume_at = max_pending // 2
        self._host_regex = host_regex
        self.pending = 0  # purges accepted and not finished on both layers
        self.backend: Layer = Layer()
        self.frontend: Layer = Layer()
        self.room = asyncio.Event()  # set while the sources may submit
        self.room.set()
        self.idle = asyncio.Event()  # set while nothing is pending (for the drain)
        self.idle.set()
        self._skipped_host = metrics.urls_skipped.labels("host_regex")

    def connect(self, backend: Layer, frontend: Layer) -> None:
        """Attach the two cache layers (they call back `backend_done` / `frontend_done`)."""
        self.backend = backend
        self.frontend = frontend

    @property
    def full(self) -> bool:
        """True when the sources must stop submitting until `room` is set again."""
        return self.pending >= self.max_pending

    def submit(self, target: PurgeTarget, ticket: Ticket | None = None) -> None:
        """Accept one purge for both layers; `ticket` finishes when the frontend answered."""
        if self._host_regex is not None and self._host_regex.search(target.host) is None:
            self._skipped_host.inc()
            if ticket is not None:
                ticket.finish()
            return
        purge = Purge(encode_purge(target), [ticket] if ticket is not None else [])
        if self.backend.enqueue(purge):
            self.pending += 1
            if self.pending == 1:
                self.idle.clear()
            if self.pending >= self.max_pending:
                self.room.clear()

    def backend_done(self, purge: Purge) -> None:
        """The backend answered: the frontend's turn, after its delay."""
        purge.attempts = 0
        if not self.frontend.enqueue(purge):
            self._finish_one()  # merged into a purge of the same URL waiting for the frontend

    def superseded(self, older: Purge) -> None:
        """A purge waiting for the frontend was replaced by a later one of the same URL."""
        self._finish_one()

    def frontend_done(self, purge: Purge) -> None:
        """Both layers are done with this URL: finish the Kafka messages it carried."""
        for ticket in purge.tickets:
            ticket.finish()
        self._finish_one()

    def _finish_one(self) -> None:
        self.pending -= 1
        if self.pending <= self._resume_at:
            self.room.set()
        if self.pending == 0:
            self.idle.set()
