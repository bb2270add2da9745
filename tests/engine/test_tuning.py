"""Kernel tiles remembered across processes (krasisd.engine.gpu.tuning)."""

from pathlib import Path

import pytest
import torch

from krasisd.engine.gpu import moe_triton, tuning
from krasisd.engine.gpu.moe_decode import GEMV_CANDIDATES, GemvConfig
from krasisd.engine.gpu.moe_triton import CANDIDATES, KernelConfig

KEPT = tuning.KernelTuning(Path("unused"))  # table_path is replaced where a file is used


def _at(path: Path):
    """A table_path that puts every tuning file at ``path``."""
    return lambda device=None, table_dir=None: path


def test_a_saved_tile_is_read_back_by_a_later_process(tmp_path):
    path = tmp_path / "tuning" / "gpu.json"
    key = (4, 128, 2048, 1408, 6)
    assert tuning.load(path, "moe_decode", GEMV_CANDIDATES, key, GemvConfig) is None
    tuning.save(path, "moe_decode", GEMV_CANDIDATES, key, GemvConfig(64, 128, 8, 8))
    tuning.save(path, "moe_triton", CANDIDATES, key, CANDIDATES[2])  # another family, same key
    assert tuning.load(path, "moe_decode", GEMV_CANDIDATES, key, GemvConfig) == GemvConfig(
        64, 128, 8, 8)
    assert tuning.load(path, "moe_triton", CANDIDATES, key, KernelConfig) == CANDIDATES[2]
    assert tuning.load(path, "moe_decode", GEMV_CANDIDATES, (8,), GemvConfig) is None


def test_new_candidates_ignore_old_entries(tmp_path):
    path = tmp_path / "t.json"
    tuning.save(path, "moe_decode", GEMV_CANDIDATES, (1,), GemvConfig())
    assert tuning.load(path, "moe_decode", GEMV_CANDIDATES[:-1], (1,), GemvConfig) is None


def test_a_damaged_or_unwritable_file_means_timing_again(tmp_path, caplog):
    path = tmp_path / "t.json"
    path.write_text("{not json")
    assert tuning.load(path, "moe_decode", GEMV_CANDIDATES, (1,), GemvConfig) is None
    assert "unreadable" in caplog.text
    blocked = tmp_path / "file"
    blocked.write_text("")
    tuning.save(blocked / "t.json", "moe_decode", GEMV_CANDIDATES, (1,), GemvConfig())  # no raise
    assert "could not write" in caplog.text


def test_tuned_config_uses_the_stored_tile_without_timing(tmp_path, monkeypatch):
    path = tmp_path / "t.json"
    key = ("shape", 1)
    tuning.save(path, "moe_triton", CANDIDATES, key, CANDIDATES[3])
    monkeypatch.setattr(tuning, "table_path", _at(path))
    monkeypatch.setattr(moe_triton._TUNER, "_memo", {})

    def run(cfg):
        raise AssertionError("timed although a tile was stored")

    assert moe_triton.tuned_config(key, run, KEPT) == CANDIDATES[3]


