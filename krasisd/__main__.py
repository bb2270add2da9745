"""`krasisd` / `python -m krasisd`: run the daemon in the foreground."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from krasisd import __version__
from krasisd.address import listen_error
from krasisd.config import ConfigError, load_config
from krasisd.logs import setup_logging
from krasisd.server import AlreadyRunning, serve

log = logging.getLogger("krasisd")


def main(argv: list[str] | None = None) -> int:
    """Load the settings, log them, and serve until SIGTERM or Ctrl+C."""
    parser = argparse.ArgumentParser(prog="krasisd", description="the krasis daemon "
                                     "(settings come from KRASIS_* variables; see docs/settings.md)")
    parser.add_argument("--version", action="version", version=f"krasisd {__version__}")
    parser.parse_args(argv)
    setup_logging()
    try:
        cfg = load_config()
    except ConfigError as exc:  # a setting that would start a different daemon than asked
        print(f"krasisd: {exc}", file=sys.stderr)
        return 2
    setup_logging(cfg.log_level, cfg.log_format)
    try:
        from setproctitle import setproctitle

        setproctitle("krasisd")
    except ImportError:
        log.warning("setproctitle is not installed; the process keeps its python title")
    log.info("starting krasisd", extra={"version": __version__, **cfg.as_log_dict()})
    try:
        asyncio.run(serve(cfg))
    except AlreadyRunning as exc:
        print(f"krasisd: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the TCP port: taken, or not this machine's address
        message = listen_error(exc, cfg.tcp_address)
        if message is None:
            raise
        print(f"krasisd: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
