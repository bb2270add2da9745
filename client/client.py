"""A small HTTP client for krasisd: Ollama's API over a Unix socket (or loopback TCP).

Every endpoint is a few lines over two private helpers: ``_do`` for one JSON answer and
``_stream`` for NDJSON progress and token streams. Standard library only, synchronous: the
CLI reads one stream at a time, and closing the connection is how an answer is cancelled.

Where the daemon is:
- ``KRASIS_SOCKET``: the Unix socket path;
- else ``KRASIS_HOST``: TCP, in the forms the daemon reads (``127.0.0.1:11434``,
  ``http://127.0.0.1:11434``, ``:11434``, ``localhost``: krasisd.address);
- else the daemon's own default, read through ``krasisd.config`` (so a ``socket`` set in the
  config file is found too): ``$XDG_RUNTIME_DIR/krasis/krasisd.sock``, or
  ``$KRASIS_HOME/krasisd.sock`` when XDG_RUNTIME_DIR is unset;
- and when that socket does not exist but the system service's does
  (``/run/krasis/krasisd.sock``), that one.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from krasisd.address import format_address

CONNECT_TIMEOUT_S = 5.0
SYSTEM_SOCKET = "/run/krasis/krasisd.sock"  # the system service's (systemd/krasisd.socket)


class KrasisError(Exception):
    """Base class for client errors; the message is meant for the user as it is."""


class ConnectError(KrasisError):
    """The daemon is not reachable (not running, or the socket is wrong)."""

    def __init__(self, address: str, reason: str):
        self.address = address
        self.reason = reason
        super().__init__(f"could not connect to krasisd at {address}: {reason}")


class ResponseError(KrasisError):
    """The daemon answered with an error: an HTTP error status or a final {"error": ...} line."""

    def __init__(self, error: str, status_code: int = -1):
        self.error = error
        self.status_code = status_code
        super().__init__(error)


def default_socket_path() -> Path:
    """The daemon's socket as krasisd itself resolves it (environment, then config file)."""
    from krasisd.config import load_config

    config_log = logging.getLogger("krasisd.config")
    level = config_log.level
    config_log.setLevel(logging.ERROR)  # bad settings are the daemon's to report
    try:
        return Path(load_config().socket)
    except ValueError as exc:  # krasisd.config.ConfigError: a setting the daemon refuses too
        raise KrasisError(str(exc)) from None
    finally:
        config_log.setLevel(level)


def _find_socket() -> Path:
    """The default socket; the system service's when only that one exists."""
    path = default_socket_path()
    if os.environ.get("KRASIS_SOCKET") or path.exists() or not os.path.exists(SYSTEM_SOCKET):
        return path
    return Path(SYSTEM_SOCKET)


