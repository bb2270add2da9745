"""The registry's schema, as append-only sqlite-utils migrations: never edit one that shipped."""

from sqlite_utils import Migrations

m = Migrations("krasis")


@m()
def m001_initial(db):
    db.execute(
        """
        CREATE TABLE models (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            source TEXT NOT NULL CHECK (source IN ('hub', 'local', 'bundled')),
            repo TEXT,
            revision TEXT,
            commit_sha TEXT,
            architecture TEXT,
            model_type TEXT,
            params_total INTEGER,
            params_active INTEGER,
            config_json TEXT,
            size_bytes INTEGER NOT NULL DEFAULT 0,
            digest TEXT,
            state TEXT NOT NULL CHECK (state IN ('pulling', 'ready', 'failed', 'removing')),
            error TEXT,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        )
        """
    )
    db.execute(
        """
        CREATE TABLE files (
            id INTEGER PRIMARY KEY,
            model_id INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,
            path TEXT NOT NULL,
            size_bytes INTEGER NOT NULL,
            sha256 TEXT,
            blob_id TEXT,
            etag TEXT,
            state TEXT NOT NULL CHECK (state IN ('pending', 'complete')),
            updated_at TEXT NOT NULL,
            UNIQUE (model_id, path)
        )
        """
    )
    db.execute(
        """
        CREATE TABLE caches (
            id INTEGER PRIMARY KEY,
            model_id INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,
            format TEXT NOT NULL CHECK (format IN ('cpu', 'gpu')),
            quant TEXT NOT NULL,
            group_size INTEGER NOT NULL,
            layout_version INTEGER,
            path TEXT NOT NULL,
            size_bytes INTEGER,
            checksum TEXT,
            state TEXT NOT NULL CHECK (state IN ('building', 'ready', 'failed')),
            error TEXT,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            UNIQUE (model_id, format, quant, group_size)
        )
        """
    )
    db.execute(
        """
        CREATE TABLE expert_heat (
            model_id INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,
            layer INTEGER NOT NULL,
            counts_json TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (model_id, layer)
        )
        """
    )


@m()
def m002_model_defaults(db):
    """A model's own defaults, set by /api/create or /api/copy (Ollama's SYSTEM and
    PARAMETER): the system message and the sampling options (a JSON object)."""
    db.execute("ALTER TABLE models ADD COLUMN system TEXT")
    db.execute("ALTER TABLE models ADD COLUMN options_json TEXT")
