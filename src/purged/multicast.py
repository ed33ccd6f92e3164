"""The HTCP multicast source: CLR datagrams from multicast groups → purges in the pipeline.

UDP cannot be paused: when the pipeline is full, good packets are dropped and counted
(`purged_htcp_packets_dropped_total`) rather than left to overflow the kernel buffer
unseen. Datagrams are drained in batches from a non-blocking socket on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from typing import Protocol

from purged import metrics
from purged.htcp import MAX_DATAGRAM, HtcpError, decode_clr
from purged.logs import log, ratelimited
from purged.url import PurgeTarget, UrlError, parse_purge_url

HTCP_PORT = 4827
DEFAULT_BUFSIZE = 16 * 1024 * 1024
# Datagrams read per wake-up: enough to amortise the wake-up, few enough to let the
# pipeline's own tasks run between batches.
BATCH = 256

# Linux values, missing from Python's socket module.
_SO_RCVBUFFORCE = 33
_IP_MULTICAST_ALL = 49
# With MSG_TRUNC, Linux returns a datagram's real size even when it did not fit the buffer.
_MSG_TRUNC = getattr(socket, "MSG_TRUNC", 0)
_MULTICAST = ipaddress.IPv4Network("224.0.0.0/4")


class PurgeSink(Protocol):
    """What a source needs from the pipeline."""

    @property
    def full(self) -> bool:
        """True when no more purges may be accepted now."""
        ...

    # HTCP has nothing to acknowledge, so the pipeline's optional ticket is never passed
    # (and its type does not matter here).
    def submit(self, target: PurgeTarget) -> None:
        """Accept one purge."""
        ...


def parse_groups(text: str) -> list[str]:
    """Parse `-mcast_addrs`: comma-separated IPv4 multicast groups ("" gives []).

    Raises ValueError naming the offending item. Duplicates are dropped (joining a group
    twice fails).
    """
    groups: list[str] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        group = _multicast_group(item)
        if group not in groups:
            groups.append(group)
    return groups


def _multicast_group(text: str) -> str:
    try:
        address = ipaddress.IPv4Address(text)
    except ValueError:
        raise ValueError(f"multicast group {text!r} is not an IPv4 address") from None
    if address not in _MULTICAST:
        raise ValueError(f"{text!r} is not an IPv4 multicast group (224.0.0.0/4)")
    return str(address)


def open_socket(
    groups: list[str], port: int = HTCP_PORT, iface: str = "", bufsize: int = DEFAULT_BUFSIZE
) -> socket.socket:
    """A non-blocking UDP socket bound to 0.0.0.0:`port` that has joined every group.

    `iface` is the IPv4 address of the interface to join on ("" lets the kernel pick by
    route, as INADDR_ANY). `bufsize` is the kernel receive buffer asked for (forced when
    permitted; <= 0 keeps the kernel default); the size obtained is logged. Raises OSError
    with a message naming the group or interface at fault.
    """
    if not groups:
        raise OSError("no multicast group to join")
    try:
        joins = [_multicast_group(group) for group in groups]
        interface = socket.inet_aton(str(ipaddress.IPv4Address(iface or "0.0.0.0")))
    except ValueError as error:
        raise OSError(f"cannot listen for HTCP: {error}") from None
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if bufsize > 0:
            _set_receive_buffer(sock, bufsize)
        # Receive only the groups joined here, not those other sockets joined on this port
        # (not Linux: the kernel's default is all we can have).
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_IP, _IP_MULTICAST_ALL, 0)
        sock.bind(("0.0.0.0", port))
        for group in joins:
            try:
                sock.setsockopt(
                    socket.IPPROTO_IP,
                    socket.IP_ADD_MEMBERSHIP,
                    socket.inet_aton(group) + interface,
                )
            except OSError as error:
                raise OSError(
                    error.errno,
                    f"cannot join multicast group {group} on interface "
                    f"{iface or 'any (by route)'}: {error.strerror}",
                ) from None
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    log.info(
        "HTCP: listening on UDP port %d for groups %s on interface %s",
        sock.getsockname()[1],
        ",".join(joins),
        iface or "any",
    )
    return sock


def _set_receive_buffer(sock: socket.socket, bufsize: int) -> None:
    try:
        # Beyond net.core.rmem_max, but needs CAP_NET_ADMIN.
        sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, bufsize)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)
    given = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    # Linux reports twice the size asked (it counts its bookkeeping), hence the comparison.
    if given < bufsize:
        log.warning(
            "HTCP: receive buffer is %d bytes, asked %d: raise net.core.rmem_max "
            "or run with CAP_NET_ADMIN to avoid losing datagrams in bursts",
            given,
            bufsize,
        )
    else:
        log.info("HTCP: receive buffer is %d bytes (asked %d)", given, bufsize)


_SO_MEMINFO = 55  # from <asm-generic/socket.h>; Python has no constant for it
_SK_MEMINFO_VARS = 9  # u32 fields of struct sk_meminfo
_SK_MEMINFO_DROPS = 8  # index of the socket's drop count


class HtcpSource:
    """Reads HTCP CLR datagrams from multicast groups and submits their URLs as purges.

    Every datagram counts its bytes in `purged_udp_bytes_read_total` and is counted in
    `purged_htcp_packets_total{state}`: "bad" when it is not a well-formed CLR of an
    absolute http(s) URL (logged, rate-limited), "good" otherwise. A good packet that
    arrives while the sink is full is dropped and counted in
    `purged_htcp_packets_dropped_total`.
    """

    def __init__(
        self,
        sink: PurgeSink,
        groups: list[str],
        port: int = HTCP_PORT,
        iface: str = "",
        bufsize: int = DEFAULT_BUFSIZE,
    ) -> None:
        self.sink = sink
        self.groups = list(groups)
        self.port = port  # 0 picks a free port; the port bound is here once `ready` is set
        self.iface = iface
        self.bufsize = bufsize
        self.ready = asyncio.Event()  # set once the socket has joined every group
        # One byte more than the largest datagram accepted, so that a bigger one shows.
        self._buffer = bytearray(MAX_DATAGRAM + 1)
        self._view = memoryview(self._buffer)
        self._socket: socket.socket | None = None
        self._kernel_drops = 0
        self._good = metrics.htcp_packets.labels("good")
        self._bad = metrics.htcp_packets.labels("bad")

    async def run(self) -> None:
        """Open the socket, then read until cancelled; the socket is closed on the way out.

        Raises OSError at once if the socket cannot be opened or a group joined.
        """
        loop = asyncio.get_running_loop()
        sock = open_socket(self.groups, self.port, self.iface, self.bufsize)
        try:
            self.port = sock.getsockname()[1]
            self._socket = sock
            fd = sock.fileno()
            loop.add_reader(fd, self._read_batch, sock)
            try:
                self.ready.set()
                await loop.create_future()  # the reader callback does the work
            finally:
                loop.remove_reader(fd)
        finally:
            self.ready.clear()
            self._socket = None
            sock.close()

    def count_kernel_drops(self) -> None:
        """Add the datagrams the kernel dropped since the last call to their counter.

        The receive buffer overflows when bursts outrun us; only the kernel sees those
        losses, and this makes them visible (SO_MEMINFO's SK_MEMINFO_DROPS, Linux >= 4.6).
        """
        if self._socket is None:
            return
        try:
            meminfo = self._socket.getsockopt(socket.SOL_SOCKET, _SO_MEMINFO, 4 * _SK_MEMINFO_VARS)
        except OSError:
            return
        drops = int.from_bytes(meminfo[4 * _SK_MEMINFO_DROPS : 4 * _SK_MEMINFO_DROPS + 4], "little")
        if drops > self._kernel_drops:
            metrics.udp_kernel_drops.inc(drops - self._kernel_drops)
        self._kernel_drops = drops

    def _read_batch(self, sock: socket.socket) -> None:
        """Reader callback: handle up to BATCH datagrams; never raises for bad input."""
        recv_into = sock.recv_into
        buffer, view, sink = self._buffer, self._view, self.sink
        good = bad = dropped = nbytes = 0
        try:
            for _ in range(BATCH):
                try:
                    size = recv_into(buffer, 0, _MSG_TRUNC)
                except BlockingIOError:
                    break
                except OSError as error:
                    ratelimited.warning("htcp_recv", "HTCP: receiving failed: %s", error)
                    break
                nbytes += size
                try:
                    # A datagram over MAX_DATAGRAM fills the whole buffer: decode says too_big.
                    packet = decode_clr(view[:size])
                    target = parse_purge_url(packet.uri)
                except HtcpError as error:
                    bad += 1
                    ratelimited.warning(
                        "htcp_bad_" + error.reason,
                        "HTCP: bad datagram of %d bytes (%s): %s",
                        size,
                        error.reason,
                        error,
                    )
                    continue
                except UrlError as error:
                    bad += 1
                    ratelimited.warning(
                        "htcp_bad_url", "HTCP: bad URL %.300r: %s", packet.uri, error
                    )
                    continue
                good += 1
                if sink.full:
                    dropped += 1
                    ratelimited.warning(
                        "htcp_dropped",
                        "HTCP: pipeline full, dropping purges "
                        "(counted in purged_htcp_packets_dropped_total)",
                    )
                    continue
                sink.submit(target)
        finally:
            # Counted once per batch, and even if the sink raised, so that totals stay true.
            if nbytes:
                metrics.udp_bytes_read.inc(nbytes)
            if good:
                self._good.inc(good)
            if bad:
                self._bad.inc(bad)
            if dropped:
                metrics.htcp_dropped.inc(dropped)
