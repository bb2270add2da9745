"""Hybrid decode on the GPU against the CPU path, at 0 %, about 30 % and 100 % of the routed
experts resident on the GPU, INT8 and INT4, with and without CUDA graphs.

The CPU path is the engine in float32 on the CPU with NativeExperts over the CPU cache. The
hybrid path runs the model in bf16 on the GPU, the resident experts from the GPU format
(Triton) and the others from the same CPU cache (native kernels). The two formats round
differently (INT4: [-8, 7] x max/-8 on the CPU, [-7, 7] x absmax/7 on the GPU), so the
experts' weights are drawn from values both formats hold exactly (``exact_experts``): then
the weights are the same on both sides and what remains is the CPU kernels' INT8
activations and bf16 in the dense parts. The bound is measured from those causes alone,
without any hybrid code: (a) the CPU path against float32 with the GPU format's dequantized
experts, (b) bf16 against float32 with the same experts; the hybrid's logits may exceed their
sum by half, plus 5e-3 for summation order, over the whole sequence. Greedy decoding must
give the CPU path's 64 tokens, except that at a step whose top-2 margin in the CPU path is
within that step's noise the other token may win; both paths must agree up to there.
Teacher-forced, every step must rank the CPU path's first token first under the same rule.
A step's noise is the larger of two measures: the (a) + (b) sum over that step's logits
(bf16 noise is far from uniform over the steps), and half again how far the plain engine
(the same bf16 model on the GPU with every routed expert through NativeExperts, layer by
layer: the hybrid's arithmetic without its code) moves the CPU path's top-2 margin, doubled:
the hybrid rounds its bf16 activations in another order (fused kernels), so it draws its own
INT8 activation roundings from that same noise. This measure is needed where INT8
activations see bf16 inputs: on Qwen3-MoE at INT4 with every expert on the CPU, the plain
engine moves the second step's margin (0.35) by 0.19 and the hybrid flips it, where the
norm-based allowance is 0.18; over the sequence the hybrid stays within 0.018 of the plain
engine's logits.
A hybrid that loses its CPU part, or its GPU part, misses the bound by far (checked).
"""

import copy
import json
from pathlib import Path

import pytest
import torch

from krasisd.engine.config import ModelConfig
from krasisd.engine.cpu_cache import CpuCache, LayerExperts
from krasisd.engine.engine import Engine
from krasisd.engine.experts import TorchExperts
from krasisd.engine.gpu.dense_decode import GpuQuantLinear
from krasisd.engine.gpu.format import QuantSpec
from krasisd.engine.gpu.graphs import DecodeStep, HybridEngine
from krasisd.engine.gpu.host import HostExperts
from krasisd.engine.gpu.hybrid import HybridExperts
from krasisd.engine.gpu.placement import PlacementPlan, PlacementRequest
from krasisd.engine.gpu.prefill import GpuExperts
from krasisd.engine.gpu.synthetic import TINY_DEEPSEEK_V2, TINY_QWEN3_MOE, synthetic_model
from krasisd.engine.heat import ExpertHeat
from krasisd.engine.native_experts import NativeExperts
from krasisd.engine.quant import quantize

STEPS = 64
FRACTIONS = (0.0, 0.3, 1.0)
PROMPT = [5, 17, 33, 2, 99, 64, 7, 150, 12, 40]
BUNDLED_TINY = Path(__file__).resolve().parents[2] / "registry" / "bundled" / "krasis-tiny"
QWEN3 = dict(TINY_QWEN3_MOE, vocab_size=256, hidden_size=256, intermediate_size=384,
             moe_intermediate_size=128, num_hidden_layers=4, head_dim=64, num_experts=16,
             num_experts_per_tok=4, mlp_only_layers=[0], max_position_embeddings=512)
