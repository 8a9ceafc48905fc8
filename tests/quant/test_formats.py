import pytest
import torch

from llmcompress.kernels.reference import pack_int4, unpack_int4
from llmcompress.quant.formats import (QuantSpec, broadcast_param, compute_qparams, dequantize, fake_quantize,
                                       quantize, to_uint4)
from llmcompress.quant.observers import MinMaxObserver, weight_qparams

INT_TYPES = ["int8", "uint8", "int4", "uint4"]


@pytest.mark.parametrize("dtype", INT_TYPES)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_error_within_half_step_for_in_range_values(dtype, symmetric, granularity):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 100, generator=g) * 3 + (0 if symmetric else 1.5)  # K=100: ragged group of 100 % 32 = 4
    spec = QuantSpec(dtype, symmetric, granularity, group_size=32)
    scale, zero = weight_qparams(w, spec, MinMaxObserver(spec))
    q = quantize(w, scale, zero, spec)
    assert q.dtype == spec.code_dtype
    assert int(q.min()) >= spec.qmin and int(q.max()) <= spec.qmax
    err = (dequantize(q, scale, zero, spec) - w).abs()
    from llmcompress.quant.formats import broadcast_param
    half_step = broadcast_param(scale, w, spec) / 2
    assert torch.all(err <= half_step + 1e-6 * w.abs())  # s/2, up to float32 rounding of x/s and s·q
    if granularity == "group":
        assert scale.shape == (12, 4)


def test_clipping_saturates_to_the_range_edge():
    spec = QuantSpec("int8", True, "tensor")
    scale, _ = compute_qparams(torch.tensor(-1.0), torch.tensor(1.0), spec)
    assert scale.item() == pytest.approx(1 / 127.5)
    x = torch.tensor([-5.0, -0.5, 0.0, 1.0, 5.0])
    q = quantize(x, scale, None, spec)
    assert q.tolist() == [-128, -64, 0, 127, 127]  # ±5 clip; +1 = 127.5 steps clamps to 127
    spec_a = QuantSpec("uint4", False, "tensor")
    s, z = compute_qparams(torch.tensor(0.5), torch.tensor(3.0), spec_a)  # lo widened to 0 so 0 is exact
    assert s.item() == pytest.approx(3 / 15) and z.item() == 0
    assert quantize(torch.tensor([-1.0, 0.0, 10.0]), s, z, spec_a).tolist() == [0, 0, 15]
    assert dequantize(quantize(torch.tensor([0.0]), s, z, spec_a), s, z, spec_a).item() == 0.0


def test_asymmetric_zero_point_makes_zero_exact():
    spec = QuantSpec("int8", False, "channel")
    w = torch.tensor([[-0.3, 0.1, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    s, z = weight_qparams(w, spec, MinMaxObserver(spec))
    assert s[1].item() == 1.0  # all-zero row: scale 1, codes exact zero
    dq = fake_quantize(w, s, z, spec)
    assert dq[0, 3].item() == 0.0 and torch.all(dq[1] == 0)


def test_fp8_saturating_cast_and_relative_error():
    spec = QuantSpec("fp8_e4m3", True, "tensor")
    s = torch.tensor(1.0)
    x = torch.tensor([1000.0, -1e6, 448.0, 3.0, 0.1])
    q = quantize(x, s, None, spec)
    assert q.dtype == torch.float8_e4m3fn
    assert q.float().tolist()[:3] == [448.0, -448.0, 448.0]
    assert torch.isfinite(q.float()).all()
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
    scale, _ = weight_qparams(w, QuantSpec("fp8_e4m3", True, "channel"), MinMaxObserver(spec))
    dq = fake_quantize(w, scale, None, QuantSpec("fp8_e4m3", True, "channel"))
    normal = w.abs() > scale[:, None] * 2 ** -6  # above fp8's smallest normal: 3 mantissa bits
    assert torch.all((dq - w).abs()[normal] <= w.abs()[normal] * 2 ** -4 * (1 + 1e-6))


@pytest.mark.parametrize("k", [1, 2, 7, 64, 576, 1535])
def test_int4_pack_unpack_round_trip_is_bit_exact(k):
    codes = torch.randint(0, 16, (5, k), generator=torch.Generator().manual_seed(k), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, (k + 1) // 2)
    assert torch.equal(unpack_int4(packed, k), codes)
    # documented layout: element k in byte k // 2, low nibble even k, high nibble odd k
    if k >= 2:
        assert packed[0, 0].item() == codes[0, 0].item() | (codes[0, 1].item() << 4)


def test_signed_int4_stored_as_unsigned_plus_eight():
    spec = QuantSpec("int4", True, "group", group_size=64)
    q = torch.tensor([[-8, -1, 0, 7]], dtype=torch.int8)
    assert to_uint4(q, spec).tolist() == [[0, 7, 8, 15]]


def test_scale_dtype_rounds_before_quantizing():
    spec = QuantSpec("int4", True, "group", group_size=32, scale_dtype="float16")
    w = torch.randn(4, 96, generator=torch.Generator().manual_seed(3))
    s, _ = weight_qparams(w, spec, MinMaxObserver(spec))
    assert torch.equal(s, s.half().float())


def test_impossible_specs_are_refused_up_front():
    with pytest.raises(ValueError, match="symmetric only"):
        QuantSpec("fp8_e4m3", False, "tensor")
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec("int4", True, "group", group_size=1)
    with pytest.raises(ValueError, match="dtype"):
        QuantSpec("int3", True, "tensor")
