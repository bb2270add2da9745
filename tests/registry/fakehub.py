"""A stand-in Hugging Face Hub: a local aiohttp server that huggingface_hub reaches via HF_ENDPOINT.

Routes (those huggingface_hub 2.x calls for model_info, list_repo_tree and file URLs):
  GET  /api/models/{org}/{name}[/revision/{rev}]  -> {"id", "sha", "siblings", "gated", ...}
  GET  /api/models/{org}/{name}/tree/{rev}        -> [{"type", "path", "size", "oid", "lfs"}]
  HEAD, GET /{org}/{name}/resolve/{rev}/{path}    -> bytes, with X-Repo-Commit, ETag and Range
Errors carry X-Error-Code (RepoNotFound, RevisionNotFound, GatedRepo, EntryNotFound), which
huggingface_hub turns into its typed exceptions. The server counts the bytes it sends per
file and records every file request, so tests can tell what was fetched again.
"""

import asyncio
import hashlib
import re
import threading
from collections import Counter
from dataclasses import dataclass, field

from aiohttp import web

LFS_SUFFIXES = (".safetensors", ".bin", ".onnx")
CHUNK_BYTES = 64 << 10


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


@dataclass
class Repo:
    """Commits (sha -> {path: bytes}) and refs (name -> sha); gated repos need a token."""

    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    gated: bool = False

    def add_commit(self, files: dict[str, bytes], ref: str = "main") -> str:
        digest = hashlib.sha1(repr(sorted((p, git_blob_id(d)) for p, d in files.items()))
                              .encode() + str(len(self.commits)).encode()).hexdigest()
        self.commits[digest] = dict(files)
        self.refs[ref] = digest
        return digest

    def resolve(self, rev: str) -> str | None:
        if rev in self.commits:
            return rev
        return self.refs.get(rev)


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status,
                             headers={"X-Error-Code": code, "X-Error-Message": message})


class FakeHub:
    """The server's state; start() runs it on 127.0.0.1 in a thread of its own."""

    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.bytes_sent: Counter = Counter()
        self.file_requests: list[dict] = []
        self.stall_after_bytes: dict[str, int] = {}
        self.drop_after_bytes: dict[str, int] = {}  # cut the connection there ...
        self.drops_left: Counter = Counter()  # ... this many times per path
        # cut a request at the first of these offsets past its start (each resume gets further)
        self.drop_points: dict[str, list[int]] = {}
        self.chunk_delay_s = 0.0
        self.corrupt_paths: set[str] = set()
        self.ignore_range = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self.url = ""

    # server life

    def start(self) -> str:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.url = asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(10)
        return self.url

    def stop(self) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._loop = None

    def __enter__(self) -> "FakeHub":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    async def _serve(self) -> str:
        app = web.Application()
        app.router.add_get("/api/models/{org}/{name}/revision/{rev}", self._info)
        app.router.add_get("/api/models/{org}/{name}/tree/{rev}", self._tree)
        app.router.add_get("/api/models/{org}/{name}", self._info)
        app.router.add_route("*", "/{org}/{name}/resolve/{rev}/{path:.+}", self._resolve)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    # helpers for tests

    def served(self, path: str) -> int:
        return sum(n for (_, p), n in self.bytes_sent.items() if p == path)

    def requests_for(self, path: str) -> list[dict]:
        return [r for r in self.file_requests if r["path"] == path]

    # routes

    def _lookup(self, request: web.Request):
        repo_id = f"{request.match_info['org']}/{request.match_info['name']}"
        repo = self.repos.get(repo_id)
        if repo is None:
            return repo_id, None, None, _error(404, "RepoNotFound", "Repository not found")
        rev = request.match_info.get("rev", "main")
        commit = repo.resolve(rev)
        if commit is None:
            return repo_id, repo, None, _error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return repo_id, repo, commit, None

    async def _info(self, request: web.Request) -> web.Response:
        repo_id, repo, commit, error = self._lookup(request)
        if error:
            return error
        files = repo.commits[commit]
        return web.json_response({
            "_id": "0" * 24, "id": repo_id, "modelId": repo_id, "sha": commit,
            "private": False, "gated": "manual" if repo.gated else False, "disabled": False,
            "tags": [], "siblings": [{"rfilename": p} for p in sorted(files)],
        })

    async def _tree(self, request: web.Request) -> web.Response:
        repo_id, repo, commit, error = self._lookup(request)
        if error:
            return error
        entries = []
        for path, data in sorted(repo.commits[commit].items()):
            entry = {"type": "file", "oid": git_blob_id(data), "size": len(data), "path": path}
            if path.endswith(LFS_SUFFIXES):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data),
                                "pointerSize": 134}
            entries.append(entry)
        return web.json_response(entries)

    async def _resolve(self, request: web.Request) -> web.StreamResponse:
        repo_id, repo, commit, error = self._lookup(request)
        if error:
            return error
        path = request.match_info["path"]
        self.file_requests.append({"method": request.method, "path": path,
                                   "range": request.headers.get("Range"),
                                   "authorized": "Authorization" in request.headers})
        if repo.gated and "Authorization" not in request.headers:
            return _error(401, "GatedRepo", f"Access to model {repo_id} is restricted.")
        data = repo.commits[commit].get(path)
        if data is None:
            return _error(404, "EntryNotFound", f"{path} does not exist")
        if path in self.corrupt_paths:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        etag = hashlib.sha256(data).hexdigest() if path.endswith(LFS_SUFFIXES) \
            else git_blob_id(data)
        headers = {"X-Repo-Commit": commit, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        start = self._range_start(request, len(data))
        if start is None:
            return web.Response(status=416, headers={"Content-Range": f"bytes */{len(data)}"})
        status = 206 if start else 200
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        headers["Content-Length"] = str(len(data) - start)
        response = web.StreamResponse(status=status, headers=headers)
        await response.prepare(request)
        if request.method == "GET":
            await self._send(request, response, repo_id, path, data, start)
        return response

    def _range_start(self, request: web.Request, size: int) -> int | None:
        header = request.headers.get("Range")
        if not header or self.ignore_range:
            return 0
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", header)
        if not match:
            return 0
        start = int(match.group(1))
        return start if start < size else None

    async def _send(self, request, response, repo_id, path, data, start) -> None:
        """Send data[start:] in chunks; wait while a stall point is set for path and reached
        (until the test clears it, or the client goes away)."""
        position = start
        while position < len(data):
            stall_at = self.stall_after_bytes.get(path)
            if stall_at is not None and position >= stall_at:
                if request.transport is None or request.transport.is_closing():
                    return
                await asyncio.sleep(0.02)
                continue
            drop_at = self.drop_after_bytes.get(path) if self.drops_left[path] > 0 else None
            if drop_at is None:
                drop_at = next((p for p in self.drop_points.get(path, ()) if p > start), None)
            if drop_at is not None and position >= drop_at:
                self.drops_left[path] -= 1
                request.transport.close()  # the body ends short of its Content-Length
                return
            end = min(position + CHUNK_BYTES, len(data))
            for limit in (stall_at, drop_at):
                if limit is not None and limit > position:
                    end = min(end, limit)
            try:
                await response.write(data[position:end])
            except ConnectionError:  # the client went away (a killed pull)
                return
            self.bytes_sent[(repo_id, path)] += end - position
            position = end
            if self.chunk_delay_s:
                await asyncio.sleep(self.chunk_delay_s)
        await response.write_eof()
