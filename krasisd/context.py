"""What every handler shares: the settings, the model catalog and the scheduler."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from krasisd.config import Config
from krasisd.models import ModelCatalog
from krasisd.scheduler import Scheduler


@dataclass
class Daemon:
    """The daemon's state, stored once on the aiohttp application."""

    config: Config
    catalog: ModelCatalog
    scheduler: Scheduler
    extra_hosts: set[str] = field(default_factory=set)  # the TCP listener's own names


DAEMON_KEY = web.AppKey("krasisd", Daemon)


def daemon_of(request: web.Request) -> Daemon:
    """The Daemon behind a request."""
    return request.app[DAEMON_KEY]


def over_tcp(request: web.Request) -> bool:
    """Whether the request came over the TCP listener (a peer address), not the Unix socket:
    TCP requests pass the Host/Origin guard and create's folder allow-list."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return isinstance(peer, tuple)
