"""The GPU format of routed experts: INT4 / INT8 symmetric, group-wise scales, k-major.

One expert is one byte blob (so a contiguous run of experts is one host-to-device copy)
holding four parts, each aligned to ``PART_ALIGN_BYTES``:

    w13_q  gate and up, quantized   INT4: int32 [D/8, 2I]  (8 nibbles along K per word)
                                    INT8: int8  [D, 2I]
    w13_s  their scales             bf16 [D/G, 2I]
    w2_q   down, quantized          INT4: int32 [I/8, D]   INT8: int8 [I, D]
    w2_s   its scales               bf16 [I/G, D]

K-major means the reduction dimension K comes first, so a kernel tile of [BLOCK_K, BLOCK_N]
reads BLOCK_N consecutive words per K row (coalesced), and the bf16 dequantization of a
whole matrix is exactly the ``[K, N]`` operand ``torch._grouped_mm`` takes.
INT4 word ``[k8, n]`` holds k = 8*k8 + j in bits 4j..4j+3 as ``q + 8`` (q in [-7, 7]).
Scales are ``absmax / qmax`` rounded to bf16 and q is rounded against that bf16 scale, so
``q * scale`` reproduces the dequantized weight exactly in float32.

Legend: E = experts, D = hidden, I = expert intermediate, G = group size, N/K = out/in dims.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LAYOUT_VERSION = 1
FORMAT_NAME = "krasis-gpu-experts"
PART_ALIGN_BYTES = 256
QMAX = {4: 7, 8: 127}
PART_NAMES = ("w13_q", "w13_s", "w2_q", "w2_s")


@dataclass(frozen=True)
class QuantSpec:
    """Bits and group size of a quantized expert format."""

    bits: int
    group_size: int

    def __post_init__(self):
        if self.bits not in QMAX:
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")
        if self.group_size < 16 or self.group_size & (self.group_size - 1):
            raise ValueError(f"group_size must be a power of two >= 16, got {self.group_size}")

    @classmethod
    def from_quant(cls, quant: str, group_size: int = 128) -> QuantSpec:
        """QuantSpec from a quant name ("int4" or "int8")."""
        bits = {"int4": 4, "int8": 8}.get(quant)
        if bits is None:
            raise ValueError(f"GPU expert format supports quant 'int4' or 'int8', got {quant!r}")
        return cls(bits, group_size)

    @property
    def quant(self) -> str:
        return f"int{self.bits}"

    def check_dim(self, k: int, name: str) -> None:
        if k % self.group_size:
            raise ValueError(f"{name}={k} is not a multiple of group_size={self.group_size}")


def quantize_kmajor(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize weights ``[..., N, K]`` (torch Linear layout) to k-major ``(q, scales)``."""
    *lead, n, k = w.shape
    spec.check_dim(k, "K")
    qmax = QMAX[spec.bits]
    wt = w.float().transpose(-1, -2).reshape(*lead, k // spec.group_size, spec.group_size, n)
    absmax = wt.abs().amax(dim=-2)  # [..., K/G, N]
    scales = (absmax / qmax).to(torch.bfloat16)  # [..., K/G, N]
    safe = scales.float().clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(wt / safe.unsqueeze(-2)).clamp_(-qmax, qmax)  # [..., K/G, G, N]
    q = q.reshape(*lead, k, n).to(torch.int32)  # [..., K, N]
    if spec.bits == 8:
        return q.to(torch.int8), scales
    return pack_int4(q), scales


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack signed nibbles ``[..., K, N]`` (values -8..7) into int32 ``[..., K/8, N]``."""
    *lead, k, n = q.shape
    if k % 8:
        raise ValueError(f"K={k} is not a multiple of 8")
    u = (q.to(torch.int64) + 8).reshape(*lead, k // 8, 8, n)  # [..., K/8, 8, N]
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=q.device).view(8, 1)
    word = (u << shifts).sum(dim=-2)  # [..., K/8, N] in [0, 2^32)
    word = torch.where(word >= 2**31, word - 2**32, word)
    return word.to(torch.int32)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Unpack int32 ``[..., K/8, N]`` into signed int8 nibbles ``[..., K, N]``."""
    *lead, k8, n = packed.shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device).view(8, 1)
    u = (packed.unsqueeze(-2) >> shifts) & 0xF  # [..., K/8, 8, N]
    return (u - 8).to(torch.int8).reshape(*lead, k8 * 8, n)


