"""The Registry: the one object the daemon and the CLI use (see the Registry contract)."""

from __future__ import annotations  # the method named list shadows the builtin in the class

import contextlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from sqlite_utils import Database

from . import records
from .blobs import BlobWriter, blob_path, checked_files, import_blobs, prune_blobs
from .caches import DEFAULT_BUILDERS, Builder, formats_to_build
from .copy import KEEP, copy_model
from .create import bundled_dir, import_files
from .db import connect, migrate, pin
from .errors import (
    CacheNotReady,
    InvalidName,
    ModelNotFound,
    PullError,
    RegistryError,
    StorageFull,
)
from .hub import Hub
from .modelinfo import human_count
from .names import ALIASES, ModelRef, parse_name
from .pipeline import Context, build_caches, guard_failure, locked
from .pull import pull_files
from .recovery import recover
from .remove import remove_model
from .sources import ANY_FOLDER, SourcePolicy
from .space import is_disk_full, storage_full
from .store import Store, default_home

log = logging.getLogger(__name__)

FilesStep = Callable[[Context], Iterator[dict]]
DTYPE_LEVELS = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


class Registry:
    """Models on disk and their records; every public method opens its own connection."""

    def __init__(self, home: str | Path | None = None,
                 cache_builders: dict[str, Builder] | None = None,
                 quant: str = "int4", group_size: int | None = None):
        home = Path(home) if home is not None else default_home()
        try:
            self.store = Store(home)
        except OSError as exc:
            raise RegistryError(f"cannot use {home} as the krasis home: {exc}") from exc
        self.builders = {**DEFAULT_BUILDERS, **(cache_builders or {})}
        self.quant = quant
        self.group_size = int(group_size) if group_size else None  # None: as the engine picks
        with self._db() as db:
            migrate(db, self.store.global_lock_path())
            recover(db, self.store)
        prune_blobs(self.store)
        self._pin = pin(self.store.db_path)  # reads keep working on a full disk (db.pin)
        self._heat_warned = False

    @property
    def home(self) -> Path:
        return self.store.home

    def close(self) -> None:
        """Close the connection held open for the registry's life (when done with it)."""
        self._pin.close()

    @contextlib.contextmanager
    def _db(self) -> Iterator[Database]:
        """A connection of its own; a full disk met inside becomes StorageFull (HTTP 507)."""
        try:
            db = connect(self.store.db_path)
            try:
                yield db
            finally:
                db.close()
        except StorageFull:
            raise
        except Exception as exc:
            if is_disk_full(exc, self.home):
                raise storage_full(exc, self.home) from exc
            raise

    # pulls, imports, cache builds

    def pull(self, name: str, revision: str | None = None,
             build_caches: bool | Iterable[str] = True, insecure: bool = False) -> Iterator[dict]:
        """Pull a model (alias, org/repo, or bundled krasis-tiny); stream Ollama-style events."""
        ref = parse_name(name)
        formats = formats_to_build(build_caches)
        if ref.is_bundled:
            source_dir = bundled_dir(ref.name)
            return self._run(ref, lambda ctx: import_files(ctx, ref, source_dir, "bundled",
                                                           link=False), formats)
        if ref.hub_repo is None:
            raise PullError(
                f"unknown model {ref.name!r}: use org/repo for a Hugging Face repo, "
                f"krasis-tiny, or one of {sorted(ALIASES)}"
            )
        hub = Hub(insecure=insecure)
        return self._run(ref, lambda ctx: pull_files(ctx, hub, ref, revision), formats)

    def create(self, name: str, from_dir: str | Path,
               build_caches: bool | Iterable[str] = True,
               policy: SourcePolicy = ANY_FOLDER, system: str | None = None,
               options: dict | None = None) -> Iterator[dict]:
        """Register a local Hugging Face folder under name (hard link or copy); stream events.

        ``policy`` says which folders may be read (sources.SourcePolicy; the daemon passes
        the one for the request's transport). A cache build that fails leaves the model
        'failed' (its weights could not be read), never 'ready'. ``system`` and ``options``
        (sampling options, already checked) are the model's defaults, recorded before it
        is ready."""
        ref = _new_name(name)
        formats = formats_to_build(build_caches)
        return self._run(ref, lambda ctx: import_files(ctx, ref, Path(from_dir), "local",
                                                       link=True, policy=policy,
                                                       defaults=(system, options)),
                         formats, fail_model_on_build_error=True)

    def create_from_blobs(self, name: str, files: dict[str, str],
                          build_caches: bool | Iterable[str] = True, system: str | None = None,
                          options: dict | None = None) -> Iterator[dict]:
        """Create a model from uploaded blobs ({file name: "sha256:<hex>"}, Ollama's create
        ``files``), as create() does from a folder; the blobs are deleted once it is made."""
        ref = _new_name(name)
        blobs = checked_files(self.store, files)
        formats = formats_to_build(build_caches)
        return self._run(ref, lambda ctx: import_blobs(ctx, ref, blobs, (system, options)),
                         formats, fail_model_on_build_error=True)

    def has_blob(self, digest: str) -> bool:
        """Whether a blob of that digest was uploaded (ValueError for a malformed digest)."""
        return blob_path(self.store, digest).is_file()

    def blob_writer(self, digest: str) -> BlobWriter:
        """An upload of a blob of that digest (blobs.BlobWriter)."""
        return BlobWriter(self.store, digest)

    def copy(self, source: str, destination: str, system=KEEP, options=KEEP) -> Iterator[dict]:
        """Make destination a copy of the ready model source (hard links: no space taken);
        stream events. The copy keeps the source's system message and options unless
        ``system`` / ``options`` are given (None clears them). An existing destination is
        PullError (a failed one is replaced); a missing source, ModelNotFound."""
        src, dst = parse_name(source), _new_name(destination)
        if src.full == dst.full:
            raise PullError(f"cannot copy {src.full} onto itself")
        return self._run(dst, lambda ctx: copy_model(ctx, src, dst, system, options), [])

    def build_caches(self, name: str, formats: bool | Iterable[str] = True,
                     rebuild: bool = False) -> Iterator[dict]:
        """(Re)build the cache formats of a ready model; stream progress events."""
        ref = parse_name(name)
        self.model_dir(name)
        fmts = formats_to_build(formats)
        return self._run(ref, lambda ctx: iter(()), fmts, rebuild=rebuild)

    def _run(self, ref: ModelRef, files_step: FilesStep, formats: list[str],
             rebuild: bool = False, fail_model_on_build_error: bool = False) -> Iterator[dict]:
        with self._db() as db:
            ctx = Context(self.store, db, self.builders, self.quant, self.group_size,
                          tuple(formats))

            def body() -> Iterator[dict]:
                yield from guard_failure(ctx, ref, files_step(ctx))
                try:
                    yield from build_caches(ctx, ref, formats, rebuild=rebuild)
                except Exception as exc:
                    if fail_model_on_build_error:
                        _fail_model(ctx, ref, str(exc))
                    raise
                yield {"status": "success"}

            yield from locked(self.store, ref, body)

    # queries

    def list(self) -> list[dict]:
        """Ready models as Ollama /api/tags items, newest first."""
        with self._db() as db:
            rows = records.models_in_state(db, "ready")
        rows.sort(key=lambda r: r["updated_at"], reverse=True)
        return [_tag_item(row) for row in rows]

    def show(self, name: str) -> dict:
        """Everything recorded about a model, ready or not."""
        ref = parse_name(name)
        with self._db() as db:
            row = self._row(db, ref)
            files = records.files_of(db, row["id"])
            caches = records.caches_of(db, row["id"])
        return {
            **_tag_item(row),
            "state": row["state"], "error": row["error"], "source": row["source"],
            "repo": row["repo"], "revision": row["revision"], "commit": row["commit_sha"],
            "architecture": row["architecture"], "model_type": row["model_type"],
            "parameters": {"total": row["params_total"], "active": row["params_active"]},
            "config": json.loads(row["config_json"]) if row["config_json"] else None,
            "system": row["system"],
            "options": json.loads(row["options_json"]) if row["options_json"] else {},
            "path": str(self.store.model_dir(ref)),
            "files": [{k: f[k] for k in ("path", "size_bytes", "sha256", "etag", "state")}
                      for f in files],
            "caches": [{k: c[k] for k in ("format", "quant", "group_size", "layout_version",
                                          "path", "size_bytes", "checksum", "state", "error",
                                          "updated_at")}
                       for c in caches],
        }

    def model_dir(self, name: str) -> Path:
        """The folder of a ready model; ModelNotFound otherwise."""
        ref = parse_name(name)
        with self._db() as db:
            require_ready(self._row(db, ref))
        return self.store.model_dir(ref)

    def cache_dir(self, name: str, fmt: str = "cpu", quant: str = "int4",
                  group_size: int | None = None) -> Path:
        """The folder of a ready cache of that format and quantization; CacheNotReady otherwise."""
        ref = parse_name(name)
        with self._db() as db:
            row = self._row(db, ref)
            require_ready(row)
            caches = records.caches_of(db, row["id"])
        path = ready_cache(caches, fmt, quant, group_size)
        if path is None:
            raise CacheNotReady(f"no ready {fmt} {quant} cache for {ref.full}: pull it again")
        return path

    # removal and expert heat

    def remove(self, name: str, force: bool = False,
               is_loaded: Callable[[str], bool] = lambda name: False) -> None:
        """Delete the model's files, caches and rows; refuse while loaded unless force."""
        ref = parse_name(name)
        with self._db() as db:
            remove_model(db, self.store, ref, force, is_loaded)

    def add_expert_heat(self, name: str, counts: dict[int, list[int]]) -> None:
        """Add routing counts per layer ({layer: [count per expert]}) to the stored heat.

        Heat is bookkeeping: on a full disk the counts are dropped (logged once), not raised."""
        ref = parse_name(name)
        try:
            with self._db() as db:
                records.add_heat(db, self._row(db, ref)["id"], counts)
        except StorageFull as exc:
            if not self._heat_warned:
                self._heat_warned = True
                log.warning("expert heat not stored: %s", exc)

    def expert_heat(self, name: str) -> dict[int, list[int]]:
        """Accumulated routing counts per layer."""
        ref = parse_name(name)
        with self._db() as db:
            return records.heat_of(db, self._row(db, ref)["id"])

    def _row(self, db: Database, ref: ModelRef) -> dict:
        row = records.get_model(db, ref.full)
        if row is None:
            raise ModelNotFound(f"model {ref.full} not found")
        return row


