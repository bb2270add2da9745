"""Pull from the Hugging Face Hub: manifest, disk check, config.json (checked before the
weights: sizes, architecture, quantization, room for the caches), resumable downloads, then
ready.

Events follow Ollama's /api/pull stream: {"status": "pulling manifest"}, then per file
{"status": "pulling <file>", "digest", "total", "completed"}, then "verifying sha256
digest", "writing manifest", cache builds, and {"status": "success"}.
"""

import logging
import shutil
import time
from collections.abc import Generator, Iterator

from krasisd.engine.limits import machine_capacity_bytes

from . import caches, records
from .download import Hashes, Incomplete, drop_meta, matches, transfer
from .errors import PullError, StorageFull
from .hub import TRANSPORT_ERRORS, Hub, RemoteFile
from .modelinfo import check_servable, read_config
from .names import ModelRef, safe_file_path
from .pipeline import Context, finish, sweep_model_dir
from .selection import select
from .space import is_disk_full, storage_full
from .store import move_into_place

log = logging.getLogger(__name__)

EVENT_INTERVAL_S = 0.25
RETRY_DELAYS_S = (1.0, 2.0, 4.0, 8.0)  # then the error; the bytes stay for the next pull


def pull_files(ctx: Context, hub: Hub, ref: ModelRef, revision: str | None) -> Iterator[dict]:
    """Bring the model's files to the snapshot's commit; the model is ready at the end."""
    repo = ref.hub_repo
    yield {"status": "pulling manifest"}
    snapshot = hub.snapshot(repo, revision)
    if snapshot.gated and not hub.has_token():
        raise PullError(f"{repo} is a gated repo: accept its terms on the Hub, then set "
                        "HF_TOKEN to a token of that account")
    by_path = {f.path: f for f in snapshot.files}
    remotes = [by_path[p] for p in select(list(by_path), repo)]
    for remote in remotes:
        safe_file_path(remote.path)
    row = records.get_model(ctx.db, ref.full)
    if row and row["state"] == "ready" and row["commit_sha"] == snapshot.commit \
            and _all_present(ctx, ref, row["id"]):
        yield from sweep_model_dir(ctx, ref, row["id"])
        yield {"status": f"{ref.full} is up to date at {snapshot.commit[:12]}"}
        return
    model_id = records.begin_model(ctx.db, ref, "hub", repo, revision, snapshot.commit)
    records.sync_files(ctx.db, model_id, [_spec(r) for r in remotes])
    yield from sweep_model_dir(ctx, ref, model_id)
    pending = _pending(ctx, ref, model_id, remotes)
    need_bytes = _check_disk(ctx, ref, pending, repo)
    yield from _sweep_partials(ctx, ref, {r.path for r in remotes})
    # config.json first: a model the engine cannot serve is refused before its weights
    config_remote = by_path["config.json"]
    yield from _fetch(ctx, hub, ref, model_id, snapshot.commit, config_remote,
                      config_remote in pending)
    config = read_config(ctx.store.model_dir(ref))
    check_servable(config, repo, machine_capacity_bytes(ctx.store.home))
    _check_room_for_caches(ctx, ref, model_id, config, need_bytes, repo)
    for remote in remotes:
        if remote is not config_remote:
            yield from _fetch(ctx, hub, ref, model_id, snapshot.commit, remote,
                              remote in pending)
    yield {"status": "verifying sha256 digest"}
    yield from finish(ctx, ref, model_id)


def _spec(remote: RemoteFile) -> dict:
    return {"path": remote.path, "size_bytes": remote.size_bytes, "sha256": remote.sha256,
            "blob_id": remote.blob_id, "etag": remote.sha256 or remote.blob_id}


def _all_present(ctx: Context, ref: ModelRef, model_id: int) -> bool:
    model_dir = ctx.store.model_dir(ref)
    return all(
        row["state"] == "complete" and (model_dir / row["path"]).is_file()
        and (model_dir / row["path"]).stat().st_size == row["size_bytes"]
        for row in records.files_of(ctx.db, model_id)
    )


def _pending(ctx: Context, ref: ModelRef, model_id: int,
             remotes: list[RemoteFile]) -> list[RemoteFile]:
    rows = {r["path"]: r for r in records.files_of(ctx.db, model_id)}
    model_dir = ctx.store.model_dir(ref)
    done = {
        path for path, row in rows.items()
        if row["state"] == "complete" and (model_dir / path).is_file()
        and (model_dir / path).stat().st_size == row["size_bytes"]
    }
    return [r for r in remotes if r.path not in done]


def _part_path(ctx: Context, ref: ModelRef, path: str):
    return ctx.store.partial_dir(ref) / f"{path}.part"


def _check_disk(ctx: Context, ref: ModelRef, pending: list[RemoteFile], repo: str) -> int:
    """Refuse to start when the bytes still to fetch do not fit on the store's disk; return
    those bytes."""
    need_bytes = 0
    for remote in pending:
        part = _part_path(ctx, ref, remote.path)
        have_bytes = part.stat().st_size if part.is_file() else 0
        need_bytes += max(remote.size_bytes - have_bytes, 0)
    free_bytes = shutil.disk_usage(ctx.store.home).free
    if need_bytes > free_bytes:
        raise StorageFull(
            f"insufficient storage: not enough disk space to pull {repo}: {_gib(need_bytes)} "
            f"still to download, {_gib(free_bytes)} free under {ctx.store.home}"
        )
    return need_bytes


