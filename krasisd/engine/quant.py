"""INT4/INT8 group-wise symmetric quantization in the CPU layout (pure torch pack/unpack).

Layout (docs/cpu-format.md, native/src/kernels.h): a weight W [..., N, K] becomes
  INT8: qweight int8 [..., N, K], q in [-127, 127], scale = max|w| / 127 per group;
  INT4: qweight uint8 [..., N, K/2], q in [-8, 7] stored as q + 8; in each 64-element unit,
        byte j holds element j (low nibble) and element j + 32 (high nibble);
        scale = w_max / -8, w_max the group's value of largest magnitude (it maps to -8 exactly);
  scales float32 [..., N, K/G]. Rounding is round-to-nearest (ties to even).

Group size: ``pick_group_size`` is the one rule for a model's routed experts, used by the CPU
and the GPU cache alike, so an expert resident on the GPU and its CPU twin share their groups.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

# Version of the CPU format as a whole: block layout and cache files (docs/cpu-format.md).
# 2: the cache holds the quantized dense linears beside the experts.
LAYOUT_VERSION = 2
INT4_UNIT = 64  # elements per INT4 unit (32 bytes)
BITS = {"int8": 8, "int4": 4}
DEFAULT_GROUP_SIZE = 128
# Largest first. The CPU kernels take multiples of 32, the GPU kernels powers of two >= 16:
# these are the sizes both accept.
GROUP_SIZES = (128, 64, 32)


def largest_group_size(sizes: Iterable[int], bits: int | None = None,
                       max_group: int = DEFAULT_GROUP_SIZE) -> int | None:
    """The largest of GROUP_SIZES (at most max_group) dividing every size, or None; INT4
    (bits=4) also needs every size to be a multiple of INT4_UNIT."""
    sizes = [int(size) for size in sizes]
    if any(size <= 0 for size in sizes):
        return None
    if bits == 4 and any(size % INT4_UNIT for size in sizes):
        return None
    return next((group for group in GROUP_SIZES
                 if group <= max_group and all(size % group == 0 for size in sizes)), None)


def pick_group_size(hidden: int, width: int, bits: int | None = None) -> int:
    """The group size of a model's routed experts in every format (CPU and GPU): the largest of
    128, 64, 32 dividing the hidden size and the expert width; bits=4 also checks INT4's
    64-wide units. Raises ValueError when no group size fits."""
    if bits not in (None, 4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    group = largest_group_size((hidden, width), bits)
    if group is None:
        int4 = "; INT4 also needs multiples of 64" if bits == 4 else ""
        raise ValueError(f"hidden size {hidden} and expert width {width} fit no group size of "
                         f"{', '.join(map(str, GROUP_SIZES))} (both must be multiples of one{int4})")
    return group


def check_format(bits: int, group_size: int, in_features: int) -> None:
    """Raise ValueError unless (bits, group_size) can pack rows of in_features elements."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if group_size <= 0 or group_size % 32 != 0:
        raise ValueError(f"group size must be a positive multiple of 32, got {group_size}")
    if in_features % group_size != 0:
        raise ValueError(f"input size {in_features} is not a multiple of group size {group_size}")
    if bits == 4 and in_features % INT4_UNIT != 0:
        raise ValueError(f"INT4 needs input size a multiple of {INT4_UNIT}, got {in_features}")


def quantize(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float weights [..., N, K] -> (qweight, scales float32 [..., N, K/G]), round-to-nearest."""
    check_format(bits, group_size, w.shape[-1])
    groups = w.float().reshape(*w.shape[:-1], -1, group_size)  # [..., N, K/G, G]
    if bits == 8:
        scales = groups.abs().amax(dim=-1) / 127.0  # [..., N, K/G]
        inv = torch.where(scales > 0, 1.0 / scales, torch.zeros_like(scales))
        q = torch.round(groups * inv[..., None]).clamp_(-127, 127).to(torch.int8)
        return q.reshape(w.shape), scales.contiguous()
    idx = groups.abs().argmax(dim=-1, keepdim=True)  # [..., N, K/G, 1]
    scales = torch.gather(groups, -1, idx).squeeze(-1) / -8.0  # [..., N, K/G]
    inv = torch.where(scales != 0, 1.0 / scales, torch.zeros_like(scales))
    q = torch.round(groups * inv[..., None]).clamp_(-8, 7).to(torch.int8)
    return pack_int4(q.reshape(w.shape)), scales.contiguous()


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """(qweight, scales) -> float32 weights [..., N, K]."""
    q = qweight if bits == 8 else unpack_int4(qweight)  # [..., N, K] int8
    groups = q.float().reshape(*q.shape[:-1], -1, group_size)  # [..., N, K/G, G]
    return (groups * scales[..., None]).reshape(q.shape)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], [..., K] (K % 64 == 0) -> uint8 [..., K/2] in 64-element units."""
    units = (q.to(torch.int16) + 8).reshape(*q.shape[:-1], -1, 2, INT4_UNIT // 2)  # [..., U, 2, 32]
    packed = units[..., 0, :] | (units[..., 1, :] << 4)  # [..., U, 32]
    return packed.to(torch.uint8).reshape(*q.shape[:-1], q.shape[-1] // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] -> int8 values in [-8, 7], [..., K]."""
    units = packed.to(torch.int16).reshape(*packed.shape[:-1], -1, 1, INT4_UNIT // 2)  # [..., U, 1, 32]
    both = torch.cat([units & 0xF, units >> 4], dim=-2) - 8  # [..., U, 2, 32]
    return both.to(torch.int8).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def quantization_error(w: torch.Tensor, bits: int, group_size: int) -> dict[str, float]:
    """Relative RMS and max-abs error of round-to-nearest on w (for tests and benches)."""
    wq = dequantize(*quantize(w, bits, group_size), bits, group_size)
    diff = wq - w.float()
    return {
        "rel_rms": float(diff.pow(2).mean().sqrt() / w.float().pow(2).mean().sqrt().clamp_min(1e-30)),
        "max_abs": float(diff.abs().max()),
    }
