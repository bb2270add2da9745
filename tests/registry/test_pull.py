"""Pulls from the stand-in hub: clean pull, errors from the hub, checksums, disk, revisions."""

import hashlib
import json
import shutil
from collections import namedtuple

import pytest
from fakehub import Repo
from krasis_registry import ModelNotFound, PullError, Registry
from regtest import REPO_ID

TAKEN = ["config.json", "generation_config.json", "model-00001-of-00002.safetensors",
         "model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json",
         "tokenizer_config.json"]


def test_clean_pull(hub, tiny_files, krasis_home):
    reg = Registry()
    evs = list(reg.pull(REPO_ID, build_caches=False))
    assert evs[0] == {"status": "pulling manifest"}
    assert evs[-1] == {"status": "success"}
    model_dir = reg.model_dir(REPO_ID)
    assert model_dir.is_relative_to(krasis_home)
    assert sorted(p.name for p in model_dir.iterdir()) == TAKEN
    for name in TAKEN:
        assert (model_dir / name).read_bytes() == tiny_files[name]
    finals = {e["status"]: e for e in evs if e["status"].startswith("pulling ")}
    weights = finals["pulling model-00002-of-00002.safetensors"]
    sha = hashlib.sha256(tiny_files["model-00002-of-00002.safetensors"]).hexdigest()
    assert weights["digest"] == f"sha256:{sha}"
    assert weights["completed"] == weights["total"] == len(
        tiny_files["model-00002-of-00002.safetensors"])
    # decoys (pickle, python, sub-folders, README) are never requested
    assert {r["path"] for r in hub.file_requests} == set(TAKEN)


def test_pull_records_model(hub, tiny_files):
    reg = Registry()
    list(reg.pull(REPO_ID, build_caches=False))
    shown = reg.show(REPO_ID)
    assert shown["state"] == "ready"
    assert shown["repo"] == REPO_ID
    assert shown["commit"] == hub.repos[REPO_ID].refs["main"]
    assert shown["architecture"] == "DeepseekV2ForCausalLM"
    total, active = shown["parameters"]["total"], shown["parameters"]["active"]
    assert 0 < active < total
    assert shown["size"] == sum(len(tiny_files[n]) for n in TAKEN)
    for f in shown["files"]:
        assert f["state"] == "complete"
        assert f["sha256"] == hashlib.sha256(tiny_files[f["path"]]).hexdigest()
    [item] = reg.list()
    assert item["name"] == f"{REPO_ID}:latest"
    assert item["details"]["family"] == "deepseek_v2"
    assert item["details"]["quantization_level"] == "F32"
    assert item["details"]["parameter_size"] == f"{total / 1e3:.1f}K"
    assert len(item["digest"]) == 64


def test_second_pull_fetches_nothing(hub):
    reg = Registry()
    list(reg.pull(REPO_ID, build_caches=False))
    served = sum(hub.bytes_sent.values())
    evs = list(reg.pull(REPO_ID, build_caches=False))
    assert any("up to date" in e["status"] for e in evs)
    assert sum(hub.bytes_sent.values()) == served


def test_missing_repo(hub):
    reg = Registry()
    with pytest.raises(PullError, match="not found"):
        list(reg.pull("nobody/no-such-model", build_caches=False))
    with pytest.raises(ModelNotFound):
        reg.model_dir("nobody/no-such-model")


def test_missing_revision(hub):
    reg = Registry()
    with pytest.raises(PullError, match="revision 'v9' not found"):
        list(reg.pull(REPO_ID, revision="v9", build_caches=False))


def test_gated_repo_without_token(hub, tiny_files):
    repo = Repo(gated=True)
    repo.add_commit(tiny_files)
    hub.repos["gated-org/gated"] = repo
    reg = Registry()
    with pytest.raises(PullError, match="gated.*HF_TOKEN"):
        list(reg.pull("gated-org/gated", build_caches=False))
    assert hub.file_requests == []


def test_gated_repo_with_token(hub, tiny_files, monkeypatch):
    repo = Repo(gated=True)
    repo.add_commit(tiny_files)
    hub.repos["gated-org/gated"] = repo
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    reg = Registry()
    assert list(reg.pull("gated-org/gated", build_caches=False))[-1] == {"status": "success"}
    assert all(r["authorized"] for r in hub.file_requests)


def test_corrupted_file_caught_by_checksum(hub, tiny_files, krasis_home):
    hub.corrupt_paths.add("model-00001-of-00002.safetensors")
    reg = Registry()
    with pytest.raises(PullError, match="checksum mismatch for model-00001"):
        list(reg.pull(REPO_ID, build_caches=False))
    shown = reg.show(REPO_ID)
    assert shown["state"] == "failed" and "checksum mismatch" in shown["error"]
    with pytest.raises(ModelNotFound, match="not ready"):
        reg.model_dir(REPO_ID)
    assert not list(krasis_home.glob("partials/**/model-00001-of-00002.safetensors.part"))
    hub.corrupt_paths.clear()
    assert list(reg.pull(REPO_ID, build_caches=False))[-1] == {"status": "success"}