def parse_host(value: str) -> tuple[str, int]:
    """KRASIS_HOST as the daemon reads it: '127.0.0.1:11434', 'http://[::1]:11434', ':11434',
    'localhost' (port 11434) -> (host, port)."""
    from krasisd.address import parse_host as parse_host_port

    try:
        return parse_host_port(value)
    except ValueError as exc:
        raise KrasisError(f"KRASIS_HOST={value!r} cannot be read: {exc}; use host:port, :port "
                          "or http://host:port (e.g. 127.0.0.1:11434)") from None


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP/1.1 over an AF_UNIX stream socket."""

    def __init__(self, socket_path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class Client:
    """krasisd's HTTP API: one method per endpoint."""

    def __init__(self, socket_path: str | os.PathLike | None = None, host: str | None = None):
        if socket_path is None and host is None and not os.environ.get("KRASIS_SOCKET"):
            host = os.environ.get("KRASIS_HOST") or None
        self.tcp = parse_host(host) if host else None
        self.socket_path = None if self.tcp else str(socket_path or _find_socket())

    @property
    def address(self) -> str:
        """Where the daemon is expected, for messages."""
        if self.tcp:
            return f"http://{format_address(*self.tcp)}"
        return str(self.socket_path)

    # -- transport -------------------------------------------------------------------------

    def _connect(self) -> http.client.HTTPConnection:
        if self.tcp:
            conn = http.client.HTTPConnection(*self.tcp, timeout=CONNECT_TIMEOUT_S)
        else:
            conn = _UnixHTTPConnection(self.socket_path, timeout=CONNECT_TIMEOUT_S)
        try:
            conn.connect()
        except FileNotFoundError:
            raise ConnectError(self.address, "no such socket") from None
        except ConnectionRefusedError:
            raise ConnectError(self.address, "connection refused") from None
        except PermissionError:
            raise ConnectError(self.address, "permission denied") from None
        except OSError as exc:
            raise ConnectError(self.address, exc.strerror or str(exc)) from None
        conn.sock.settimeout(None)  # an answer may wait for a model to load
        return conn

    def _send(self, method: str, path: str, body: Any = None):
        conn = self._connect()
        headers = {"Accept": "application/x-ndjson, application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
        except (ConnectionError, http.client.HTTPException) as exc:
            conn.close()
            raise ConnectError(self.address, f"connection lost ({exc})") from None
        except BaseException:
            conn.close()
            raise
        if response.status >= 400:
            payload = response.read()
            conn.close()
            raise ResponseError(_error_text(payload, response.reason), response.status)
        return conn, response

    def _do(self, method: str, path: str, body: Any = None) -> Any:
        """One request, one JSON answer (None for an empty body)."""
        conn, response = self._send(method, path, body)
        try:
            payload = response.read()
        finally:
            conn.close()
        return json.loads(payload) if payload.strip() else None

    def _stream(self, method: str, path: str, body: Any) -> Iterator[dict]:
        """One request, its NDJSON answer line by line; a line with "error" raises.

        Closing the generator (or an exception such as KeyboardInterrupt while reading) closes
        the connection, which is how the daemon learns that the answer is no longer wanted.
        """
        conn, response = self._send(method, path, body)
        try:
            for line in response:
                if not line.strip():
                    continue
                try:
                    part = json.loads(line)
                except json.JSONDecodeError:
                    raise ResponseError(f"bad line from the daemon: {line[:200]!r}") from None
                if isinstance(part, dict) and part.get("error"):
                    raise ResponseError(str(part["error"]), response.status)
                yield part
        except (ConnectionError, http.client.HTTPException) as exc:
            raise ResponseError(f"the daemon closed the stream ({exc})") from None
        finally:
            conn.close()

    # -- endpoints -------------------------------------------------------------------------

    def heartbeat(self) -> None:
        """HEAD /: raises ConnectError when the daemon is not there."""
        self._send("HEAD", "/")[0].close()

    def version(self) -> str:
        """The daemon's version: krasis_version ("version" is the Ollama release whose API
        it speaks, for clients that gate on it)."""
        body = self._do("GET", "/api/version")
        return body.get("krasis_version") or body["version"]

    def list(self) -> list[dict]:
        """The models on disk (/api/tags)."""
        return self._do("GET", "/api/tags").get("models", [])

    def ps(self) -> list[dict]:
        """The models loaded in runners (/api/ps)."""
        return self._do("GET", "/api/ps").get("models", [])

    def show(self, model: str) -> dict:
        """Details of one model (/api/show)."""
        return self._do("POST", "/api/show", {"model": model})

    def delete(self, model: str) -> None:
        """Remove a model from disk (/api/delete)."""
        self._do("DELETE", "/api/delete", {"model": model})

    def pull(self, model: str, insecure: bool = False) -> Iterator[dict]:
        """Download a model and build its caches; progress events as they come."""
        body = {"model": model, "insecure": insecure, "stream": True}
        return self._stream("POST", "/api/pull", body)

    def create(self, model: str, from_dir: str | os.PathLike) -> Iterator[dict]:
        """Register a model from a local folder of safetensors; progress events."""
        path = str(Path(from_dir).expanduser().resolve())
        body = {"model": model, "path": path, "stream": True}
        return self._stream("POST", "/api/create", body)

    def generate(self, model: str, prompt: str, **fields: Any) -> Iterator[dict]:
        """Stream a completion (/api/generate); fields: system, options, format, keep_alive..."""
        body = {"model": model, "prompt": prompt, **_unset_removed(fields), "stream": True}
        return self._stream("POST", "/api/generate", body)

    def chat(self, model: str, messages: list[dict], **fields: Any) -> Iterator[dict]:
        """Stream a chat answer (/api/chat); fields: options, format, keep_alive..."""
        body = {"model": model, "messages": messages, **_unset_removed(fields), "stream": True}
        return self._stream("POST", "/api/chat", body)

    def load(self, model: str, keep_alive: Any = None) -> dict:
        """Load a model without generating (an empty /api/generate, as Ollama does)."""
        body = _unset_removed({"model": model, "keep_alive": keep_alive, "stream": False})
        return self._do("POST", "/api/generate", body)

    def stop(self, model: str) -> dict:
        """Unload a model now (an empty /api/generate with keep_alive 0, as Ollama does)."""
        return self._do("POST", "/api/generate", {"model": model, "keep_alive": 0, "stream": False})


def _unset_removed(fields: dict) -> dict:
    return {key: value for key, value in fields.items() if value is not None}


def _error_text(payload: bytes, reason: str) -> str:
    """The message of an error answer: {"error": ...} when it is JSON, else the text."""
    text = payload.decode("utf-8", errors="replace").strip()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return text or reason
    if isinstance(data, dict) and data.get("error"):
        return str(data["error"])
    return text or reason