def test_no_tuning_file_without_cuda(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert tuning.table_path(None, tmp_path) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tuning_file_lives_in_the_given_folder(tmp_path):
    assert tuning.table_path(None, tmp_path).parent == tmp_path
    assert tuning.table_path(None, None) is None  # no folder: tiles are not kept


def test_tuning_follows_the_engine_options(tmp_path):
    """autotune off: no tuning, so kernels take fixed tiles; on: the folder goes along."""
    assert tuning.tuning_for(False, tmp_path) is None
    assert tuning.tuning_for(True, tmp_path) == tuning.KernelTuning(tmp_path)
    assert tuning.tuning_for(True, None).table_dir is None


def test_the_folder_reaches_the_tuning_file(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(tuning, "table_path",
                        lambda device=None, table_dir=None: seen.append(table_dir))
    tuner = tuning.Tuner("moe_decode", GEMV_CANDIDATES, GemvConfig, _timed_at_one_ms)
    tuner.pick(("k",), lambda cfg: None, tuning.KernelTuning(tmp_path / "tiles"))
    assert seen and set(seen) == {tmp_path / "tiles"}


def test_tuner_times_once_keeps_the_fastest_and_falls_back(tmp_path, monkeypatch):
    path = tmp_path / "t.json"
    monkeypatch.setattr(tuning, "table_path", _at(path))
    cost = {GEMV_CANDIDATES[0]: 3.0, GEMV_CANDIDATES[1]: 1.0}
    calls = []

    def run(cfg):
        calls.append(cfg)
        if cfg not in cost:
            raise RuntimeError("this tile does not run here")

    def timer(call):
        call()
        return cost[calls[-1]]

    tuner = tuning.Tuner("moe_decode", GEMV_CANDIDATES, GemvConfig, timer)
    assert tuner.pick(("k",), run, KEPT) == GEMV_CANDIDATES[1]
    timed = len(calls)
    assert tuner.pick(("k",), run, KEPT) == GEMV_CANDIDATES[1] and len(calls) == timed  # memo
    fresh = tuning.Tuner("moe_decode", GEMV_CANDIDATES, GemvConfig, timer)
    assert fresh.pick(("k",), run, KEPT) == GEMV_CANDIDATES[1] and len(calls) == timed  # file
    cost.clear()
    assert tuner.pick(("other",), run, KEPT, fallback=GemvConfig()) == GemvConfig()
    with pytest.raises(RuntimeError, match="no moe_decode kernel"):
        tuner.pick(("third",), run, KEPT)


def _count_reads(monkeypatch, path):
    reads = []
    read_text = Path.read_text

    def counting(self, *args, **kwargs):
        if self == path:
            reads.append(self)
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counting)
    return reads


def _timed_at_one_ms(call):
    call()
    return 1.0


def test_a_first_timing_reads_the_tuning_file_once(tmp_path, monkeypatch):
    path = tmp_path / "t.json"
    tuning.save(path, "moe_triton", CANDIDATES, ("kept",), CANDIDATES[1])
    monkeypatch.setattr(tuning, "table_path", _at(path))
    reads = _count_reads(monkeypatch, path)
    tuner = tuning.Tuner("moe_decode", GEMV_CANDIDATES, GemvConfig, _timed_at_one_ms)
    assert tuner.pick(("k",), lambda cfg: None, KEPT) == GEMV_CANDIDATES[0]
    assert len(reads) == 1  # looked up, timed, merged and written from that one read
    assert tuning.load(path, "moe_decode", GEMV_CANDIDATES, ("k",), GemvConfig) == (
        GEMV_CANDIDATES[0])
    assert tuning.load(path, "moe_triton", CANDIDATES, ("kept",), KernelConfig) == CANDIDATES[1]


@pytest.mark.parametrize("file_at_start", [False, True])
def test_tiles_another_process_saves_during_a_timing_are_kept(tmp_path, monkeypatch,
                                                              file_at_start):
    path = tmp_path / "t.json"
    if file_at_start:
        tuning.save(path, "moe_decode", GEMV_CANDIDATES, ("old",), GEMV_CANDIDATES[3])
    monkeypatch.setattr(tuning, "table_path", _at(path))

    def timer_beside_another_process(call):
        tuning.save(path, "moe_decode", GEMV_CANDIDATES, ("theirs",), GEMV_CANDIDATES[2])
        return _timed_at_one_ms(call)

    tuner = tuning.Tuner("moe_decode", GEMV_CANDIDATES, GemvConfig, timer_beside_another_process)
    assert tuner.pick(("mine",), lambda cfg: None, KEPT) == GEMV_CANDIDATES[0]
    stored = {key: tuning.load(path, "moe_decode", GEMV_CANDIDATES, (key,), GemvConfig)
              for key in ("mine", "theirs", "old")}
    assert stored == {"mine": GEMV_CANDIDATES[0], "theirs": GEMV_CANDIDATES[2],
                      "old": GEMV_CANDIDATES[3] if file_at_start else None}