def _new_name(name: str) -> ModelRef:
    """The name of a model being made here (not pulled): never the bundled model or an alias."""
    ref = parse_name(name)
    if ref.is_bundled or ref.name in ALIASES:
        raise InvalidName(f"{ref.name} is a reserved name: choose another")
    return ref


def _fail_model(ctx: Context, ref: ModelRef, error: str) -> None:
    row = records.get_model(ctx.db, ref.full)
    if row is not None:
        log.warning("create of %s failed: %s", ref.full, error)
        records.set_state(ctx.db, row["id"], "failed", error)


def require_ready(model: dict) -> None:
    """ModelNotFound unless the model (its row, or show()'s answer) is ready."""
    if model["state"] != "ready":
        detail = f": {model['error']}" if model["error"] else ""
        raise ModelNotFound(f"model {model['name']} is not ready ({model['state']}{detail})")


def ready_cache(caches: list[dict], fmt: str, quant: str,
                group_size: int | None = None) -> Path | None:
    """The newest ready cache of that format and quantization among a model's cache rows
    (or show()'s "caches"), of any group size when None; None when there is none."""
    for cache in sorted(caches, key=lambda c: c["updated_at"], reverse=True):
        if (cache["format"], cache["quant"]) == (fmt, quant) and cache["state"] == "ready" \
                and group_size in (None, cache["group_size"]):
            return Path(cache["path"])
    return None


def _tag_item(row: dict) -> dict:
    """An Ollama /api/tags item."""
    config = json.loads(row["config_json"]) if row["config_json"] else {}
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "")
    return {
        "name": row["name"], "model": row["name"], "size": row["size_bytes"],
        "digest": row["digest"] or "", "modified_at": row["updated_at"],
        "details": {
            "parent_model": row["repo"] or "", "format": "safetensors",
            "family": row["model_type"] or "", "families": [row["model_type"]] if
            row["model_type"] else [], "parameter_size": human_count(row["params_total"]),
            "quantization_level": DTYPE_LEVELS.get(dtype, dtype.upper()),
        },
    }
