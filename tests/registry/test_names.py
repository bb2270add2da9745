"""Names, tags, aliases and paths that could escape the store."""

import pytest
from krasis_registry import InvalidName, Registry
from krasis_registry.names import parse_name, safe_file_path
from krasis_registry.store import Store


@pytest.mark.parametrize("text, name, tag, repo", [
    ("deepseek-v2-lite", "deepseek-v2-lite", "latest", "deepseek-ai/DeepSeek-V2-Lite-Chat"),
    ("deepseek-v2-lite-base", "deepseek-v2-lite-base", "latest", "deepseek-ai/DeepSeek-V2-Lite"),
    ("qwen3-30b-a3b:q4", "qwen3-30b-a3b", "q4", "Qwen/Qwen3-30B-A3B"),
    ("org/Some.Repo_1", "org/Some.Repo_1", "latest", "org/Some.Repo_1"),
    ("krasis-tiny", "krasis-tiny", "latest", None),
    ("my-local:v2", "my-local", "v2", None),
])
def test_valid_names(text, name, tag, repo):
    ref = parse_name(text)
    assert (ref.name, ref.tag, ref.hub_repo) == (name, tag, repo)
    assert ref.full == f"{name}:{tag}"


@pytest.mark.parametrize("text", [
    "", " ", "..", "../x", "a/../b", "/etc/passwd", "org/..", "a/b/c", "a:b:c", "a:..",
    "a:../x", ".hidden", "a b", "a\\b", "a\x00b", "org/repo:", "-x", "a;rm",
])
def test_invalid_names(text):
    with pytest.raises(InvalidName):
        parse_name(text)


@pytest.mark.parametrize("path", ["../x.json", "/abs.json", "a/../../b", "..", "a\\b", ""])
def test_invalid_file_paths(path):
    with pytest.raises(InvalidName):
        safe_file_path(path)


def test_bad_names_refused_by_every_entry_point(krasis_home):
    reg = Registry()
    for call in (lambda: reg.pull("../escape"), lambda: reg.model_dir("/etc"),
                 lambda: reg.remove("a/../../b"), lambda: reg.create("..", krasis_home),
                 lambda: reg.show("x:../../y")):
        with pytest.raises(InvalidName):
            call()
    names = {p.name for p in krasis_home.iterdir()} - {"registry.db-shm", "registry.db-wal"}
    assert names == {"caches", "locks", "models", "partials", "registry.db"}
    for sub in ("caches", "models", "partials"):
        assert list((krasis_home / sub).iterdir()) == []


def test_store_paths_stay_inside_home(tmp_path):
    store = Store(tmp_path)
    for text in ("deepseek-v2-lite", "org/repo:tag", "a:b"):
        ref = parse_name(text)
        for path in (store.model_dir(ref), store.partial_dir(ref), store.cache_root(ref)):
            assert path.is_relative_to(tmp_path.resolve())
            assert len(path.relative_to(tmp_path.resolve()).parts) == 4
    # a bare name's tag and an org's repo never share a folder
    assert store.model_dir(parse_name("org:repo")) != store.model_dir(parse_name("org/repo"))
    assert not store.model_dir(parse_name("org/repo")).is_relative_to(
        store.model_dir(parse_name("org:repo")))


def test_default_home_follows_xdg(monkeypatch, tmp_path):
    from krasis_registry.store import default_home

    monkeypatch.delenv("KRASIS_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_home() == tmp_path / "xdg" / "krasis"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_home() == tmp_path / "home" / ".local" / "share" / "krasis"


@pytest.mark.parametrize("variable, value, expected", [
    ("KRASIS_HOME", "~/kh", ("home", "kh")),
    ("XDG_DATA_HOME", "~/xdg", ("home", "xdg", "krasis")),
    (None, None, ("home", ".local", "share", "krasis")),
])
def test_daemon_and_registry_agree_on_the_home(monkeypatch, tmp_path, variable, value,
                                               expected):
    from krasis_registry.store import default_home as registry_home

    from krasisd.config import default_home as daemon_home
    from krasisd.config import load_config

    for name in ("KRASIS_HOME", "XDG_DATA_HOME", "KRASIS_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    if variable:
        monkeypatch.setenv(variable, value)
    want = tmp_path.joinpath(*expected)
    assert registry_home() == daemon_home() == load_config().home == want


def test_unusable_home_is_a_clear_error(tmp_path):
    from krasis_registry import RegistryError

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(RegistryError, match="cannot use .* as the krasis home"):
        Registry(home=blocker / "home")
