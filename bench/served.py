"""A krasisd of the bench's own, and a streaming client for it: what bench/serve.py and
bench/soak.py share.

``LocalDaemon`` starts ``python -m krasisd`` with a home of its own (``KRASIS_HOME``) and its
socket in that home, so a bench never touches the user's models or daemon. ``stream`` sends one
request over the Unix socket (aiohttp's ``UnixConnector``) and stamps each NDJSON line as it
arrives, which is what the user's client sees: first-token time and the gaps between tokens
include the daemon, the runner hop and the HTTP stream, not only the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
READ_TIMEOUT_S = 900.0  # one line may wait for a model load and a 32K-token prefill


@dataclass
class StreamResult:
    """One request as the client saw it. Times are ``time.perf_counter()`` seconds."""

    status: int = 0
    sent_s: float = 0.0
    token_times_s: list[float] = field(default_factory=list)  # lines with text (done=False)
    final: dict | None = None  # the done=True line: counters (ns) and done_reason
    error: str | None = None  # an HTTP error body or a final {"error"} line
    cut: bool = False  # the client closed the connection before the end (cancel)
    end_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None and (self.final is not None or self.cut)

    @property
    def ttft_s(self) -> float | None:
        """Send to first token line (to the final line when the answer had no text)."""
        if self.token_times_s:
            return self.token_times_s[0] - self.sent_s
        return None if self.final is None else self.end_s - self.sent_s

    @property
    def gaps_s(self) -> list[float]:
        """Inter-token latencies: the gaps between consecutive token lines."""
        times = self.token_times_s
        return [b - a for a, b in zip(times, times[1:], strict=False)]

    def decode_tok_s(self) -> float | None:
        """Tokens per second after the prefill, by the client's clock: the token lines after
        the first over the time from the end of the runner's prefill (sent + its
        prompt_eval_duration) to the last line. Lines that arrive in bursts (held back
        somewhere on the way) do not inflate it, as a rate between the first and the last
        line would; without the counters (a cut stream), that rate is what is left."""
        times = self.token_times_s
        if len(times) < 2:
            return None
        prefill_ns = self.counter("prompt_eval_duration")
        start_s = self.sent_s + prefill_ns / 1e9 if prefill_ns else times[0]
        return (len(times) - 1) / (times[-1] - start_s) if times[-1] > start_s else None

    def counter(self, name: str) -> int | None:
        return None if self.final is None else self.final.get(name)

    def prefill_tok_s(self) -> float | None:
        """The runner's own prefill rate: prompt_eval_count / prompt_eval_duration."""
        count, ns = self.counter("prompt_eval_count"), self.counter("prompt_eval_duration")
        return count / (ns / 1e9) if count and ns else None


def session(socket_path: Path, read_timeout_s: float = READ_TIMEOUT_S) -> aiohttp.ClientSession:
    """An aiohttp session over krasisd's Unix socket (the host part of URLs is ignored)."""
    timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_read=read_timeout_s)
    return aiohttp.ClientSession(base_url="http://localhost", timeout=timeout,
                                 connector=aiohttp.UnixConnector(path=str(socket_path)))


async def stream(http: aiohttp.ClientSession, path: str, body: dict | bytes | str, *,
                 cut_after_tokens: int | None = None,
                 stop: asyncio.Event | None = None,
                 result: StreamResult | None = None) -> StreamResult:
    """One streamed request (NDJSON). ``body`` is sent as JSON when it is a dict, as is
    otherwise (for malformed bodies). The connection is closed after ``cut_after_tokens`` token
    lines, or when ``stop`` is set, which is how a client cancels. A ``result`` given is filled
    in as lines arrive, so that others can watch a stream in flight."""
    data = json.dumps(body) if isinstance(body, dict) else body
    result = result if result is not None else StreamResult()
    result.sent_s = time.perf_counter()
    try:
        async with http.post(path, data=data,
                             headers={"Content-Type": "application/json"}) as response:
            result.status = response.status
            if response.status != 200:
                result.error = _error_text(await response.text())
            else:
                await _read_lines(response, result, cut_after_tokens, stop)
    except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    result.end_s = time.perf_counter()
    return result


