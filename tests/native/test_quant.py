"""quant.py: INT4 packing, round-to-nearest error bounds, bad formats."""

import pytest
import torch

from krasisd.engine.quant import (
    check_format,
    dequantize,
    pack_int4,
    quantization_error,
    quantize,
    unpack_int4,
)


def test_int4_pack_roundtrip_and_unit_layout():
    q = torch.randint(-8, 8, (3, 128), dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.shape == (3, 64) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), q)
    # byte j of a 64-element unit: element j in the low nibble, element j + 32 in the high one
    assert int(packed[0, 5]) == (int(q[0, 5]) + 8) | ((int(q[0, 37]) + 8) << 4)
    assert int(packed[0, 32 + 1]) == (int(q[0, 65]) + 8) | ((int(q[0, 97]) + 8) << 4)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_round_to_nearest_error_is_at_most_half_a_step(bits, group_size):
    w = torch.randn(2, 16, 256) * 0.05
    qweight, scales = quantize(w, bits, group_size)
    assert scales.shape == (2, 16, 256 // group_size)
    err = (dequantize(qweight, scales, bits, group_size) - w).abs()  # [2, 16, 256]
    step = scales.abs().repeat_interleave(group_size, dim=-1)
    bound = step / 2
    if bits == 4:  # scale = w_max / -8: a value near -w_max clips to +7, off by up to one step
        bound = torch.where(unpack_int4(qweight) == 7, step, bound)
    assert bool((err <= bound + 1e-7).all())


def test_measured_error_int8_far_below_int4():
    w = torch.randn(64, 512)
    e8, e4 = quantization_error(w, 8, 128), quantization_error(w, 4, 128)
    assert e8["rel_rms"] < 0.01 < e4["rel_rms"] < 0.15


def test_zero_group_quantizes_to_zero():
    w = torch.zeros(4, 64)
    for bits in (4, 8):
        assert torch.equal(dequantize(*quantize(w, bits, 32), bits, 32), w)


@pytest.mark.parametrize("bits,group_size,width", [(8, 48, 96), (8, 32, 100), (4, 32, 96), (3, 32, 64)])
def test_bad_formats_raise_value_error(bits, group_size, width):
    with pytest.raises(ValueError):
        check_format(bits, group_size, width)
