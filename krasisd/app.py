"""The aiohttp application: the one route table, request guards, and error mapping.

Every exception a handler raises becomes an HTTP status here and nowhere else
(:func:`status_for`); ``/v1`` routes answer errors in OpenAI's shape, the others in
Ollama's ``{"error": "..."}``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from krasisd import routes_inference, routes_models, routes_openai
from krasisd.api import ApiError
from krasisd.client_errors import client_message
from krasisd.config import is_loopback
from krasisd.context import DAEMON_KEY, Daemon, daemon_of, over_tcp
from krasisd.runners import RunnerDied, RunnerLoadError, RunnerRequestError
from krasisd.scheduler import NoRoom, QueueFull

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
__all__ = ["Daemon", "make_app", "status_for"]


# ------------------------------------------------------------------ routes

# HEAD is where Ollama has it (/, /api/version, /api/tags, /api/blobs/:digest); aiohttp
# answers HEAD with the handler's status and headers, without the body.
ROUTES: list[tuple[str, str, Handler]] = [
    # status
    ("GET", "/", routes_models.root),
    ("HEAD", "/", routes_models.root),
    ("GET", "/api/version", routes_models.version),
    ("HEAD", "/api/version", routes_models.version),
    # inference
    ("POST", "/api/generate", routes_inference.generate),
    ("POST", "/api/chat", routes_inference.chat),
    # models
    ("GET", "/api/tags", routes_models.tags),
    ("HEAD", "/api/tags", routes_models.tags),
    ("POST", "/api/show", routes_models.show),
    ("GET", "/api/ps", routes_models.ps),
    ("POST", "/api/pull", routes_models.pull),
    ("POST", "/api/create", routes_models.create),
    ("POST", "/api/copy", routes_models.copy),
    ("POST", "/api/push", routes_models.push),
    ("HEAD", "/api/blobs/{digest}", routes_models.blob_exists),
    ("POST", "/api/blobs/{digest}", routes_models.blob_upload),
    ("DELETE", "/api/delete", routes_models.delete),
    # OpenAI compatibility
    ("GET", "/v1/models", routes_openai.models),
    ("GET", "/v1/models/{model:.+}", routes_openai.model),
    ("POST", "/v1/chat/completions", routes_openai.chat_completions),
    ("POST", "/v1/completions", routes_openai.completions),
]


# ------------------------------------------------------------------ errors

def status_for(exc: BaseException) -> tuple[int, str]:
    """The HTTP status and message for an exception a handler raised."""
    import krasis_registry as registry

    if isinstance(exc, ApiError):
        return exc.status, str(exc)
    if isinstance(exc, RunnerRequestError):  # its text may come from the engine's libraries
        return exc.status, client_message(str(exc))
    if isinstance(exc, registry.StorageFull):  # a PullError too: checked first
        return 507, str(exc)  # "insufficient storage: ..."
    if isinstance(exc, (registry.InvalidName, registry.PullError)):
        return 400, str(exc)  # PullError: unknown model, not a folder, exists, hub refused
    if isinstance(exc, registry.ModelNotFound):
        return 404, str(exc)
    if isinstance(exc, registry.ModelInUse):
        return 409, str(exc)
    if isinstance(exc, (QueueFull, NoRoom)):
        return 503, str(exc)
    if isinstance(exc, (registry.RegistryError, RunnerLoadError, RunnerDied)):
        return 500, client_message(str(exc))
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return 413, f"request body too large: {exc.text} (KRASIS_MAX_BODY)"
    if isinstance(exc, web.HTTPException):
        return exc.status, exc.reason
    log.exception("unexpected error", exc_info=exc)
    return 500, f"internal error ({type(exc).__name__}); the daemon's log has the details"


def error_body(path: str, status: int, message: str) -> dict:
    """Ollama's {"error": "..."}, or OpenAI's {"error": {...}} under /v1."""
    if path.startswith("/v1/"):
        kind = "invalid_request_error" if status < 500 else "api_error"
        return {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return {"error": message}


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map every exception to a JSON error with the right status (the one place)."""
    detail = ""  # the whole text for the log, when the client gets a shorter one
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        status, message = status_for(exc)
    except Exception as exc:  # noqa: BLE001 - every error becomes a response
        if isinstance(exc, ConnectionError) and _client_gone(request):
            # Nobody to answer; the request line logs status 499. Re-raising would make
            # aiohttp log a traceback at ERROR for every client that leaves mid-stream.
            return web.Response(status=499)
        status, message = status_for(exc)
        detail = str(exc)
    if status >= 500:
        log.warning("request failed", extra={"path": request.path, "status": status,
                                             "error": detail or message})
    return web.json_response(error_body(request.path, status, message), status=status)


@web.middleware
async def log_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One log line per request: method, path, status and duration (as Ollama's access log)."""
    started = time.monotonic()
    status = 499  # the client went away before an answer (nginx's convention)
    try:
        response = await handler(request)
        status = response.status
        return response
    finally:
        log.info("request", extra={"method": request.method, "path": request.path,
                                   "status": status,
                                   "duration_ms": round((time.monotonic() - started) * 1000, 1)})


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


# ------------------------------------------------------------------ guards

def _host_name(header: str) -> str:
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


def host_allowed(host_header: str, daemon: Daemon) -> bool:
    """Loopback names, the listener's own address and KRASIS_ALLOWED_HOSTS."""
    host = _host_name(host_header.strip()).lower().rstrip(".")  # 'name.' is 'name' (DNS)
    if not host:
        return False
    allowed = {h.lower() for h in daemon.config.allowed_hosts} | daemon.extra_hosts
    if "*" in allowed or host in allowed:
        return True
    return is_loopback(host) or host.endswith(".localhost")


def origin_allowed(origin: str, daemon: Daemon) -> bool:
    """Loopback web pages, local app schemes, and KRASIS_ORIGINS ('*' allows all)."""
    allowed = daemon.config.origins
    if "*" in allowed or origin in allowed:
        return True
    scheme, _, rest = origin.partition("://")
    if scheme in ("app", "file", "tauri", "vscode-webview", "vscode-file"):
        return True
    return scheme in ("http", "https") and host_allowed(rest, daemon)


@web.middleware
async def guard_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """On TCP: refuse foreign Host headers (DNS rebinding) and foreign browser origins."""
    if not over_tcp(request):
        return await handler(request)
    daemon = daemon_of(request)
    host = request.headers.get("Host", "")
    if not host_allowed(host, daemon):
        log.warning("refused request with a foreign Host header", extra={"host": host})
        return web.json_response(error_body(request.path, 403, f"host {host!r} is not allowed "
                                            "(KRASIS_ALLOWED_HOSTS)"), status=403)
    origin = request.headers.get("Origin")
    if origin is not None and not origin_allowed(origin, daemon):
        return web.json_response(error_body(request.path, 403, f"origin {origin!r} is not "
                                            "allowed (KRASIS_ORIGINS)"), status=403)
    if request.method == "OPTIONS" and origin:
        response = web.Response(status=204)
    else:
        response = await handler(request)
    if origin and not response.prepared:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
        response.headers["Access-Control-Allow-Methods"] = "GET, HEAD, POST, DELETE, OPTIONS"
    return response


def make_app(daemon: Daemon) -> web.Application:
    """The application with its middlewares, routes and body size limit."""
    app = web.Application(middlewares=[log_middleware, guard_middleware, errors_middleware],
                          client_max_size=daemon.config.max_body_bytes)
    app[DAEMON_KEY] = daemon
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)
    return app
