"""Resumed downloads hash only the bytes they receive; the partial is read back only when the
hashes kept across attempts do not match it (a new pull, or a partial of another length)."""

import hashlib

import pytest
from krasis_registry import Registry
from krasis_registry import download as download_module
from krasis_registry import pull as pull_module
from regtest import REPO_ID

BIG = "model-00002-of-00002.safetensors"


@pytest.fixture
def partial_reads(monkeypatch) -> list[int]:
    """Bytes read back from a partial file for hashing, one entry per read-back."""
    reads: list[int] = []
    hash_existing = download_module._hash_existing

    def counting(part, hashes):
        size_bytes = part.stat().st_size  # it reads the whole file
        if size_bytes:
            reads.append(size_bytes)
        hash_existing(part, hashes)

    monkeypatch.setattr(download_module, "_hash_existing", counting)
    return reads


def _drop_points(size_bytes: int, count: int) -> list[int]:
    return [size_bytes * (i + 1) // (count + 1) for i in range(count)]


def _part(krasis_home):
    [part] = krasis_home.glob(f"partials/**/{BIG}.part")
    return part


@pytest.mark.parametrize("drops", [1, 4])
def test_resumes_within_a_pull_read_nothing_back(hub, tiny_files, monkeypatch, partial_reads,
                                                 drops):
    monkeypatch.setattr(pull_module, "RETRY_DELAYS_S", (0.01,) * drops)
    size_bytes = len(tiny_files[BIG])
    hub.drop_points[BIG] = _drop_points(size_bytes, drops)
    reg = Registry()
    evs = list(reg.pull(REPO_ID, build_caches=False))
    assert evs[-1] == {"status": "success"}
    assert sum(e["status"].startswith(f"retrying {BIG}") for e in evs) == drops
    assert [r["range"] for r in hub.requests_for(BIG)] == \
        [None] + [f"bytes={p}-" for p in hub.drop_points[BIG]]
    assert hub.served(BIG) == size_bytes
    assert sum(partial_reads) == 0  # was drops x (the partial's length) before
    got = (reg.model_dir(REPO_ID) / BIG).read_bytes()
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(tiny_files[BIG]).hexdigest()


def test_partial_of_an_earlier_pull_is_read_back_once(hub, tiny_files, monkeypatch,
                                                      partial_reads, krasis_home):
    size_bytes = len(tiny_files[BIG])
    first_stop, *later = _drop_points(size_bytes, 3)
    monkeypatch.setattr(pull_module, "RETRY_DELAYS_S", ())
    hub.drop_points[BIG] = [first_stop]
    with pytest.raises(Exception, match="connection to .* failed|stopped at"):
        list(Registry().pull(REPO_ID, build_caches=False))
    assert _part(krasis_home).stat().st_size == first_stop

    monkeypatch.setattr(pull_module, "RETRY_DELAYS_S", (0.01,) * len(later))
    hub.drop_points[BIG] = later
    reg = Registry()
    evs = list(reg.pull(REPO_ID, build_caches=False))
    assert evs[-1] == {"status": "success"}
    assert partial_reads == [first_stop]
    assert (reg.model_dir(REPO_ID) / BIG).read_bytes() == tiny_files[BIG]


def test_partial_of_another_length_is_hashed_again(hub, tiny_files, monkeypatch,
                                                   partial_reads, krasis_home):
    size_bytes = len(tiny_files[BIG])
    [drop_at] = _drop_points(size_bytes, 1)
    monkeypatch.setattr(pull_module, "RETRY_DELAYS_S", (0.01,))
    hub.drop_points[BIG] = [drop_at]
    cut_bytes = drop_at // 2
    reg = Registry()
    evs = []
    for ev in reg.pull(REPO_ID, build_caches=False):
        evs.append(ev)
        if ev["status"].startswith(f"retrying {BIG}"):
            hub.drop_points[BIG] = []
            with open(_part(krasis_home), "r+b") as handle:  # shorter than the hashes saw
                handle.truncate(cut_bytes)
    assert evs[-1] == {"status": "success"}
    assert partial_reads == [cut_bytes]
    assert [r["range"] for r in hub.requests_for(BIG)] == [None, f"bytes={cut_bytes}-"]
    assert (reg.model_dir(REPO_ID) / BIG).read_bytes() == tiny_files[BIG]
