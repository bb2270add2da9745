"""A registry stand-in for the in-process daemon tests (the real one is in test_e2e_*)."""

from __future__ import annotations

from pathlib import Path

from krasis_registry import InvalidName, ModelInUse, ModelNotFound, PullError
from krasis_registry.names import parse_name

from krasisd.config import Config


class FakeRegistry:
    """Models are folders under ``root``; pull of 'krasis-tiny' makes one."""

    def __init__(self, root: Path, names=("fake", "other", "broken")):
        self.root = root
        self.models: dict[str, Path] = {}
        for name in names:
            self.add(name)
        (self.models["broken:latest"] / "broken").write_text("yes")

    def add(self, name: str) -> Path:
        full = parse_name(name).full
        folder = self.root / full.replace(":", "_").replace("/", "_")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text("{}")
        self.models[full] = folder
        return folder

    def _get(self, name: str) -> Path:
        full = parse_name(name).full
        if full not in self.models:
            raise ModelNotFound(f"model {full} not found")
        return self.models[full]

    def list(self) -> list[dict]:
        return [{"name": n, "model": n, "size": 1000, "digest": "sha256:00",
                 "modified_at": "2026-01-01T00:00:00+00:00", "details": {"family": "fake"}}
                for n in self.models]

    def show(self, name: str) -> dict:
        """The fields of the registry's show() that the daemon reads: a ready model, no caches."""
        folder = self._get(name)
        return {"name": parse_name(name).full, "path": str(folder), "size": 1000,
                "digest": "sha256:00", "details": {"family": "fake"}, "state": "ready",
                "error": None, "config": {}, "caches": []}

    def remove(self, name: str, force=False, is_loaded=lambda name: False) -> None:
        full = parse_name(name).full
        self._get(name)
        if is_loaded(full) and not force:
            raise ModelInUse(f"{full} is loaded")
        del self.models[full]

    def pull(self, name: str, insecure: bool = False):
        ref = parse_name(name)
        if ref.name != "krasis-tiny":
            raise PullError(f"unknown model {ref.name!r}")
        yield {"status": "pulling manifest"}
        yield {"status": "pulling config.json", "digest": "sha256:11", "total": 2, "completed": 2}
        self.add(name)
        yield {"status": "success"}

    def create(self, name: str, from_dir, policy=None):
        if parse_name(name).name == "krasis-tiny":
            raise InvalidName("krasis-tiny is a reserved name: choose another")
        if not Path(from_dir).is_dir():
            raise PullError(f"{from_dir} is not a folder")
        yield {"status": "importing"}
        self.add(name)
        yield {"status": "success"}


def fake_config(root: Path, **overrides) -> Config:
    """A Config for a daemon whose runners load tests/daemon/fake_engine.py."""
    values = dict(home=root / "home", socket=root / "run" / "krasisd.sock",
                  runner_loader="fake_engine:load", quant="none", device="cpu",
                  load_timeout_s=60.0)
    values.update(overrides)
    (root / "home").mkdir(parents=True, exist_ok=True)
    return Config(**values)