def test_corrupted_small_file_caught_by_git_blob_id(hub):
    hub.corrupt_paths.add("config.json")
    reg = Registry()
    with pytest.raises(PullError, match="checksum mismatch for config.json.*git blob id"):
        list(reg.pull(REPO_ID, build_caches=False))


def test_not_enough_disk(hub, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    reg = Registry()
    with pytest.raises(PullError, match="not enough disk space"):
        list(reg.pull(REPO_ID, build_caches=False))
    assert hub.file_requests == []


def test_pickle_only_repo_refused(hub):
    repo = Repo()
    repo.add_commit({"config.json": b"{}", "pytorch_model.bin": b"\x80\x02..."})
    hub.repos["old-org/pickled"] = repo
    reg = Registry()
    with pytest.raises(PullError, match="only pickle weights.*pytorch_model.bin"):
        list(reg.pull("old-org/pickled", build_caches=False))
    assert hub.file_requests == []


def test_pinned_revision(hub, tiny_files):
    repo = hub.repos[REPO_ID]
    old_config = json.loads(tiny_files["config.json"])
    old_config["krasis_marker"] = "v1"
    old_files = {**tiny_files, "config.json": json.dumps(old_config).encode()}
    old_commit = repo.add_commit(old_files, ref="v1")
    new_commit = repo.add_commit(tiny_files, ref="main")
    reg = Registry()
    list(reg.pull(f"{REPO_ID}:old", revision="v1", build_caches=False))
    assert reg.show(f"{REPO_ID}:old")["commit"] == old_commit
    model_dir = reg.model_dir(f"{REPO_ID}:old")
    assert json.loads((model_dir / "config.json").read_text())["krasis_marker"] == "v1"
    list(reg.pull(REPO_ID, build_caches=False))
    assert reg.show(REPO_ID)["commit"] == new_commit
    assert "krasis_marker" not in json.loads((reg.model_dir(REPO_ID) / "config.json").read_text())


def test_hostile_file_paths_refused(hub):
    repo = Repo()
    repo.add_commit({"config.json": b"{}", "model.safetensors": b"x" * 16,
                     "bad\\..\\x.json": b"{}"})
    hub.repos["evil-org/escape"] = repo
    reg = Registry()
    with pytest.raises(Exception, match="refusing file path"):
        list(reg.pull("evil-org/escape", build_caches=False))


def test_offline_mode_is_a_clear_error(hub, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PullError, match="HF_HUB_OFFLINE"):
        list(Registry().pull(REPO_ID, build_caches=False))


def test_unknown_bare_name(hub):
    with pytest.raises(PullError, match="unknown model"):
        Registry().pull("no-such-alias")


def test_plain_http_endpoint_refused_unless_insecure(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://hub.example.org")
    with pytest.raises(PullError, match="plain-http"):
        Registry().pull(REPO_ID)


def test_unreachable_hub(hub, monkeypatch):
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(PullError, match="connection to .* failed"):
        list(Registry().pull(REPO_ID, build_caches=False))


def test_dropped_connection_resumes_within_the_pull(hub, tiny_files, monkeypatch):
    from krasis_registry import pull as pull_module

    monkeypatch.setattr(pull_module, "RETRY_DELAYS_S", (0.01, 0.01))
    big = "model-00002-of-00002.safetensors"
    hub.drop_after_bytes[big] = 300_000
    hub.drops_left[big] = 2
    reg = Registry()
    evs = list(reg.pull(REPO_ID, build_caches=False))
    assert evs[-1] == {"status": "success"}
    assert sum(e["status"].startswith(f"retrying {big}") for e in evs) == 2
    assert [r["range"] for r in hub.requests_for(big)] == [None, "bytes=300000-",
                                                           "bytes=300000-"]
    assert hub.served(big) == len(tiny_files[big])
    assert (reg.model_dir(REPO_ID) / big).read_bytes() == tiny_files[big]


def test_connection_dropping_every_time_fails_and_keeps_the_bytes(hub, monkeypatch,
                                                                  krasis_home):
    from krasis_registry import pull as pull_module

    monkeypatch.setattr(pull_module, "RETRY_DELAYS_S", (0.01,))
    big = "model-00002-of-00002.safetensors"
    hub.drop_after_bytes[big] = 300_000
    hub.drops_left[big] = 99
    with pytest.raises(PullError, match="connection to .* failed|stopped at"):
        list(Registry().pull(REPO_ID, build_caches=False))
    [part] = krasis_home.glob(f"partials/**/{big}.part")
    assert part.stat().st_size == 300_000
    assert len(hub.requests_for(big)) == 2
