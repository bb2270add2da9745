"""Pulled files, their folders and cache folders are private whatever the umask."""

import os
import stat

import pytest
from fakebuilders import fast_builder
from krasis_registry import Registry
from regtest import REPO_ID


@pytest.fixture
def loose_umask():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_a_pull_and_its_cache_are_private(hub, krasis_home, loose_umask):
    reg = Registry(cache_builders={"cpu": fast_builder}, group_size=128)
    assert list(reg.pull(REPO_ID, build_caches=["cpu"]))[-1] == {"status": "success"}
    assert reg.cache_dir(REPO_ID).is_dir()
    checked = 0
    for path in [krasis_home, *krasis_home.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if path.is_dir():
            assert mode == 0o700, path
        else:  # downloads, the database, locks, and what the cache builder wrote
            assert mode == 0o600, path
        checked += 1
    assert checked > 10
