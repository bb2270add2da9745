"""Rows of the registry database: models, files, caches, expert heat. Writes are atomic."""

import json

from sqlite_utils import Database

from .db import now
from .names import ModelRef


def get_model(db: Database, full_name: str) -> dict | None:
    rows = list(db.query("SELECT * FROM models WHERE name = ?", [full_name]))
    return rows[0] if rows else None


def models_in_state(db: Database, *states: str) -> list[dict]:
    marks = ",".join("?" * len(states))
    return list(db.query(f"SELECT * FROM models WHERE state IN ({marks}) ORDER BY name", states))


def begin_model(db: Database, ref: ModelRef, source: str, repo: str | None,
                revision: str | None, commit_sha: str | None) -> int:
    """Insert or reset the model's row in state 'pulling'; return its id."""
    stamp = now()
    with db.atomic():
        row = get_model(db, ref.full)
        if row is None:
            cursor = db.execute(
                "INSERT INTO models (name, source, repo, revision, commit_sha, state, "
                "created_at, updated_at) VALUES (?, ?, ?, ?, ?, 'pulling', ?, ?)",
                [ref.full, source, repo, revision, commit_sha, stamp, stamp],
            )
            return cursor.lastrowid
        db.execute(
            "UPDATE models SET source = ?, repo = ?, revision = ?, commit_sha = ?, "
            "state = 'pulling', error = NULL, updated_at = ? WHERE id = ?",
            [source, repo, revision, commit_sha, stamp, row["id"]],
        )
        return row["id"]


def set_state(db: Database, model_id: int, state: str, error: str | None = None) -> None:
    db.execute(
        "UPDATE models SET state = ?, error = ?, updated_at = ? WHERE id = ?",
        [state, error, now(), model_id],
    )


def set_defaults(db: Database, model_id: int, system: str | None, options: dict | None) -> None:
    """The model's default system message and sampling options (None: none)."""
    db.execute("UPDATE models SET system = ?, options_json = ? WHERE id = ?",
               [system, json.dumps(options) if options else None, model_id])


def finish_model(db: Database, model_id: int, info: dict, size_bytes: int, digest: str) -> None:
    """Record what was learnt from the files and mark the model ready, in one transaction."""
    with db.atomic():
        pending = db.execute(
            "SELECT COUNT(*) FROM files WHERE model_id = ? AND state != 'complete'", [model_id]
        ).fetchone()[0]
        if pending:
            raise RuntimeError(f"{pending} files of model {model_id} are not complete")
        db.execute(
            "UPDATE models SET architecture = ?, model_type = ?, params_total = ?, "
            "params_active = ?, config_json = ?, size_bytes = ?, digest = ?, state = 'ready', "
            "error = NULL, updated_at = ? WHERE id = ?",
            [info["architecture"], info["model_type"], info["params_total"],
             info["params_active"], json.dumps(info["config"]), size_bytes, digest, now(),
             model_id],
        )


def sync_files(db: Database, model_id: int, wanted: list[dict]) -> None:
    """Make the file rows match wanted ({path, size_bytes, sha256, blob_id, etag}).

    sha256 is the expected content hash where known beforehand (the hub's LFS oid).

    A row whose remote identity changed goes back to 'pending'; rows not wanted are deleted.
    """
    stamp = now()
    with db.atomic():
        current = {r["path"]: r for r in db.query(
            "SELECT * FROM files WHERE model_id = ?", [model_id])}
        for spec in wanted:
            row = current.pop(spec["path"], None)
            same = row is not None and all(
                row[k] == spec[k] for k in ("size_bytes", "blob_id"))
            if same and (spec["sha256"] is None or row["sha256"] == spec["sha256"]):
                continue
            db.execute(
                "INSERT INTO files (model_id, path, size_bytes, sha256, blob_id, etag, state, "
                "updated_at) VALUES (?, ?, ?, ?, ?, ?, 'pending', ?) "
                "ON CONFLICT (model_id, path) DO UPDATE SET size_bytes = excluded.size_bytes, "
                "sha256 = excluded.sha256, blob_id = excluded.blob_id, etag = excluded.etag, "
                "state = 'pending', updated_at = excluded.updated_at",
                [model_id, spec["path"], spec["size_bytes"], spec["sha256"], spec["blob_id"],
                 spec["etag"], stamp],
            )
        for path in current:
            db.execute("DELETE FROM files WHERE model_id = ? AND path = ?", [model_id, path])


