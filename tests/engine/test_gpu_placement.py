"""VRAM budgets and the placement plan (pure functions)."""

import pytest

from krasisd.config import parse_size_bytes
from krasisd.engine.gpu.placement import (
    PlacementError,
    PlacementRequest,
    default_vram_budget,
    plan_placement,
    resolve_vram_budget,
)

GIB = 1 << 30


@pytest.mark.parametrize("text, expected", [
    ("16GiB", 16 * GIB), ("4GiB", 4 * GIB), ("512MiB", 512 << 20), ("1.5GB", 1_500_000_000),
    ("2g", 2_000_000_000), ("4gi", 4 * GIB), ("1048576", 1 << 20), (123, 123), (" 8 GiB ", 8 * GIB),
])
def test_budgets_are_read_by_the_one_size_parser(text, expected):
    assert parse_size_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-4GiB", "16 PiB", "4GiB8", -1])
def test_size_parser_rejects(text):
    with pytest.raises(ValueError):
        parse_size_bytes(text)


def test_resolve_budget_default_and_cap_ignoring_the_environment(monkeypatch):
    """The budget is what the caller passes (EngineOptions.vram_budget_bytes): the engine
    reads no KRASIS_VRAM_BUDGET of its own."""
    monkeypatch.setenv("KRASIS_VRAM_BUDGET", "1GiB")
    assert resolve_vram_budget(free_bytes=100 * GIB) == default_vram_budget(100 * GIB)
    assert resolve_vram_budget(free_bytes=100 * GIB, budget_bytes=4 * GIB) == 4 * GIB
    assert resolve_vram_budget(free_bytes=2 * GIB, budget_bytes=4 * GIB) == 2 * GIB  # capped
    with pytest.raises(ValueError, match="positive"):
        resolve_vram_budget(free_bytes=2 * GIB, budget_bytes=0)
    assert default_vram_budget(100 * GIB) == 95 * GIB  # 5 % margin beats 1 GiB
    assert default_vram_budget(10 * GIB) == 9 * GIB  # 1 GiB margin beats 5 %
    assert default_vram_budget(GIB // 2) == 0


def _request(budget, heat=None, layers=(1, 2, 3), experts=8):
    return PlacementRequest(budget_bytes=budget, dense_bytes=1000, kv_cache_bytes=200,
                            workspace_bytes=300, expert_bytes=100, moe_layers=tuple(layers),
                            num_experts=experts, heat=heat)


def test_everything_fits_needs_no_buffers():
    plan = plan_placement(_request(1500 + 24 * 100))
    assert plan.num_resident == 24 and plan.buffer_slots == 0 and plan.resident_fraction == 1.0
    assert plan.used_bytes == 1500 + 2400
    assert plan.streamed(2) == ()


def test_budget_below_floor_is_a_clear_error():
    with pytest.raises(PlacementError, match="two streamed layers"):
        plan_placement(_request(1500 + 16 * 100 - 1))


def test_floor_budget_keeps_no_expert_resident():
    plan = plan_placement(_request(1500 + 16 * 100))
    assert plan.num_resident == 0 and plan.buffer_slots == 16
    assert plan.streamed(1) == tuple(range(8))
    assert plan.used_bytes <= plan.request.budget_bytes


def test_partial_without_heat_spreads_over_layers_and_stays_in_budget():
    budget = 1500 + 16 * 100 + 7 * 100 + 50
    plan = plan_placement(_request(budget))
    assert plan.num_resident == 7
    assert sorted(len(ids) for ids in plan.resident.values()) == [2, 2, 3]
    assert plan.resident[1] == (0, 1, 2) and plan.resident[2] == (0, 1)
    assert plan.buffer_slots == 2 * 6  # shrunk to the most streamed experts of a layer
    assert plan.used_bytes <= budget


def test_heat_puts_hottest_experts_first():
    heat = {1: [0, 0, 0, 0, 0, 0, 0, 90], 2: [5, 0, 0, 0, 0, 80, 0, 0], 3: [0] * 8}
    plan = plan_placement(_request(1500 + 16 * 100 + 3 * 100, heat=heat))
    assert plan.resident == {1: (7,), 2: (0, 5), 3: ()}
    assert 7 not in plan.streamed(1) and 0 in plan.streamed(1)


def test_request_validation():
    with pytest.raises(ValueError):
        _request(-1)
    with pytest.raises(ValueError):
        PlacementRequest(10, 0, 0, 0, 0, (1,), 8)
