"""systemd's notify protocol (sd_notify), spoken directly over NOTIFY_SOCKET.

Hand-written because it is one datagram on a Unix socket; a library would add a
dependency (and often a C extension) for five lines.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    """Sends READY=1 / STOPPING=1 / WATCHDOG=1 to systemd when run as a Type=notify unit."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):  # abstract namespace
            address = "\0" + address[1:]
        self._address = address
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        watched = usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid()))
        # Ping at half the interval, as sd_watchdog_enabled(3) advises.
        self.watchdog_interval = int(usec) / 2e6 if watched else 0.0
        self._socket: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        """True when systemd (or a test) listens."""
        return bool(self._address)

    def notify(self, message: str) -> None:
        """Send one notification; never raises (systemd going away must not stop purging)."""
        if not self._address:
            return
        try:
            if self._socket is None:
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                )
            self._socket.sendto(message.encode(), self._address)
        except OSError:
            pass

    def close(self) -> None:
        """Close the socket."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None