def complete_file(db: Database, model_id: int, path: str, sha256: str,
                  etag: str | None = None) -> None:
    db.execute(
        "UPDATE files SET state = 'complete', sha256 = ?, etag = COALESCE(?, etag), "
        "updated_at = ? WHERE model_id = ? AND path = ?",
        [sha256, etag, now(), model_id, path],
    )


def files_of(db: Database, model_id: int) -> list[dict]:
    return list(db.query("SELECT * FROM files WHERE model_id = ? ORDER BY path", [model_id]))


def caches_of(db: Database, model_id: int) -> list[dict]:
    return list(db.query(
        "SELECT * FROM caches WHERE model_id = ? ORDER BY format, quant, group_size", [model_id]))


def caches_in_state(db: Database, state: str) -> list[dict]:
    return list(db.query(
        "SELECT caches.*, models.name AS model_name FROM caches "
        "JOIN models ON models.id = caches.model_id WHERE caches.state = ?", [state]))


def begin_cache(db: Database, model_id: int, fmt: str, quant: str, group_size: int,
                path: str) -> int:
    stamp = now()
    with db.atomic():
        db.execute(
            "INSERT INTO caches (model_id, format, quant, group_size, path, state, created_at, "
            "updated_at) VALUES (?, ?, ?, ?, ?, 'building', ?, ?) "
            "ON CONFLICT (model_id, format, quant, group_size) DO UPDATE SET "
            "path = excluded.path, state = 'building', error = NULL, size_bytes = NULL, "
            "checksum = NULL, layout_version = NULL, updated_at = excluded.updated_at",
            [model_id, fmt, quant, group_size, path, stamp, stamp],
        )
        return db.execute(
            "SELECT id FROM caches WHERE model_id = ? AND format = ? AND quant = ? AND "
            "group_size = ?", [model_id, fmt, quant, group_size]).fetchone()[0]


def finish_cache(db: Database, cache_id: int, layout_version, size_bytes: int,
                 checksum: str) -> None:
    db.execute(
        "UPDATE caches SET state = 'ready', layout_version = ?, size_bytes = ?, checksum = ?, "
        "error = NULL, updated_at = ? WHERE id = ?",
        [layout_version, size_bytes, checksum, now(), cache_id],
    )


def fail_cache(db: Database, cache_id: int, error: str) -> None:
    db.execute(
        "UPDATE caches SET state = 'failed', error = ?, updated_at = ? WHERE id = ?",
        [error, now(), cache_id],
    )


def delete_cache_markers(db: Database, model_id: int, fmt: str) -> None:
    """Drop the format's "not applicable" rows (failed, group size 0): a newer choice of
    quantization replaces what they said."""
    db.execute("DELETE FROM caches WHERE model_id = ? AND format = ? AND group_size = 0 "
               "AND state = 'failed'", [model_id, fmt])


def delete_caches(db: Database, model_id: int) -> None:
    db.execute("DELETE FROM caches WHERE model_id = ?", [model_id])


def add_heat(db: Database, model_id: int, counts: dict[int, list[int]]) -> None:
    """Add per-layer expert routing counts to what is stored (element-wise)."""
    stamp = now()
    with db.atomic():
        for layer, layer_counts in counts.items():
            row = db.execute(
                "SELECT counts_json FROM expert_heat WHERE model_id = ? AND layer = ?",
                [model_id, int(layer)]).fetchone()
            total = list(layer_counts)
            if row is not None:
                stored = json.loads(row[0])
                if len(stored) != len(total):
                    raise ValueError(
                        f"layer {layer}: {len(total)} expert counts given, {len(stored)} stored")
                total = [a + b for a, b in zip(stored, total, strict=True)]
            db.execute(
                "INSERT INTO expert_heat (model_id, layer, counts_json, updated_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (model_id, layer) DO UPDATE SET "
                "counts_json = excluded.counts_json, updated_at = excluded.updated_at",
                [model_id, int(layer), json.dumps(total), stamp],
            )


def heat_of(db: Database, model_id: int) -> dict[int, list[int]]:
    rows = db.execute(
        "SELECT layer, counts_json FROM expert_heat WHERE model_id = ? ORDER BY layer",
        [model_id]).fetchall()
    return {layer: json.loads(text) for layer, text in rows}