CONFIGS = {
    "deepseek-v2": dict(TINY_DEEPSEEK_V2, hidden_size=256, moe_intermediate_size=128,
                        n_routed_experts=16, num_experts_per_tok=4, num_hidden_layers=4,
                        vocab_size=256, max_position_embeddings=512),
    "qwen3-moe": QWEN3,
}


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def exact_experts(config, layer: int, bits: int, group: int, seed: int):
    """gate/up [E, I, D] and down [E, D, I] that both formats represent exactly.

    INT8: q * 2^e with q in [-127, 127] and a 127 in every group (both scales are 2^e).
    INT4: 0 or s * 7 * 2^e with one sign s per group and at least one nonzero (CPU scale
    -s * 7 * 2^e / 8, q = -8; GPU scale 2^e, q = 7s): the only values on both INT4 grids.
    """
    gen = torch.Generator().manual_seed(seed * 1000 + layer)
    e, i, d = config.n_routed_experts, config.moe_intermediate_size, config.hidden_size

    def draw(rows: int, cols: int) -> torch.Tensor:  # [E, rows, cols], groups along cols
        shape = (e, rows, cols // group, group)
        if bits == 8:
            q = torch.randint(-127, 128, shape, generator=gen).float()
            q[..., 0] = 127.0
            step_std = 1 / (73 * cols**0.5)  # |q| ~ 73 on average
        else:
            sign = torch.randint(0, 2, shape[:-1], generator=gen).float() * 2 - 1  # per group
            q = 7.0 * (torch.rand(shape, generator=gen) < 0.5)
            q[..., 0] = 7.0
            q *= sign[..., None]
            step_std = 1 / (5 * cols**0.5)
        exponent = torch.round(torch.log2(torch.tensor(step_std)) +
                               torch.randint(-1, 2, shape[:-1], generator=gen))
        return (q * torch.exp2(exponent)[..., None]).reshape(e, rows, cols)

    return draw(i, d), draw(i, d), draw(d, i)


def _cpu_cache(weights: dict, bits: int, group: int) -> CpuCache:
    layers = {}
    for layer, stacks in weights.items():
        arrays = []
        for w in stacks:  # gate, up, down
            q, s = quantize(w, bits, group)
            arrays += [q.numpy(), s.numpy()]
        layers[layer] = LayerExperts(*arrays)
    num, _, hidden = weights[min(weights)][0].shape
    return CpuCache({"bits": bits, "group_size": group, "hidden": hidden, "n_experts": num},
                    layers)


def _plan(host: HostExperts, fraction: float) -> PlacementPlan:
    """``fraction`` of each layer's experts resident, a different subset per layer; the
    request's budget is what plan_placement would need for as many (re-placement uses it)."""
    layers, num, per = tuple(sorted(host.layers)), host.num_experts, host.layout.expert_bytes
    count = round(fraction * num)
    slots = len(layers) * num if count == num else 2 * num + count * len(layers)
    request = PlacementRequest(slots * per, 0, 0, 0, per, layers, num)
    resident = {layer: tuple(sorted((e * 5 + layer) % num for e in range(count)))
                for layer in layers}
    return PlacementPlan(request, resident, 2 * num)


class Setup:
    """The CPU path and the pieces of hybrid engines for one model and quant."""

    def __init__(self, name: str, quant: str, device):
        self.config = ModelConfig.from_dict(CONFIGS[name])
        bits, group = {"int8": (8, 64), "int4": (4, 64)}[quant]
        layers = [i for i in range(self.config.num_hidden_layers) if self.config.is_moe_layer(i)]
        weights = {layer: exact_experts(self.config, layer, bits, group, seed=7)
                   for layer in layers}
        self.cache = _cpu_cache(weights, bits, group)
        self.host = HostExperts.from_stacked(weights, QuantSpec(bits, group))
        self.model32 = synthetic_model(self.config, "cpu", torch.float32, seed=7)
        self.cpu = Engine(self.config, self.model32, NativeExperts(self.cache, threads=2),
                          eos_token_ids=set())
        self.device = device

    def hybrid(self, fraction: float, use_graphs: bool, heat=None) -> HybridEngine:
        model = _clone(self.model32).to(self.device, torch.bfloat16)
        gpu = GpuExperts(self.host, _plan(self.host, fraction), self.device)
        backend = HybridExperts(gpu, NativeExperts(self.cache, threads=2), self.device,
                                heat=heat)
        return HybridEngine(self.config, model, backend, eos_token_ids=set(),
                            use_graphs=use_graphs)

    def plain(self) -> Engine:
        """The hybrid's computation without hybrid code: the same bf16 model on the device,
        every routed expert through NativeExperts, called layer by layer (model.decode)."""
        model = _clone(self.model32).to(self.device, torch.bfloat16)
        return Engine(self.config, model, NativeExperts(self.cache, threads=2),
                      eos_token_ids=set())

    def bound(self, sequence: list[int]) -> tuple[float, torch.Tensor]:
        """The noise allowance from format and bf16 differences alone (see the docstring):
        a relative bound over the whole sequence, and an allowance per decode step [STEPS]
        in logit units for the CPU path's top-2 margin."""
        ref = _clone(self.model32)
        ref.expert_backend = TorchExperts(self.host.unpack())
        ids = torch.tensor(sequence)
        with torch.inference_mode():
            ref_logits = ref.prefill(ids)[len(PROMPT) - 1 : -1]
            cpu_logits = self.cpu.forward(sequence)[len(PROMPT) - 1 : -1]
            bf16 = _clone(self.model32).to(torch.bfloat16)
            bf16.expert_backend = TorchExperts(self.host.unpack(torch.bfloat16))
            bf16_logits = bf16.prefill(ids)[len(PROMPT) - 1 : -1]
        plain_logits = _teacher_forced(self.plain(), sequence)  # [STEPS, V]
        whole = 1.5 * (_rel(cpu_logits, ref_logits) + _rel(bf16_logits, ref_logits)) + 5e-3
        per_step = 1.5 * (_step_rel(cpu_logits, ref_logits) + _step_rel(bf16_logits, ref_logits))
        spread = 2 * (per_step + 5e-3) * cpu_logits.norm(dim=-1) / cpu_logits.shape[-1] ** 0.5
        shift = 2 * _margin_shift(plain_logits, cpu_logits) + 1e-3
        return whole, torch.maximum(spread, shift)  # [STEPS]


def _margin_shift(other: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """How far ``other`` moves the top-2 margin of ``logits`` [STEPS, V] at each step."""
    top2 = logits.topk(2, dim=-1).indices  # [STEPS, 2]
    mine, theirs = logits.gather(1, top2), other.float().gather(1, top2)
    return ((theirs[:, 0] - theirs[:, 1]) - (mine[:, 0] - mine[:, 1])).abs()


def _step_rel(a, b) -> torch.Tensor:
    """Relative difference of each row of [STEPS, V] logits: [STEPS]."""
    return (a.float() - b.float()).norm(dim=-1) / b.float().norm(dim=-1)


def _clone(model):
    """A deep copy of the model without its expert backend (native runners do not copy)."""
    backend, model.expert_backend = model.expert_backend, None
    try:
        return copy.deepcopy(model)
    finally:
        model.expert_backend = backend


def _teacher_forced(engine, sequence: list[int]) -> torch.Tensor:
    """Logits [STEPS, V] of each decode step over ``sequence`` (prompt + STEPS tokens)."""
    cache = engine.new_cache(len(sequence) + 1)
    rows = [engine.forward(PROMPT, cache)[-1].float().cpu()]
    for token in sequence[len(PROMPT) : -1]:
        rows.append(engine.forward([token], cache)[-1].float().cpu())
    return torch.stack(rows)


@pytest.fixture(scope="module", params=[("deepseek-v2", "int8"), ("deepseek-v2", "int4"),
                                        ("qwen3-moe", "int4")], ids=lambda p: "-".join(p))
def setup(request):
    torch.manual_seed(0)
    torch.set_num_threads(4)  # leaves cores to the native pools (oversubscription stalls)
    return Setup(*request.param, device=torch.device("cuda"))


@pytest.fixture(scope="module")
def reference(setup):
    tokens = setup.cpu.greedy(PROMPT, STEPS)
    sequence = PROMPT + tokens
    logits = _teacher_forced(setup.cpu, sequence)  # [STEPS, V]
    bound, allowance = setup.bound(sequence)
    return tokens, logits, bound, allowance


def _margin(logits: torch.Tensor) -> torch.Tensor:
    """The CPU path's top-2 margin per step: [STEPS]."""
    top2 = logits.topk(2, dim=-1).values  # [STEPS, 2]
    return top2[:, 0] - top2[:, 1]


def _check_argmax(got: torch.Tensor, logits: torch.Tensor, allowance: torch.Tensor):
    """Teacher-forced: a step may rank another token first only within its noise allowance."""
    margin = _margin(logits)
    differ = got.argmax(-1) != logits.argmax(-1)  # [STEPS]
    far = differ & (margin >= allowance)
    assert not far.any(), (
        f"steps {far.nonzero().flatten().tolist()} pick another token with top-2 margins "
        f"{margin[far].tolist()} above the noise allowance {allowance[far].tolist()}")


def _check_greedy(got: list[int], tokens: list[int], logits: torch.Tensor,
                  allowance: torch.Tensor):
    margin = _margin(logits)
    for step, (a, b) in enumerate(zip(got, tokens, strict=True)):
        if a != b:
            assert margin[step] < allowance[step], (
                f"step {step}: {a} != {b} with a top-2 margin {margin[step]:.4f} "
                f"far above the noise allowance {allowance[step]:.4f}")
            return step
    return len(tokens)


@pytest.mark.parametrize("fraction", FRACTIONS)
@pytest.mark.parametrize("use_graphs", [True, False], ids=["graphs", "eager"])
def test_hybrid_decode_matches_the_cpu_path(setup, reference, fraction, use_graphs):
    tokens, logits, bound, allowance = reference
    engine = setup.hybrid(fraction, use_graphs)
    assert engine.expert_backend.resident_fraction() == pytest.approx(fraction, abs=0.05)
    got = _teacher_forced(engine, PROMPT + tokens)
    assert _rel(got, logits) < bound
    _check_argmax(got, logits, allowance)
    _check_greedy(engine.greedy(PROMPT, STEPS), tokens, logits, allowance)
    if use_graphs:
        steps = list(engine._steps.values())
        assert steps and all(s.graph_failures == 0 and s.use_graphs for s in steps)
        assert all(p.graphs for s in steps for p in s.program if hasattr(p, "graphs"))


def test_graphs_replay_what_eager_steps_compute(setup, reference):
    tokens, *_ = reference
    sequence = PROMPT + tokens
    eager = _teacher_forced(setup.hybrid(0.3, use_graphs=False), sequence)
    graphed = _teacher_forced(setup.hybrid(0.3, use_graphs=True), sequence)
    assert _rel(graphed, eager) < 5e-3


@pytest.mark.parametrize("part", ["cpu", "gpu"])
def test_bound_catches_a_missing_part(setup, reference, part):
    tokens, logits, bound, _ = reference
    engine = setup.hybrid(0.5, use_graphs=False)
    backend = engine.expert_backend
    if part == "cpu":
        backend.cpu.runner = _ZeroRunner()
    else:
        original = backend.gpu_part
        backend.gpu_part = lambda *args: original(*args) * 0
    assert _rel(_teacher_forced(engine, PROMPT + tokens), logits) > bound


class _ZeroRunner:
    def forward(self, x, ids, weights, *rest):
        rest[-1].fill(0.0)  # out


def test_heat_counts_every_decode_step_with_graphs(setup, reference):
    tokens, *_ = reference
    layers = sorted(setup.host.layers)
    heat = ExpertHeat(layers, setup.host.num_experts, "cuda")
    engine = setup.hybrid(0.3, use_graphs=True, heat=heat)
    _teacher_forced(engine, PROMPT + tokens)
    routes = (len(PROMPT) + STEPS - 1) * setup.config.num_experts_per_tok
    assert all(sum(counts) == routes for counts in heat.as_dict().values())


def test_rebalance_moves_hot_experts_and_keeps_decoding_right(setup, reference):
    tokens, logits, bound, _ = reference
    heat = ExpertHeat(sorted(setup.host.layers), setup.host.num_experts, "cuda")
    engine = setup.hybrid(0.3, use_graphs=True, heat=heat)
    _teacher_forced(engine, PROMPT + tokens)
    before = engine.expert_backend.generation
    report = engine.rebalance(min_gain=0.0)
    assert report["hit_rate_after"] >= report["hit_rate_before"]
    if report["replaced"]:
        assert engine.expert_backend.generation > before and report["ms"] > 0
    got = _teacher_forced(engine, PROMPT + tokens)
    assert _rel(got, logits) < bound


def test_step_buckets_grow_with_the_context(setup):
    engine = setup.hybrid(1.0, use_graphs=True)
    cache = engine.new_cache(600)
    engine.forward(PROMPT, cache)
    for _ in range(300):  # crosses the 256-token window
        engine.forward([3], cache)
    step = next(iter(engine._steps.values()))
    assert isinstance(step, DecodeStep) and set(step._pools) == {256, 512}


def test_pooled_cache_reuses_captured_graphs(setup):
    engine = setup.hybrid(0.3, use_graphs=True)
    first = engine.new_cache(64)
    engine.forward(PROMPT, first)
    engine.forward([3], first)
    step = next(iter(engine._steps.values()))
    del first
    second = engine.new_cache(32)
    assert second.length == 0
    engine.forward(PROMPT, second)
    engine.forward([4], second)
    assert list(engine._steps.values()) == [step]


@pytest.mark.parametrize("dense", ["quant", "bf16"])
@pytest.mark.parametrize("quant", ["int8", "int4"])
@pytest.mark.parametrize("fraction", FRACTIONS)
def test_bundled_tiny_model(tmp_path_factory, fraction, quant, dense):
    """Greedy tokens of load_hybrid against the CPU path: with ``dense="quant"`` the CPU-only
    engine (dense linears quantized from the same CPU cache), with "bf16" the CPU path's
    experts under float32 dense weights."""
    if not (BUNDLED_TINY / "config.json").is_file():
        pytest.skip("krasis-tiny is not bundled in this checkout")
    from krasisd.engine import EngineOptions, load
    from krasisd.engine.gpu.graphs import load_hybrid
    from krasisd.engine.native_experts import native_expert_backend, pick_group_size

    config = json.loads((BUNDLED_TINY / "config.json").read_text())
    try:
        pick_group_size(config["hidden_size"], config["moe_intermediate_size"],
                        8 if quant == "int8" else 4)
    except ValueError as exc:
        pytest.skip(f"the native {quant} kernels cannot hold krasis-tiny's widths: {exc}")
    tmp = tmp_path_factory.mktemp("tiny-caches")
    if dense == "quant":  # the CPU-only engine: its dense linears from the CPU cache too
        cpu = load(BUNDLED_TINY, quant=quant, device="cpu", cache_dir=tmp / "cpu")
    else:  # the CPU path's experts with float32 dense weights
        cpu = load(BUNDLED_TINY, quant="none", device="cpu", dtype="float32")
        native = native_expert_backend(BUNDLED_TINY, cpu.config, quant, cache_dir=tmp / "cpu")
        cpu.expert_backend = cpu.model.expert_backend = native
    prompt = cpu.tokenizer.encode("The quick brown fox")
    tokens = cpu.greedy(prompt, STEPS)
    options = EngineOptions(quant=quant, device="cuda", cache_dir=tmp / "cpu",
                            gpu_cache_dir=tmp / "gpu", gpu_dense=dense, autotune=False)
    engine = load_hybrid(BUNDLED_TINY, max_tokens=256, options=options)  # fixed tiles
    swapped = [m for m in engine.model.modules() if isinstance(m, GpuQuantLinear)]
    assert bool(swapped) == (dense == "quant")
    backend = engine.expert_backend
    backend.gpu = GpuExperts(backend.gpu.host, _plan(backend.gpu.host, fraction), "cuda")
    backend.refresh_residency()
    assert backend.num_experts == config["n_routed_experts"]
    got = engine.greedy(prompt, STEPS)
    same = next((i for i, (a, b) in enumerate(zip(got, tokens, strict=False)) if a != b),
                min(len(got), len(tokens)))
    assert same >= min(16, len(tokens)), (got, tokens)
