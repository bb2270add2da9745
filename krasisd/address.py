"""KRASIS_HOST and KRASIS_ALLOWED_HOSTS: TCP addresses and host names, read as Ollama reads
OLLAMA_HOST.

One reader for the daemon (its listener) and the client (where it connects), so both take the
same forms: ``127.0.0.1:11434``, ``http://127.0.0.1:11434``, ``http://localhost:11434/``,
``:11434`` (the host defaults to 127.0.0.1), ``localhost`` (the port defaults to 11434,
Ollama's), ``[::1]:11434`` and ``::1``. A value that is none of these raises ValueError with the
reason; nothing is guessed. Standard library only.
"""

from __future__ import annotations

import errno
import ipaddress
import re

DEFAULT_TCP_PORT = 11434  # Ollama's port: editors set up for Ollama find the daemon there
DEFAULT_TCP_HOST = "127.0.0.1"
_HOST_NAME_RE = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_.])?")


def parse_host(value: str, default_port: int = DEFAULT_TCP_PORT) -> tuple[str, int]:
    """'host:port', 'http://host:port/', ':port', 'host', '[v6]:port' -> (host, port).

    The scheme is optional and only ``http://`` is taken (the daemon speaks plain HTTP); a path
    other than ``/`` is refused, since there is nothing to put it on. Raises ValueError.
    """
    text = str(value).strip()
    scheme, sep, rest = text.partition("://")
    if not sep:
        rest = text
    elif scheme.lower() != "http":
        raise ValueError(f"{scheme}:// is not supported: krasisd speaks plain http://")
    hostport, _, path = rest.partition("/")
    if path:
        raise ValueError(f"a path (/{path}) has no place here: give host:port")
    host, port_text = _split(hostport)
    return _checked_host(host or DEFAULT_TCP_HOST), _port(port_text, default_port)


def format_address(host: str, port: int) -> str:
    """(host, port) as 'host:port', with brackets around an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listen_error(exc: OSError, address: tuple[str, int] | None) -> str | None:
    """Why the TCP listener at ``address`` could not be opened, for one line on stderr; None
    when ``exc`` is not such an error (no listener asked for, or another errno)."""
    if address is None:
        return None
    where = format_address(*address)
    if exc.errno == errno.EADDRINUSE:
        return (f"cannot listen on KRASIS_HOST={where}: the port is in use (Ollama, or another "
                "server, may hold it); choose another, e.g. KRASIS_HOST=:11435")
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on KRASIS_HOST={where}: not an address of this machine"
    return None


def host_name(entry: str) -> str:
    """One KRASIS_ALLOWED_HOSTS entry as the Host check compares it: the name alone, in lower
    case, without a scheme, port, brackets or trailing dot ('http://Host.Docker.Internal:11434'
    -> 'host.docker.internal'). '*' stays '*'. Raises ValueError."""
    text = str(entry).strip()
    if text == "*":
        return text
    scheme, sep, rest = text.partition("://")
    if sep and scheme.lower() not in ("http", "https"):
        raise ValueError(f"{text!r} is not a host name")
    hostport = (rest if sep else text).partition("/")[0]
    host, port_text = _split(hostport)
    if port_text and not port_text.isdigit():
        raise ValueError(f"{text!r}: invalid port {port_text!r}")
    if not host:
        raise ValueError(f"{text!r} names no host")
    return _checked_host(host.rstrip(".") or host).lower()


def _split(hostport: str) -> tuple[str, str]:
    """'h:p', '[v6]:p', 'h', 'v6' -> (host, port text; '' when absent)."""
    if hostport.startswith("["):
        host, closed, after = hostport[1:].partition("]")
        if not closed or (after and not after.startswith(":")):
            raise ValueError(f"{hostport!r}: write an IPv6 address as [::1]:11434")
        return host, after[1:]
    if hostport.count(":") == 1:
        host, _, port_text = hostport.partition(":")
        return host, port_text
    return hostport, ""  # a name, or an IPv6 address without brackets (so without a port)


def _checked_host(host: str) -> str:
    if ":" in host:
        try:
            return str(ipaddress.IPv6Address(host))
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address "
                             "(write one as [::1]:11434)") from None
    if host.isdigit():
        raise ValueError(f"{host!r} is not a host name (for a port alone, write :{host})")
    if not _HOST_NAME_RE.fullmatch(host):
        raise ValueError(f"{host!r} is not a host name or IP address")
    return host


def _port(text: str, default_port: int) -> int:
    if not text:
        return default_port
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"invalid port {text!r}: use 1-65535")
    return int(text)
