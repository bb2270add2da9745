"""Migrations and the schema they produce, checked against a literal description."""

import sqlite3

from krasis_registry import Registry
from krasis_registry.db import connect, migrate
from krasis_registry.migrations import m
from sqlite_utils import Database

SCHEMA = {
    "models": {
        "id": "INTEGER", "name": "TEXT", "source": "TEXT", "repo": "TEXT", "revision": "TEXT",
        "commit_sha": "TEXT", "architecture": "TEXT", "model_type": "TEXT",
        "params_total": "INTEGER", "params_active": "INTEGER", "config_json": "TEXT",
        "size_bytes": "INTEGER", "digest": "TEXT", "state": "TEXT", "error": "TEXT",
        "created_at": "TEXT", "updated_at": "TEXT", "system": "TEXT", "options_json": "TEXT",
    },
    "files": {
        "id": "INTEGER", "model_id": "INTEGER", "path": "TEXT", "size_bytes": "INTEGER",
        "sha256": "TEXT", "blob_id": "TEXT", "etag": "TEXT", "state": "TEXT",
        "updated_at": "TEXT",
    },
    "caches": {
        "id": "INTEGER", "model_id": "INTEGER", "format": "TEXT", "quant": "TEXT",
        "group_size": "INTEGER", "layout_version": "INTEGER", "path": "TEXT",
        "size_bytes": "INTEGER", "checksum": "TEXT", "state": "TEXT", "error": "TEXT",
        "created_at": "TEXT", "updated_at": "TEXT",
    },
    "expert_heat": {
        "model_id": "INTEGER", "layer": "INTEGER", "counts_json": "TEXT", "updated_at": "TEXT",
    },
}
FOREIGN_KEYS = {"files": "models", "caches": "models", "expert_heat": "models"}


def _schema(db: Database) -> dict:
    return {
        table: {row[1]: row[2] for row in db.execute(f"PRAGMA table_info({table})")}
        for table in db.table_names() if not table.startswith(("_", "sqlite_"))
    }


def test_migrations_from_empty_database(tmp_path):
    db = connect(tmp_path / "registry.db")
    assert db.table_names() == []
    migrate(db, tmp_path / "migrate.lock")
    assert _schema(db) == SCHEMA
    for table, parent in FOREIGN_KEYS.items():
        [fk] = db[table].foreign_keys
        assert (fk.other_table, fk.other_column) == (parent, "id")
    assert [a.name for a in m.applied(db)] == ["m001_initial", "m002_model_defaults"]


def test_migrations_applied_twice(tmp_path):
    db = connect(tmp_path / "registry.db")
    migrate(db, tmp_path / "migrate.lock")
    migrate(db, tmp_path / "migrate.lock")
    assert _schema(db) == SCHEMA
    assert db.execute("SELECT COUNT(*) FROM _sqlite_migrations").fetchone()[0] == 2
    assert m.pending(db) == []


def test_model_defaults_added_to_an_older_database(tmp_path):
    """A registry made before m002 keeps its models; they have no defaults."""
    db = connect(tmp_path / "registry.db")
    m.apply(db, stop_before="m002_model_defaults")
    db.execute("INSERT INTO models (name, source, state, created_at, updated_at) "
               "VALUES ('old:latest', 'local', 'ready', 'now', 'now')")
    migrate(db, tmp_path / "migrate.lock")
    [row] = db.query("SELECT name, system, options_json FROM models")
    assert row == {"name": "old:latest", "system": None, "options_json": None}


def test_registry_opens_twice_and_uses_wal(krasis_home):
    Registry()
    Registry()
    db = connect(krasis_home / "registry.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert _schema(db) == SCHEMA


def test_foreign_keys_enforced(tmp_path):
    db = connect(tmp_path / "registry.db")
    migrate(db, tmp_path / "migrate.lock")
    try:
        db.execute("INSERT INTO files (model_id, path, size_bytes, state, updated_at) "
                   "VALUES (999, 'x', 1, 'pending', 'now')")
    except sqlite3.IntegrityError as exc:
        assert "FOREIGN KEY" in str(exc)
    else:
        raise AssertionError("a file row without its model was accepted")


def test_state_values_checked(tmp_path):
    db = connect(tmp_path / "registry.db")
    migrate(db, tmp_path / "migrate.lock")
    try:
        db.execute("INSERT INTO models (name, source, state, created_at, updated_at) "
                   "VALUES ('a:latest', 'hub', 'almost-ready', 'now', 'now')")
    except sqlite3.IntegrityError as exc:
        assert "CHECK" in str(exc)
    else:
        raise AssertionError("an unknown state was accepted")
