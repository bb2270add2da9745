"""A fake krasisd for the CLI tests: aiohttp on a Unix socket, speaking Ollama's shapes.

It runs in a thread of the test process, records every request, and streams canned answers
(the text echoes the request, so tests can see what the CLI sent). The "slow" model streams
until the client goes away and records that it noticed.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

from aiohttp import web

MB = 1_000_000
BODY = web.RequestKey("body", dict)
GOOD_DIGEST = "sha256:" + "ab12" * 16


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def _model(name: str, size: int) -> dict:
    return {"name": name, "model": name, "size": size, "digest": GOOD_DIGEST,
            "modified_at": _iso(datetime.now(timezone.utc) - timedelta(days=2)),
            "details": {"family": "deepseek2", "parameter_size": "2.1M",
                        "quantization_level": "int4"}}


class FakeDaemon:
    """The daemon side of the CLI tests; ``requests`` holds (path, body) pairs."""

    def __init__(self, socket_path: Path):
        self.socket_path = socket_path
        self.requests: list[tuple[str, dict]] = []
        self.models = {"krasis-tiny:latest": _model("krasis-tiny:latest", 2 * MB),
                       "slow:latest": _model("slow:latest", 3 * MB)}
        now = datetime.now(timezone.utc)
        self.loaded = [
            {**_model("krasis-tiny:latest", 100 * MB), "size_vram": 0,
             "expires_at": _iso(now + timedelta(minutes=4, seconds=30))},
            {**_model("big:latest", 100 * MB), "size_vram": 52 * MB,
             "expires_at": _iso(now + timedelta(days=365 * 200)),
             "prefix_cache": {"bytes": 12 * MB, "blocks": 40, "hit_rate": 0.834}},
        ]
        self.cancelled = threading.Event()
        self.streaming = threading.Event()
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> FakeDaemon:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fake daemon did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _serve(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        runner = web.AppRunner(self._app())
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.UnixSite(runner, str(self.socket_path)).start())
        tcp = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(tcp.start())
        self.tcp_port = tcp._server.sockets[0].getsockname()[1]
        self._ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    def bodies(self, path: str) -> list[dict]:
        return [body for seen, body in self.requests if seen == path]

    # -- routes ------------------------------------------------------------------------------

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[self._record])
        app.router.add_get("/", self._root)
        app.router.add_get("/api/version", self._version)
        app.router.add_get("/api/tags", self._tags)
        app.router.add_get("/api/ps", self._ps)
        app.router.add_post("/api/show", self._show)
        app.router.add_delete("/api/delete", self._delete)
        app.router.add_post("/api/pull", self._pull)
        app.router.add_post("/api/create", self._create)
        app.router.add_post("/api/generate", self._generate)
        app.router.add_post("/api/chat", self._chat)
        return app

    async def _root(self, request: web.Request) -> web.Response:
        return web.Response(text="krasisd is running")

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": "9.9.9"})

    async def _tags(self, request: web.Request) -> web.Response:
        return web.json_response({"models": list(self.models.values())})

    async def _ps(self, request: web.Request) -> web.Response:
        return web.json_response({"models": self.loaded})

    @web.middleware
    async def _record(self, request: web.Request, handler):
        body = await request.json() if request.can_read_body else {}
        self.requests.append((request.path, body))
        request[BODY] = body
        return await handler(request)

    def _missing(self, name: str) -> web.Response | None:
        if name in self.models or f"{name}:latest" in self.models:
            return None
        return web.json_response({"error": f"model '{name}' not found"}, status=404)

    async def _show(self, request: web.Request) -> web.Response:
        name = request[BODY]["model"]
        return self._missing(name) or web.json_response({
            "parameters": 'stop "<|end|>"\ntemperature 0.6', "template": "{{ .Prompt }}",
            "license": "MIT License\nCopyright krasis\nmore\nlines",
            "details": self.models.get(name, self.models.get(f"{name}:latest"))["details"],
            "model_info": {"general.architecture": "deepseek2",
                           "general.parameter_count": 2_100_000,
                           "deepseek2.context_length": 4096, "deepseek2.embedding_length": 64,
                           "deepseek2.block_count": 2, "deepseek2.expert_count": 8,
                           "deepseek2.expert_used_count": 2},
            "capabilities": ["completion"], "source": "hub", "repo": "krasis/tiny",
            "commit": "0123456789abcdef", "state": "ready",
            "caches": [{"format": "cpu", "quant": "int4", "group_size": 128,
                        "size_bytes": 1_500_000, "state": "ready", "error": None},
                       {"format": "gpu", "quant": "int4", "group_size": 128,
                        "size_bytes": None, "state": "failed", "error": "no GPU"}]})

    async def _delete(self, request: web.Request) -> web.Response:
        name = request[BODY]["model"]
        missing = self._missing(name)
        if missing is None:
            self.models.pop(name, None) or self.models.pop(f"{name}:latest", None)
        return missing or web.Response()

    async def _ndjson(self, request: web.Request, parts: list[dict]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        for part in parts:
            await response.write(json.dumps(part).encode() + b"\n")
            await asyncio.sleep(0)
        await response.write_eof()
        return response

    async def _pull(self, request: web.Request) -> web.StreamResponse:
        name = request[BODY]["model"]
        events = [{"status": "pulling manifest"}]
        for file_name, digest, total in (("model.safetensors", "sha256:aa", 2 * MB),
                                         ("tokenizer.json", "sha256:bb", 3000)):
            for completed in (0, total // 2, total):
                events.append({"status": f"pulling {file_name}", "digest": digest,
                               "total": total, "completed": completed})
        if name.startswith("broken"):
            events.append({"error": "download failed: connection reset"})
        else:
            events += [{"status": "building cpu cache", "total": 4, "completed": n}
                       for n in range(5)]
            events += [{"status": "verifying sha256 digest"}, {"status": "success"}]
            self.models[f"{name}:latest"] = _model(f"{name}:latest", 2 * MB)
        return await self._ndjson(request, events)

    async def _create(self, request: web.Request) -> web.StreamResponse:
        body = request[BODY]
        if not Path(body["path"]).is_dir():
            return web.json_response({"error": "no such folder"}, status=400)
        self.models[f"{body['model']}:latest"] = _model(f"{body['model']}:latest", MB)
        return await self._ndjson(request, [{"status": "parsing config"},
                                            {"status": "building cpu cache", "total": 2,
                                             "completed": 2}, {"status": "success"}])

    def _final(self, name: str) -> dict:
        return {"model": name, "done": True, "done_reason": "stop",
                "total_duration": 2_000_000_000, "load_duration": 1_000_000,
                "prompt_eval_count": 8, "prompt_eval_duration": 4_000_000,
                "eval_count": 10, "eval_duration": 500_000_000}

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = request[BODY]
        missing = self._missing(body["model"])
        if missing:
            return missing
        if not body.get("prompt"):
            reason = "unload" if body.get("keep_alive") == 0 else "load"
            return web.json_response({"model": body["model"], "done": True,
                                      "done_reason": reason})
        if body["model"].startswith("slow"):
            return await self._slow(request, "response")
        if "FAIL" in body["prompt"]:
            return web.json_response({"error": "invalid options: top_p must be in (0, 1]"},
                                     status=400)
        words = ["echo:", *body["prompt"].split()]
        parts = [{"model": body["model"], "response": f" {w}" if i else w, "done": False}
                 for i, w in enumerate(words)]
        if "MIDSTREAM" in body["prompt"]:
            return await self._ndjson(request, [*parts, {"error": "runner died"}])
        return await self._ndjson(request, [*parts, self._final(body["model"])])

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = request[BODY]
        missing = self._missing(body["model"])
        if missing:
            return missing
        if body["model"].startswith("slow"):
            return await self._slow(request, "message")
        if "FAIL" in body["messages"][-1]["content"]:
            return web.json_response({"error": "the runner for this model crashed"}, status=500)
        turn = sum(1 for m in body["messages"] if m["role"] == "user")
        text = f"reply {turn} to: {body['messages'][-1]['content']}"
        parts = [{"model": body["model"], "message": {"role": "assistant", "content": piece},
                  "done": False} for piece in (text[:8], text[8:])]
        return await self._ndjson(request, [*parts, self._final(body["model"])])

    async def _slow(self, request: web.Request, field: str) -> web.StreamResponse:
        """Stream one token every 20 ms for up to 10 s, noticing when the client leaves."""
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        self.streaming.set()
        for _ in range(500):
            part = {"response": "tick "} if field == "response" else \
                {"message": {"role": "assistant", "content": "tick "}}
            try:
                await response.write(json.dumps({**part, "done": False}).encode() + b"\n")
            except (ConnectionError, RuntimeError):
                self.cancelled.set()
                return response
            if request.transport is None or request.transport.is_closing():
                self.cancelled.set()
                return response
            await asyncio.sleep(0.02)
        return response


def running_daemon(monkeypatch):
    """Yield a running FakeDaemon with KRASIS_SOCKET pointing at it (use as a fixture body).

    The socket lives in a short /tmp path: AF_UNIX paths are limited to 107 bytes.
    """
    folder = Path(tempfile.mkdtemp(prefix="krasis-cli-"))
    daemon = FakeDaemon(folder / "krasisd.sock").start()
    monkeypatch.setenv("KRASIS_SOCKET", str(daemon.socket_path))
    monkeypatch.delenv("KRASIS_HOST", raising=False)
    yield daemon
    daemon.stop()
    shutil.rmtree(folder, ignore_errors=True)
