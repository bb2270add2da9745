"""A pull fetches config.json first and refuses, before any weights byte, a model the engine
cannot serve (absurd sizes, an architecture it does not have, a pre-quantized checkpoint)
or whose downloads plus caches cannot fit the disk."""

import json

import pytest
from fakehub import Repo
from krasis_registry import PullError, Registry, StorageFull, caches
from krasis_registry import pull as pull_module
from krasis_registry.modelinfo import prequantized_error
from krasis_registry.selection import is_taken
from regtest import REPO_ID


def _serve(hub, tiny_files, repo_id: str, **config_changes) -> None:
    config = json.loads(tiny_files["config.json"])
    config.update(config_changes)
    repo = Repo()
    repo.add_commit({**tiny_files, "config.json": json.dumps(config).encode()})
    hub.repos[repo_id] = repo


def _fetched(hub) -> list[str]:
    return sorted({r["path"] for r in hub.file_requests if r["method"] == "GET"})


@pytest.mark.parametrize("quantization, named", [
    ({"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}, "fp8"),
    ({"quant_method": "mxfp4"}, "mxfp4"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized"},
     r"compressed-tensors \(pack-quantized\)"),
])
def test_a_prequantized_checkpoint_is_refused_before_its_weights(hub, tiny_files, quantization,
                                                                 named):
    _serve(hub, tiny_files, "quant-org/fp8", quantization_config=quantization)
    reg = Registry()
    with pytest.raises(PullError, match=rf"^refusing quant-org/fp8: pre-quantized checkpoints "
                       rf"are not supported: .* quant_method {named}; .*bf16 release"):
        list(reg.pull("quant-org/fp8"))
    assert _fetched(hub) == ["config.json"]
    shown = reg.show("quant-org/fp8")
    assert shown["state"] == "failed" and "pre-quantized" in shown["error"]
    assert reg.list() == []


def test_a_nested_quantization_config_is_refused_too(hub, tiny_files):
    config = json.loads(tiny_files["config.json"])
    _serve(hub, tiny_files, "quant-org/nested",
           text_config={**config, "quantization_config": {"quant_method": "fp8"}})
    with pytest.raises(PullError, match="quant_method fp8"):
        list(Registry().pull("quant-org/nested"))
    assert _fetched(hub) == ["config.json"]


def test_an_architecture_the_engine_lacks_is_refused_before_its_weights(hub, tiny_files):
    _serve(hub, tiny_files, "other-org/llama", architectures=["LlamaForCausalLM"])
    with pytest.raises(PullError, match=r"^refusing other-org/llama: .*LlamaForCausalLM.*"
                       r"supported: .*DeepseekV2ForCausalLM.*GptOssForCausalLM"):
        list(Registry().pull("other-org/llama"))
    assert _fetched(hub) == ["config.json"]


def test_absurd_sizes_are_refused_before_the_weights(hub, tiny_files):
    _serve(hub, tiny_files, "evil-org/experts", n_routed_experts=10**6)
    with pytest.raises(PullError, match=r"^refusing evil-org/experts: config.json: "
                       r"n_routed_experts = 1000000 is outside"):
        list(Registry().pull("evil-org/experts"))
    assert _fetched(hub) == ["config.json"]


def test_a_model_bigger_than_ram_and_disk_is_refused_with_the_numbers(hub, tiny_files,
                                                                      monkeypatch):
    monkeypatch.setattr(pull_module, "machine_capacity_bytes", lambda home: 1000)
    with pytest.raises(PullError, match=r"^refusing krasis-test/tiny-moe: config.json "
                       r"describes a model of about [\d,]+ parameters .* more than this machine "
                       r"can hold \(0 GiB of memory and disk\)"):
        list(Registry().pull(REPO_ID))
    assert _fetched(hub) == ["config.json"]


def _free_disk(monkeypatch, free_bytes: int) -> None:
    usage = pull_module.shutil.disk_usage

    def disk(path):
        real = usage(path)
        return type(real)(real.total, real.total - free_bytes, free_bytes)

    monkeypatch.setattr(pull_module.shutil, "disk_usage", disk)


def test_downloads_plus_caches_that_do_not_fit_are_refused_before_the_weights(
        hub, tiny_files, monkeypatch):
    from fakebuilders import fast_builder

    config = json.loads(tiny_files["config.json"])
    download_bytes = sum(len(data) for path, data in tiny_files.items() if is_taken(path))
    cache_bytes = caches.cache_bytes_floor(config, "int4")
    assert cache_bytes > 100_000  # the tiny model's linears at half a byte each
    _free_disk(monkeypatch, download_bytes + cache_bytes - 1)
    reg = Registry(cache_builders={"cpu": fast_builder}, group_size=128)
    with pytest.raises(StorageFull, match=r"^insufficient storage: not enough disk space to "
                       r"pull krasis-test/tiny-moe: [\d.]+ GiB still to download and at least "
                       r"[\d.]+ GiB of int4 caches \(cpu\) built after it, [\d.]+ GiB free"):
        list(reg.pull(REPO_ID, build_caches=["cpu"]))
    assert _fetched(hub) == ["config.json"]
    # without a cache build the same disk takes the files
    assert list(reg.pull(REPO_ID, build_caches=False))[-1] == {"status": "success"}


def test_caches_that_fit_are_built(hub, tiny_files, monkeypatch):
    from fakebuilders import fast_builder

    config = json.loads(tiny_files["config.json"])
    download_bytes = sum(len(data) for path, data in tiny_files.items() if is_taken(path))
    _free_disk(monkeypatch, download_bytes + 2 * caches.cache_bytes_floor(config, "int4"))
    reg = Registry(cache_builders={"cpu": fast_builder}, group_size=128)
    assert list(reg.pull(REPO_ID, build_caches=["cpu"]))[-1] == {"status": "success"}


@pytest.mark.parametrize("config", [
    {},
    {"quantization_config": {"quant_method": "fp8", "fmt": "e4m3"}},
    {"quantization_config": {"quant_method": "mxfp4"}},
    {"quantization_config": {"quant_method": "compressed-tensors", "format": "pack-quantized"}},
    {"quantization_config": "odd"},
    {"text_config": {"quantization_config": {"quant_method": "fp8"}}},
])
def test_the_registry_refuses_quantization_word_for_word_as_the_engine(config):
    pytest.importorskip("torch")
    from krasisd.engine.errors import UnsupportedModelError
    from krasisd.engine.loader import check_not_prequantized

    try:
        check_not_prequantized(config)
    except UnsupportedModelError as exc:
        assert prequantized_error(config) == str(exc)
    else:
        assert prequantized_error(config) is None
