"""Multicast helpers for HTCP tests on the loopback interface.

On ``lo`` multicast works without extra routes when the sender sets ``IP_MULTICAST_IF`` to
127.0.0.1 with ``IP_MULTICAST_LOOP`` on, and the receiver joins the group on interface
127.0.0.1 (infra.md). A receiver that joins on INADDR_ANY (as production daemons do) is
joined on the default route's interface and sees nothing sent here: such tests need a
private network namespace with ``224.0.0.0/4 dev lo``.

Packets are raw bytes: the HTCP CLR encoder is ``purged.htcp``'s business.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable

LOOPBACK = "127.0.0.1"
HTCP_PORT = 4827
# Linux <netinet/in.h>; not exported by Python 3.11's socket module.
IP_MULTICAST_ALL = getattr(socket, "IP_MULTICAST_ALL", 49)


def _groups(groups: str | Iterable[str]) -> list[str]:
    if isinstance(groups, str):
        return [g.strip() for g in groups.split(",") if g.strip()]
    return list(groups)


def sender_socket() -> socket.socket:
    """A UDP socket that sends multicast out of ``lo`` only and loops it back locally.

    TTL 0 keeps every datagram on this host even if routing changes; it joins nothing."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(LOOPBACK))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 0)
    return sock


def send_htcp(packets: Iterable[bytes], groups: str | Iterable[str], port: int = HTCP_PORT) -> int:
    """Send every packet to every group (``"a,b"`` or a list) on ``port``; return the number
    of datagrams sent."""
    targets = _groups(groups)
    sent = 0
    with sender_socket() as sock:
        for packet in packets:
            for group in targets:
                sock.sendto(packet, (group, port))
                sent += 1
    return sent


def receiver_socket(
    groups: str | Iterable[str], port: int = HTCP_PORT, rcvbuf: int | None = None
) -> socket.socket:
    """A UDP socket bound to ``0.0.0.0:port`` (SO_REUSEADDR) that joined ``groups`` on
    interface 127.0.0.1, so it receives what :func:`send_htcp` sends.

    ``IP_MULTICAST_ALL`` is switched off: by default Linux delivers to a socket bound to
    0.0.0.0:port the datagrams of *every* group that any socket on the host joined, not just
    the groups this socket joined."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IP, IP_MULTICAST_ALL, 0)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind(("0.0.0.0", port))
        for group in _groups(groups):
            mreq = struct.pack("4s4s", socket.inet_aton(group), socket.inet_aton(LOOPBACK))
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
    except BaseException:
        sock.close()
        raise
    return sock
