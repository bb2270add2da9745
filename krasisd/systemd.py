"""systemd integration: sd_notify messages, the watchdog and socket activation.

Speaks the protocols directly (they are one datagram and a few environment variables), so
nothing outside the standard library is needed and everything is a no-op outside systemd.

- ``notify("READY=1")`` / ``ready()`` / ``status(text)`` / ``watchdog()`` / ``stopping()``
  send to ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace).
- ``watchdog_interval_s()`` reads ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``, when set, must be
  this process); ``run_watchdog()`` pings at half that interval from an asyncio task.
- ``listen_fds()`` returns the sockets passed by socket activation (``$LISTEN_FDS`` from fd 3,
  for this process per ``$LISTEN_PID``) and unsets those variables so children do not see them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3
_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def _notify_address(value: str) -> str | None:
    """The address to send to, from $NOTIFY_SOCKET: a path or '@abstract'."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    log.warning("sd_notify: unsupported NOTIFY_SOCKET address %r", value)
    return None


def notify(state: str, unset_environment: bool = False) -> bool:
    """Send one sd_notify message (lines like 'READY=1'); False when not under systemd."""
    value = os.environ.get("NOTIFY_SOCKET", "")
    if unset_environment:
        os.environ.pop("NOTIFY_SOCKET", None)
    if not value:
        return False
    address = _notify_address(value)
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("sd_notify: sending %r to %r failed: %s", state, value, exc)
        return False
    log.debug("sd_notify: sent %r", state)
    return True


def ready(status_text: str | None = None) -> bool:
    """Tell systemd the service is up (Type=notify): READY=1, with an optional status line."""
    message = "READY=1"
    if status_text:
        message += "\nSTATUS=" + _one_line(status_text)
    return notify(message)


def status(text: str) -> bool:
    """Set the one-line status shown by `systemctl status`."""
    return notify("STATUS=" + _one_line(text))


def watchdog() -> bool:
    """Ping the service watchdog (WatchdogSec=)."""
    return notify("WATCHDOG=1")


def stopping(status_text: str | None = None) -> bool:
    """Tell systemd the service is shutting down."""
    message = "STOPPING=1"
    if status_text:
        message += "\nSTATUS=" + _one_line(status_text)
    return notify(message)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def watchdog_interval_s() -> float | None:
    """The watchdog timeout in seconds when systemd expects pings from this process, else None."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec:
        return None
    if pid and pid != str(os.getpid()):
        return None
    try:
        timeout_us = int(usec)
    except ValueError:
        log.warning("sd_notify: ignoring invalid WATCHDOG_USEC=%r", usec)
        return None
    if timeout_us <= 0:
        return None
    return timeout_us / 1_000_000


async def run_watchdog(interval_s: float | None = None) -> None:
    """Send WATCHDOG=1 every half timeout until cancelled; returns at once if none is set."""
    timeout_s = interval_s if interval_s is not None else watchdog_interval_s()
    if not timeout_s:
        return
    period_s = timeout_s / 2
    log.info("systemd watchdog: pinging every %.1f s", period_s)
    while True:
        watchdog()
        await asyncio.sleep(period_s)


def listen_fds(unset_environment: bool = True) -> list[socket.socket]:
    """Sockets passed by systemd socket activation (from fd 3), or [] when there are none."""
    pid = os.environ.get("LISTEN_PID", "")
    count = os.environ.get("LISTEN_FDS", "")
    if unset_environment:
        for name in _LISTEN_VARS:
            os.environ.pop(name, None)
    if not pid or not count:
        return []
    try:
        if int(pid) != os.getpid():
            log.info("socket activation: LISTEN_PID=%s is not this process; ignoring", pid)
            return []
        num_fds = int(count)
    except ValueError:
        log.warning("socket activation: invalid LISTEN_PID=%r / LISTEN_FDS=%r", pid, count)
        return []
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + num_fds):
        os.set_inheritable(fd, False)
        try:
            sockets.append(socket.socket(fileno=fd))
        except OSError as exc:
            log.warning("socket activation: fd %d is not a socket: %s", fd, exc)
    log.info("socket activation: received %d socket(s)", len(sockets))
    return sockets