async def _read_lines(response, result: StreamResult, cut_after_tokens, stop) -> None:
    stopper = asyncio.ensure_future(stop.wait()) if stop is not None else None
    try:
        while True:
            read = asyncio.ensure_future(response.content.readline())
            if stopper is not None:
                await asyncio.wait({read, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if not read.done():
                    read.cancel()
                    with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
                        await read
                    result.cut = True
                    response.close()
                    return
            line = await read
            now = time.perf_counter()
            if not line:
                return
            if not line.strip():
                continue
            event = json.loads(line)
            if event.get("error"):
                result.error = str(event["error"])
                return
            if event.get("done"):
                result.final = event
                return
            result.token_times_s.append(now)
            if cut_after_tokens is not None and len(result.token_times_s) >= cut_after_tokens:
                result.cut = True
                response.close()
                return
    finally:
        if stopper is not None:
            stopper.cancel()


def _error_text(text: str) -> str:
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return text.strip()[:300]
    if isinstance(data, dict) and "error" in data:
        error = data["error"]
        return str(error.get("message", error) if isinstance(error, dict) else error)
    return text.strip()[:300]


async def get_json(http: aiohttp.ClientSession, path: str) -> dict:
    async with http.get(path) as response:
        response.raise_for_status()
        return await response.json()


async def post_json(http: aiohttp.ClientSession, path: str, body: dict) -> tuple[int, dict]:
    async with http.post(path, json=body) as response:
        text = await response.text()
        try:
            return response.status, json.loads(text)
        except json.JSONDecodeError:
            return response.status, {"error": text[:300]}


async def progress(http: aiohttp.ClientSession, path: str, body: dict, log=None) -> None:
    """A pull or create: reads its progress events to the end; RuntimeError on a failure."""
    async with http.post(path, json={**body, "stream": True}) as response:
        if response.status != 200:
            raise RuntimeError(f"{path} {body.get('model')}: HTTP {response.status}: "
                               f"{_error_text(await response.text())}")
        last = None
        async for line in response.content:
            if not line.strip():
                continue
            event = json.loads(line)
            if event.get("error"):
                raise RuntimeError(f"{path} {body.get('model')}: {event['error']}")
            status = event.get("status")
            if log is not None and status and status != last and "completed" not in event:
                log(f"  {status}")
            last = status


async def loaded(http: aiohttp.ClientSession, model: str) -> dict | None:
    """The /api/ps entry of ``model`` (``name`` or ``name:tag``), None when not loaded."""
    for item in (await get_json(http, "/api/ps")).get("models", []):
        if item["name"] == model or item["name"].split(":")[0] == model.split(":")[0]:
            return item
    return None


def rss_bytes(pid: int, key: str = "VmRSS") -> int | None:
    """Resident memory of a process from /proc/PID/status (``VmHWM``: its peak); None when the
    process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class LocalDaemon:
    """``python -m krasisd`` with ``home`` as KRASIS_HOME, its socket in that home, extra
    settings in ``env``, and its log in ``home/krasisd.log``."""

    def __init__(self, home: Path, env: dict[str, str] | None = None):
        self.home = Path(home)
        self.socket = self.home / "krasisd.sock"
        self.log_path = self.home / "krasisd.log"
        self.env = dict(env or {})
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the daemon is not started"
        return self.proc.pid

    def start(self, timeout_s: float = 60.0) -> LocalDaemon:
        self.home.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "KRASIS_HOME": str(self.home), "KRASIS_SOCKET": str(self.socket),
               **self.env}
        env.pop("KRASIS_CONFIG", None)  # the user's config file must not change the bench
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        with self.log_path.open("a") as log_file:
            self.proc = subprocess.Popen([sys.executable, "-m", "krasisd"], env=env,
                                         stdin=subprocess.DEVNULL, stdout=log_file,
                                         stderr=log_file, cwd=self.home)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"krasisd exited during start ({self.proc.returncode}); "
                                   f"log: {self.log_tail()}")
            if self.socket.exists() and _answers(self.socket):
                return self
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"krasisd did not listen within {timeout_s:.0f} s; "
                           f"log: {self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (the daemon stops its runners), then SIGKILL after ``timeout_s``."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def __enter__(self) -> LocalDaemon:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _answers(socket_path: Path) -> bool:
    import http.client
    import socket

    conn = http.client.HTTPConnection("localhost", timeout=2)
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(2)
    try:
        sock.connect(str(socket_path))
        conn.sock = sock
        conn.request("GET", "/")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()