def dequantize_kmajor(
    q: torch.Tensor, scales: torch.Tensor, spec: QuantSpec, dtype=torch.float32
) -> torch.Tensor:
    """Dequantize k-major ``(q, scales)`` into ``[..., K, N]`` of ``dtype``."""
    ints = unpack_int4(q) if spec.bits == 4 else q
    *lead, k, n = ints.shape
    grouped = ints.float().reshape(*lead, k // spec.group_size, spec.group_size, n)
    w = grouped * scales.float().unsqueeze(-2)  # [..., K/G, G, N]
    return w.reshape(*lead, k, n).to(dtype)


def _align(n: int) -> int:
    return (n + PART_ALIGN_BYTES - 1) // PART_ALIGN_BYTES * PART_ALIGN_BYTES


@dataclass(frozen=True)
class ExpertLayout:
    """Byte layout of one expert blob for hidden size D and intermediate size I."""

    hidden: int  # D
    intermediate: int  # I
    spec: QuantSpec

    def __post_init__(self):
        self.spec.check_dim(self.hidden, "hidden_size")
        self.spec.check_dim(self.intermediate, "moe_intermediate_size")

    def part_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        d, i, g = self.hidden, self.intermediate, self.spec.group_size
        if self.spec.bits == 4:
            w13_q, w2_q = ((d // 8, 2 * i), torch.int32), ((i // 8, d), torch.int32)
        else:
            w13_q, w2_q = ((d, 2 * i), torch.int8), ((i, d), torch.int8)
        return {
            "w13_q": w13_q,
            "w13_s": ((d // g, 2 * i), torch.bfloat16),
            "w2_q": w2_q,
            "w2_s": ((i // g, d), torch.bfloat16),
        }

    def part_offsets(self) -> dict[str, tuple[int, int]]:
        """Byte (offset, size) of each part inside the blob."""
        out, offset = {}, 0
        for name, (shape, dtype) in self.part_shapes().items():
            size = dtype.itemsize
            for s in shape:
                size *= s
            out[name] = (offset, size)
            offset = _align(offset + size)
        return out

    @property
    def expert_bytes(self) -> int:
        offset, size = self.part_offsets()["w2_s"]
        return _align(offset + size)

    def views(self, blobs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed strided views ``[S, *part]`` into uint8 blobs ``[S, expert_bytes]``."""
        if blobs.dtype != torch.uint8 or blobs.dim() != 2 or blobs.shape[1] != self.expert_bytes:
            raise ValueError(f"expected uint8 [S, {self.expert_bytes}], got {blobs.dtype} {tuple(blobs.shape)}")
        shapes, out = self.part_shapes(), {}
        for name, (offset, size) in self.part_offsets().items():
            shape, dtype = shapes[name]
            part = blobs[:, offset : offset + size].view(dtype)  # [S, numel]
            out[name] = part.view(blobs.shape[0], *shape)
        return out

    def pack_experts(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        """Quantize stacked float experts (gate/up ``[E, I, D]``, down ``[E, D, I]``) to blobs."""
        e = gate.shape[0]
        if gate.shape != (e, self.intermediate, self.hidden) or up.shape != gate.shape:
            raise ValueError(f"gate/up must be [E, {self.intermediate}, {self.hidden}], got {tuple(gate.shape)}")
        if down.shape != (e, self.hidden, self.intermediate):
            raise ValueError(f"down must be [E, {self.hidden}, {self.intermediate}], got {tuple(down.shape)}")
        blobs = torch.zeros(e, self.expert_bytes, dtype=torch.uint8, device=gate.device)
        views = self.views(blobs)
        w13_q, w13_s = quantize_kmajor(torch.cat([gate, up], dim=1), self.spec)  # [E, D/8, 2I]
        w2_q, w2_s = quantize_kmajor(down, self.spec)  # [E, I/8, D]
        for name, value in (("w13_q", w13_q), ("w13_s", w13_s), ("w2_q", w2_q), ("w2_s", w2_s)):
            views[name].copy_(value)
        return blobs

    def unpack_experts(self, blobs: torch.Tensor, dtype=torch.float32):
        """Dequantize blobs back to stacked ``(gate [E, I, D], up [E, I, D], down [E, D, I])``."""
        v = self.views(blobs)
        w13 = dequantize_kmajor(v["w13_q"], v["w13_s"], self.spec, dtype)  # [E, D, 2I]
        w2 = dequantize_kmajor(v["w2_q"], v["w2_s"], self.spec, dtype)  # [E, I, D]
        i = self.intermediate
        gate = w13[..., :i].transpose(1, 2).contiguous()
        up = w13[..., i:].transpose(1, 2).contiguous()
        return gate, up, w2.transpose(1, 2).contiguous()