def _check_room_for_caches(ctx: Context, ref: ModelRef, model_id: int, config: dict,
                           need_bytes: int, repo: str) -> None:
    """Refuse, before the weights, when the bytes still to download plus the caches built
    after them (caches.cache_bytes_floor, a lower bound, per format not built yet) do not
    fit on the store's disk."""
    if ctx.quant == "none" or not ctx.cache_formats:
        return
    picked = caches.pick_quant(config, ctx.quant, ctx.group_size)
    if picked is None:
        return
    ready = {(c["format"], c["quant"], c["group_size"])
             for c in records.caches_of(ctx.db, model_id) if c["state"] == "ready"}
    formats = [f for f in ctx.cache_formats if (f, *picked) not in ready]
    cache_bytes = caches.cache_bytes_floor(config, picked[0]) * len(formats)
    free_bytes = shutil.disk_usage(ctx.store.home).free
    if formats and need_bytes + cache_bytes > free_bytes:
        raise StorageFull(
            f"insufficient storage: not enough disk space to pull {repo}: {_gib(need_bytes)} "
            f"still to download and at least {_gib(cache_bytes)} of {picked[0]} caches "
            f"({', '.join(formats)}) built after it, {_gib(free_bytes)} free under "
            f"{ctx.store.home}; with KRASIS_QUANT=none no cache is built and the weights are "
            "served as they are"
        )


def _gib(count_bytes: int) -> str:
    return f"{count_bytes / (1 << 30):.2f} GiB"


def _sweep_partials(ctx: Context, ref: ModelRef, wanted: set[str]) -> Iterator[dict]:
    """Partials of files the repo no longer has: removed, and said so in the stream."""
    partial_dir = ctx.store.partial_dir(ref)
    if not partial_dir.is_dir():
        return
    keep = {f"{p}.part" for p in wanted} | {f"{p}.part.json" for p in wanted}
    for entry in sorted(partial_dir.iterdir()):
        if entry.name not in keep and entry.is_file():
            log.warning("removing stale partial %s: the repo no longer has that file", entry)
            yield {"status": f"removing stale partial {entry.name}"}
            entry.unlink()


def _fetch(ctx: Context, hub: Hub, ref: ModelRef, model_id: int, commit: str,
           remote: RemoteFile, needed: bool) -> Iterator[dict]:
    event = {"status": f"pulling {remote.path}",
             "digest": f"sha256:{remote.sha256}" if remote.sha256 else f"git:{remote.blob_id}",
             "total": remote.size_bytes}
    if not needed:
        yield {**event, "completed": remote.size_bytes}
        return
    part = _part_path(ctx, ref, remote.path)
    dest = ctx.store.model_dir(ref) / remote.path
    sha256 = matches(dest, remote) if dest.is_file() else None
    if sha256 is not None:
        yield {**event, "completed": remote.size_bytes}
        records.complete_file(ctx.db, model_id, remote.path, sha256,
                              remote.sha256 or remote.blob_id)
        return
    url = hub.file_url(ref.hub_repo, commit, remote.path)
    hashes = Hashes(remote)  # kept across attempts: a resume hashes only the new bytes
    for attempt, delay_s in enumerate((*RETRY_DELAYS_S, None), start=1):
        try:
            sha256 = yield from _transfer_events(ctx, hub, ref, url, remote, part, event,
                                                  hashes)
            break
        except PullError as exc:
            if delay_s is None or not _retryable(exc):
                raise
            log.warning("%s: %s; resuming in %.1f s (attempt %d)", remote.path, exc, delay_s,
                        attempt + 1)
            yield {**event, "status": f"retrying {remote.path} in {delay_s:g}s: {exc}",
                   "completed": part.stat().st_size if part.exists() else 0}
            time.sleep(delay_s)
    yield {**event, "completed": remote.size_bytes}
    move_into_place(part, dest)
    drop_meta(part)
    records.complete_file(ctx.db, model_id, remote.path, sha256, remote.sha256 or remote.blob_id)


def _transfer_events(ctx: Context, hub: Hub, ref: ModelRef, url: str, remote: RemoteFile,
                     part, event: dict, hashes: Hashes) -> Generator[dict, None, str]:
    """One transfer attempt as progress events; returns the verified sha256."""
    last_s = 0.0
    try:
        with hub.errors(ref.hub_repo):
            steps = transfer(hub, url, remote, part, hashes)
            while True:
                try:
                    completed = next(steps)
                except StopIteration as stop:
                    return stop.value
                if time.monotonic() - last_s >= EVENT_INTERVAL_S:
                    last_s = time.monotonic()
                    yield {**event, "completed": completed}
    except OSError as exc:  # the hub's own errors are PullErrors by now: this is the local disk
        if is_disk_full(exc, ctx.store.home):
            raise storage_full(exc, ctx.store.home, f"writing {remote.path}",
                               "then pull again to resume (the bytes written are kept)") from exc
        raise PullError(f"writing {remote.path} under {ctx.store.home} failed: {exc}; "
                        "the bytes already written are kept") from exc


def _retryable(exc: PullError) -> bool:
    """A dropped connection or a short body: worth resuming at once; hub refusals are not."""
    return isinstance(exc, Incomplete) or isinstance(exc.__cause__, TRANSPORT_ERRORS)
