"""The daemon's view of the model registry: blocking registry calls run off the event loop.

Short calls (list, show, model_dir, remove) run one at a time on one worker thread; a pull
or a create streams its progress events from its own thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from krasis_registry.caches import pick_quant
from krasis_registry.names import parse_name
from krasis_registry.registry import ready_cache, require_ready
from krasis_registry.sources import SourcePolicy

from krasisd.runners import ModelSpec

_END = object()
log = logging.getLogger(__name__)


def canonical_name(name: str) -> str:
    """'krasis-tiny' -> 'krasis-tiny:latest', as the registry names it."""
    return parse_name(name).full


class ModelCatalog:
    """Async access to a ``krasis_registry.Registry`` (or any object with its methods)."""

    def __init__(self, registry: Any, quant: str = "int4"):
        self.registry = registry
        self.quant = quant
        self._warned: set[str] = set()  # models whose format fallback was logged
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="registry")

    async def _call(self, fn: Callable, *args, **kwargs):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    async def list(self) -> list[dict]:
        return await self._call(self.registry.list)

    async def show(self, name: str) -> dict:
        return await self._call(self.registry.show, name)

    async def remove(self, name: str, is_loaded: Callable[[str], bool]) -> None:
        await self._call(self.registry.remove, name, is_loaded=is_loaded)

    async def spec(self, name: str) -> ModelSpec:
        """Where a ready model lives and what it weighs; raises ModelNotFound."""
        return await self._call(self._spec, name)

    def _spec(self, name: str) -> ModelSpec:
        info = self.registry.show(name)  # one registry call: the row, its config and caches
        require_ready(info)
        model_dir = Path(info["path"])
        quant = self._pick_format(name, info.get("config") or {})
        caches = (info.get("caches") or []) if quant != "none" else []
        return ModelSpec(name=info["name"], model_dir=model_dir,
                         size_bytes=int(info.get("size") or _folder_bytes(model_dir)),
                         digest=str(info.get("digest") or ""), details=info.get("details") or {},
                         quant=quant, cache_dir=ready_cache(caches, "cpu", quant),
                         gpu_cache_dir=ready_cache(caches, "gpu", quant),
                         system=info.get("system"), options=info.get("options") or {})

    def _pick_format(self, name: str, config: dict) -> str:
        """The registry's pick_quant (KRASIS_QUANT when the model's shapes allow it, else
        INT8, else "none": the plain weights), the one the pull-time cache build used.

        The registry's ready CPU and GPU caches of that format are used; without them the
        engine finds or builds its own.
        """
        picked = pick_quant(config, self.quant)
        quant = picked[0] if picked is not None else "none"
        if quant != self.quant and name not in self._warned:
            self._warned.add(name)
            if picked is None:
                log.warning("no quantized format fits the model; loading its weights as they "
                            "are", extra={"model": name, "wanted": self.quant})
            else:
                log.warning("the model's shapes do not fit KRASIS_QUANT; using another format",
                            extra={"model": name, "wanted": self.quant, "using": quant})
        return quant

    def pull(self, name: str, insecure: bool = False) -> AsyncIterator[dict]:
        """Progress events of a pull (Ollama's /api/pull shape)."""
        return iterate_in_thread(lambda: self.registry.pull(name, insecure=insecure))

    def create(self, name: str, path: str, policy: SourcePolicy, system: str | None = None,
               options: dict | None = None) -> AsyncIterator[dict]:
        """Progress events of creating a model from a local folder that ``policy`` lets the
        request read, with its default system message and options."""
        defaults = {k: v for k, v in (("system", system), ("options", options)) if v}
        return iterate_in_thread(lambda: self.registry.create(name, path, policy=policy,
                                                              **defaults))

    def create_from_blobs(self, name: str, files: dict[str, str], system: str | None = None,
                          options: dict | None = None) -> AsyncIterator[dict]:
        """Progress events of creating a model from uploaded blobs ({file name: digest})."""
        return iterate_in_thread(lambda: self.registry.create_from_blobs(
            name, files, system=system, options=options))

    async def has_blob(self, digest: str) -> bool:
        """Whether the blob was uploaded; ValueError for a malformed digest."""
        return await self._call(self.registry.has_blob, digest)

    async def upload_blob(self, digest: str, read: Callable[[], Awaitable[bytes]]) -> None:
        """Store a blob from ``read()`` (b"" at the end), writing on a worker thread; its
        sha256 must be ``digest`` (PullError otherwise). Nothing is kept of a failed one."""
        writer = await asyncio.to_thread(self.registry.blob_writer, digest)
        try:
            while chunk := await read():
                await asyncio.to_thread(writer.write, chunk)
            await asyncio.to_thread(writer.finish)
        except BaseException:
            writer.abort()
            raise

    def copy(self, source: str, destination: str, **defaults: Any) -> AsyncIterator[dict]:
        """Progress events of copying a model to a new name (hard links); ``defaults``
        (system=, options=) replace the source's."""
        return iterate_in_thread(lambda: self.registry.copy(source, destination, **defaults))

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


async def iterate_in_thread(make: Callable[[], Iterator[dict]]) -> AsyncIterator[dict]:
    """Run a blocking iterator on its own thread; its items and its exception come here."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()

    def produce() -> None:
        items = None
        try:
            items = make()
            for item in items:
                loop.call_soon_threadsafe(queue.put_nowait, item)
                if stop.is_set():  # the client left: stop at this step
                    break
            loop.call_soon_threadsafe(queue.put_nowait, _END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            with contextlib.suppress(RuntimeError):  # the loop may be closed at shutdown
                loop.call_soon_threadsafe(queue.put_nowait, exc)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()  # in this thread, so the registry's cleanup runs here

    threading.Thread(target=produce, daemon=True, name="registry-stream").start()
    try:
        while (item := await queue.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
