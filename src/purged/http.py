"""HTTP/1.1 response reading for pipelined PURGEs (sans-I/O, over httptools).

Requests are encoded in `purged.url.encode_purge`; this module turns the bytes a cache sends
back into the statuses of complete responses, in order, whatever way they are split.
"""

from __future__ import annotations

import httptools


class ProtocolError(Exception):
    """The cache sent something that is not an HTTP/1.1 response stream."""


class ResponseReader:
    """Incremental reader of one connection's responses.

    `feed` returns the statuses of the responses completed by the new bytes (Content-Length,
    chunked and close-delimited bodies are all read completely). After a response that ends
    the connection (`Connection: close`, HTTP/1.0), `closing` is True and later bytes are
    ignored: the caller closes the connection and re-sends what was not answered.
    """

    __slots__ = ("_completed", "_headers_status", "_parser", "closing")

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._completed: list[int] = []
        self._headers_status = 0
        self.closing = False

    # httptools callbacks
    def on_headers_complete(self) -> None:
        self._headers_status = self._parser.get_status_code()

    def on_message_complete(self) -> None:
        status = self._parser.get_status_code()
        self._headers_status = 0
        if 100 <= status < 200:
            return  # interim response: the real one follows
        if not self._parser.should_keep_alive():
            self.closing = True
        self._completed.append(status)

    def feed(self, data: bytes) -> list[int]:
        """Statuses of the responses that `data` completed, oldest first."""
        if self.closing:
            return []
        self._completed = completed = list[int]()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as error:
            if self.closing:  # bytes after the last response of a closing connection
                return completed
            raise ProtocolError(str(error)) from None
        except httptools.HttpParserUpgrade:  # not an HttpParserError: 101 or Connection: upgrade
            if self.closing:
                return completed
            raise ProtocolError("the cache switched protocols (upgrade)") from None
        return completed

    def eof(self) -> int | None:
        """At connection close: the status of a response whose headers had arrived.

        That covers bodies delimited by the close; a body cut short also counts as answered,
        since the cache has acted on the PURGE once it sent its status.
        """
        status, self._headers_status = self._headers_status, 0
        return status or None
