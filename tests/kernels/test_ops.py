"""The llmc int8/int4 ops against their float64 reference on fresh random data (never zeros), ragged shapes
included, plus torch.library.opcheck on every compiled op. CUDA cases skip, visibly, without a GPU."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch

from llmcompress.kernels import ops
from llmcompress.kernels import reference as ref

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA device"))]
# M = 1, 3, 17, 129 against K, N that are not multiples of 64 (200, 576, 1536, 49) and some that are
# (12, 1024, 264) and (40, 1024, 264): the CUDA two-token-tile decode kernels and the W4A16 tiled kernel,
# with part-empty token and feature blocks.
SHAPES = [(1, 576, 49), (3, 200, 576), (17, 1536, 200), (129, 576, 1536), (4, 4096, 128), (129, 200, 49),
          (12, 1024, 264), (40, 1024, 264)]


@pytest.fixture(autouse=True)
def _poison_outputs():
    """Every tensor the ops allocate with empty() starts as NaN, so an unwritten element fails the test."""
    old = torch.utils.deterministic.fill_uninitialized_memory
    det, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.utils.deterministic.fill_uninitialized_memory = old
    torch.use_deterministic_algorithms(det, warn_only=warn)


@pytest.fixture
def force():
    """force(KNOB=value, ...): a CUDA dispatch choice forced until the test ends (ops.force_cuda_variant)."""
    with contextlib.ExitStack() as stack:
        yield lambda **knobs: stack.enter_context(ops.force_cuda_variant(**knobs))


def rel_err(y: torch.Tensor, y_ref: torch.Tensor) -> float:
    assert torch.isfinite(y).all(), "non-finite (unwritten?) output"
    return ((y.double() - y_ref.double()).norm() / y_ref.double().norm()).item()


# Output rounding dominates: bf16 keeps 8 bits, fp16 11, fp32 24 (plus accumulation order).
TOL = {torch.float32: 2e-5, torch.bfloat16: 6e-3, torch.float16: 1e-3}


def compiled(device: str) -> bool:
    return ops.backend(device) != "reference"


def test_backend_reports_compiled_cpu_path():
    assert ops.backend("cpu").startswith("cpu-"), "the CPU extension did not build or load"


# ------------------------------------------------------------------ per-token quantizer


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k", [(1, 576), (3, 200), (17, 1536), (129, 33)])
def test_quantize_per_token_bit_exact(device, dtype, m, k):
    x = (torch.randn(m, k, device=device) * torch.rand(m, 1, device=device) * 10).to(dtype)
    x[m // 2] = 0  # an all-zero row gets scale 1 and q = 0
    q, s = ops.quantize_per_token(x)
    q_ref, s_ref = ref.quantize_per_token(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and q.shape == (m, k) and s.shape == (m,)
    assert torch.equal(s, s_ref)
    assert torch.equal(q, q_ref), f"{(q != q_ref).sum().item()} codes differ"
    assert s[m // 2].item() == 1.0 and (q[m // 2] == 0).all()


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scalar", [0, 1])
def test_cuda_quantizers_every_row_plan(dtype, scalar, force):
    """The CUDA quantizers' row plans (QUANT_SCALAR=1 forces the scalar kernel): 1 to 8 16-byte vectors a
    thread (K = 8 ... 14336, 20000), rows too long for them (K = 70000), K not a multiple of a vector (1000 for
    float32's 4 elements, not for 8; 1001 for neither) and a misaligned x (a view one element in, K - 1 wide)."""
    force(QUANT_SCALAR=scalar)
    for m, k in [(5, 8), (3, 1000), (3, 1001), (7, 2048), (2, 8192), (3, 14336), (2, 20000), (2, 70000)]:
        x = (torch.randn(m, k, device="cuda") * torch.rand(m, 1, device="cuda") * 10).to(dtype)
        x[m // 2] = 0
        for xx in (x, x.reshape(-1)[1:1 + m * (k - 1)].view(m, k - 1)):  # a view one element in: misaligned
            q, s = ops.quantize_per_token(xx)
            q_ref, s_ref = ref.quantize_per_token(xx)
            assert torch.equal(s, s_ref) and torch.equal(q, q_ref), (k, tuple(xx.shape))
            if compiled("cuda"):
                q8, s8 = torch.ops.llmc.quantize_fp8(xx, None)
                q8_ref, s8_ref = _fp8_torch(xx)
                assert torch.equal(s8, s8_ref) and torch.equal(q8.view(torch.uint8), q8_ref.view(torch.uint8)), k


@pytest.mark.parametrize("device", DEVICES)
def test_quantize_static_scale_and_leading_dims(device):
    x = torch.randn(2, 5, 200, device=device) * 4
    scale = torch.tensor(0.02, device=device)
    q, s = ops.quantize_per_token(x, scale)
    q_ref, _ = ref.quantize_per_token(x, scale)
    assert q.shape == (10, 200) and torch.equal(q, q_ref) and (s == 0.02).all()
    assert q.abs().max().item() == 127  # values past the static range clamp


def _fp8_torch(x, scale=None):
    """llmc::quantize_fp8's definition in plain torch float32 ops, on x's device."""
    xf = x.float()
    if scale is None:
        amax = xf.abs().amax(dim=1)
        s = amax / torch.full_like(amax, 448.0)
        s = torch.where(s > 0, s, torch.ones_like(s))
    else:
        s = scale.float().reshape(1).expand(x.shape[0])
    return torch.clamp(xf / s[:, None], -448.0, 448.0).to(torch.float8_e4m3fn), s


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k", [(1, 4096), (3, 200), (17, 1536), (129, 33)])
def test_quantize_fp8_bit_exact(device, dtype, m, k):
    if not compiled(device):
        pytest.skip(f"no compiled kernels for {device}")
    x = (torch.randn(m, k, device=device) * torch.rand(m, 1, device=device) * 10).to(dtype)
    x[m // 2] = 0  # an all-zero row gets scale 1 and q = 0
    for scale in (None, torch.tensor(0.01, device=device)):  # static: values past 448 * 0.01 saturate
        q, s = torch.ops.llmc.quantize_fp8(x, scale)
        q_ref, s_ref = _fp8_torch(x, scale)
        assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and q.shape == (m, k) and s.shape == (m,)
        assert torch.equal(s, s_ref)
        differ = (q.view(torch.uint8) != q_ref.view(torch.uint8)).sum().item()
        assert differ == 0, f"{differ} codes differ"
        assert torch.isfinite(q.float()).all() and (q[m // 2].float() == 0).all()
        assert s[m // 2].item() == (1.0 if scale is None else scale.item())


# ------------------------------------------------------------------ W8A8


def random_w8(n: int, k: int, device: str):
    w_q = torch.randint(-128, 128, (n, k), dtype=torch.int8, device=device)  # -128 too: kernels must be exact
    w_scale = torch.rand(n, device=device) * 0.01 + 1e-3
    return w_q, w_scale


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_w8a8_mm(device, m, k, n, out_dtype):
    x_q = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=device)
    x_scale = torch.rand(m, device=device) * 0.1 + 1e-3
    w_q, w_scale = random_w8(n, k, device)
    bias = torch.randn(n, device=device) if m % 2 else None
    y = ops.w8a8_mm(x_q, x_scale, w_q, w_scale, bias, out_dtype)
    y_ref = ref.w8a8_mm(x_q.cpu(), x_scale.cpu(), w_q.cpu(), w_scale.cpu(), None if bias is None else bias.cpu(),
                        torch.float64, compute_dtype=torch.float64)
    assert y.dtype == out_dtype and y.shape == (m, n) and y.device.type == device
    assert rel_err(y.cpu(), y_ref) < TOL[out_dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("static", [False, True])
def test_w8a8_linear(device, dtype, static):
    x = (torch.randn(3, 7, 576, device=device) * 2).to(dtype)
    w_q, w_scale = random_w8(200, 576, device)
    bias = torch.randn(200, device=device)
    x_scale = torch.tensor(0.05, device=device) if static else None
    y = ops.w8a8_linear(x, w_q, w_scale, bias, x_scale)
    y_ref = ref.w8a8_linear(x.cpu(), w_q.cpu(), w_scale.cpu(), bias.cpu(), None if x_scale is None else x_scale.cpu(),
                            compute_dtype=torch.float64)
    assert y.dtype == dtype and y.shape == (3, 7, 200)
    assert rel_err(y.cpu(), y_ref) < TOL[dtype]


# ------------------------------------------------------------------ W4A16


def random_w4(n: int, k: int, group_size: int, asym: bool, device: str, scale_dtype=torch.float32):
    g = -(-k // group_size)
    qweight = torch.randint(0, 256, (n, (k + 1) // 2), dtype=torch.uint8, device=device)
    scales = (torch.rand(n, g, device=device) * 0.02 + 1e-3).to(scale_dtype)
    zeros = torch.randint(0, 16, (n, g), dtype=torch.uint8, device=device) if asym else None
    return qweight, scales, zeros


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("asym", [False, True])
def test_w4a16_linear(device, m, k, n, group_size, asym):
    dtype = [torch.bfloat16, torch.float16, torch.float32][(m + group_size // 32) % 3]
    qweight, scales, zeros = random_w4(n, k, group_size, asym, device, scale_dtype=dtype)
    x = torch.randn(m, k, device=device).to(dtype)
    bias = torch.randn(n, device=device).to(dtype) if asym else None
    packed = ops.pack_w4a16(qweight, scales, zeros, group_size)
    y = ops.w4a16_linear(x, packed, bias)
    y_ref = ref.w4a16_linear(x.cpu(), qweight.cpu(), scales.cpu(), None if zeros is None else zeros.cpu(), group_size,
                             None if bias is None else bias.cpu(), compute_dtype=torch.float64)
    assert y.dtype == dtype and y.shape == (m, n)
    # CUDA runs fp32 activations through the bf16 tensor cores (documented in w4a16.cu): bf16 tolerance there.
    tol = TOL[torch.bfloat16 if device == "cuda" and dtype == torch.float32 else dtype]
    assert rel_err(y.cpu(), y_ref) < tol + (3e-3 if device == "cuda" and dtype != torch.float16 else 0)


@pytest.mark.parametrize("k", [575, 1])
def test_w4a16_odd_k_cpu(k):
    """Odd K: the last byte's high nibble is padding; CPU kernels and the reference both accept it."""
    qweight, scales, zeros = random_w4(33, k, 32, True, "cpu")
    x = torch.randn(5, k)
    y = ops.w4a16_linear(x, ops.pack_w4a16(qweight, scales, zeros, 32))
    y_ref = ref.w4a16_linear(x, qweight, scales, zeros, 32, compute_dtype=torch.float64)
    assert rel_err(y, y_ref) < TOL[torch.float32]


@pytest.mark.parametrize("group_size", [8, 16, 48, 96, 256, 6])
@pytest.mark.parametrize("m", [1, 2, 5, 12])
def test_w4a16_cpu_group_sizes(group_size, m):
    """The CPU decode path's other group layouts: groups narrower than its 64-column blocks (per-lane scales),
    wider ones, and sizes that split an 8-column word (the portable fallback); K odd and not a multiple of 64."""
    k = 777 if group_size != 256 else 1100
    qweight, scales, zeros = random_w4(37, k, group_size, m % 2 == 1, "cpu")
    x = torch.randn(m, k)
    bias = torch.randn(37)
    y = ops.w4a16_linear(x, ops.pack_w4a16(qweight, scales, zeros, group_size), bias)
    y_ref = ref.w4a16_linear(x, qweight, scales, zeros, group_size, bias, compute_dtype=torch.float64)
    assert rel_err(y, y_ref) < TOL[torch.float32]


def test_int4_pack_roundtrip():
    codes = torch.randint(0, 16, (7, 13), dtype=torch.uint8)
    assert torch.equal(ref.unpack_int4(ref.pack_int4(codes), 13), codes)
    byte = ref.pack_int4(torch.tensor([[3, 12]], dtype=torch.uint8))
    assert byte.item() == 3 | (12 << 4)  # even k in the low nibble


def test_w4a16_rejects_impossible_shapes():
    qweight, scales, zeros = random_w4(16, 256, 128, True, "cpu")
    with pytest.raises(ValueError, match="group_size"):
        ops.pack_w4a16(qweight, scales, zeros, 3)
    with pytest.raises(ValueError, match="groups"):
        ops.pack_w4a16(qweight, scales[:, :1], zeros[:, :1], 64)
    with pytest.raises(ValueError, match="zeros"):
        ops.pack_w4a16(qweight, scales, zeros.int(), 128)
    packed = ops.pack_w4a16(qweight, scales, zeros, 128)
    with pytest.raises(ValueError, match="features"):
        ops.w4a16_linear(torch.randn(2, 200), packed)


def test_w8a8_rejects_mismatched_k():
    w_q, w_scale = random_w8(8, 64, "cpu")
    with pytest.raises(ValueError, match="K differs"):
        ops.w8a8_mm(torch.ones(2, 32, dtype=torch.int8), torch.ones(2), w_q, w_scale, None, torch.float32)
    with pytest.raises(ValueError, match="int8"):
        ops.w8a8_mm(torch.ones(2, 64), torch.ones(2), w_q, w_scale, None, torch.float32)


# ------------------------------------------------------------------ opcheck and torch.compile


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    if not compiled(device):
        pytest.skip(f"no compiled kernels for {device}")
    x = torch.randn(5, 576, device=device, dtype=torch.bfloat16)
    q, s = ops.quantize_per_token(x)
    w_q, w_scale = random_w8(49, 576, device)
    qweight, scales, zeros = random_w4(64, 576, 128, True, device, scale_dtype=torch.bfloat16)
    packed = ops.pack_w4a16(qweight, scales, zeros, 128)
    bias = torch.randn(49, device=device)
    torch.library.opcheck(torch.ops.llmc.quantize_int8.default, (x, None))
    torch.library.opcheck(torch.ops.llmc.quantize_int8.default, (x, torch.tensor(0.1, device=device)))
    torch.library.opcheck(torch.ops.llmc.quantize_fp8.default, (x, None))
    torch.library.opcheck(torch.ops.llmc.quantize_fp8.default, (x, torch.tensor(0.1, device=device)))
    torch.library.opcheck(torch.ops.llmc.w8a8_mm.default, (q, s, w_q, w_scale, bias, torch.bfloat16))
    torch.library.opcheck(torch.ops.llmc.w8a8_mm.default, (q, s, w_q, w_scale, None, torch.float32))
    torch.library.opcheck(torch.ops.llmc.w4a16_mm.default,
                          (x, packed.qweight, packed.scales, packed.zeros, 128, None))


def test_torch_compile_traces_ops():
    if not compiled("cpu"):
        pytest.skip("compiled CPU kernels unavailable")
    qweight, scales, zeros = random_w4(64, 256, 64, False, "cpu")
    packed = ops.pack_w4a16(qweight, scales, zeros, 64)
    w_q, w_scale = random_w8(32, 64, "cpu")

    def f(x):
        return ops.w8a8_linear(ops.w4a16_linear(x, packed), w_q, w_scale)

    x = torch.randn(3, 256)
    torch._dynamo.reset()
    y = torch.compile(f, backend="aot_eager", fullgraph=True)(x)
    assert torch.equal(y, f(x))


# ------------------------------------------------------------------ every CPU instruction set


def test_generic_isa_matches_reference():
    """The portable path (LLMC_CPU_ISA=generic) in a fresh process: same results on ragged shapes."""
    if not compiled("cpu"):
        pytest.skip("compiled CPU kernels unavailable")
    code = """
import torch
from llmcompress.kernels import ops, reference as ref
assert ops.backend("cpu") == "cpu-generic", ops.backend("cpu")
torch.manual_seed(1)
x = torch.randn(5, 200)
q, s = ops.quantize_per_token(x); assert torch.equal(q, ref.quantize_per_token(x)[0])
w = torch.randint(-128, 128, (49, 200), dtype=torch.int8); ws = torch.rand(49)
y = ops.w8a8_mm(q, s, w, ws, None, torch.float32); r = ref.w8a8_mm(q, s, w, ws, None, torch.float64, torch.float64)
assert ((y.double() - r).norm() / r.norm()) < 1e-5
qw = torch.randint(0, 256, (49, 100), dtype=torch.uint8); sc = torch.rand(49, 4); z = torch.randint(0, 16, (49, 4), dtype=torch.uint8)
y = ops.w4a16_linear(x, ops.pack_w4a16(qw, sc, z, 64)); r = ref.w4a16_linear(x, qw, sc, z, 64, compute_dtype=torch.float64)
assert ((y.double() - r).norm() / r.norm()) < 1e-5
print("ok")
"""
    env = dict(os.environ, LLMC_CPU_ISA="generic")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_cuda_mma_layout_decodes_like_the_kernel():
    """The CUDA pack, read back with the kernel's fragment formula (w4a16_dequant), is the checkpoint weight."""
    n, k = 49, 200
    qweight, scales, zeros = random_w4(n, k, 32, True, "cpu")
    packed = ops._pack_cuda(ops.pack_w4a16(qweight, scales, zeros, 32))
    words = packed.qweight.reshape(-1).to(torch.int64) & 0xFFFFFFFF
    i = torch.arange(words.numel())
    s, lane, chunks = i % 4, (i // 4) % 32, -(-k // 64)
    c, tile = (i // 128) % chunks, i // 128 // chunks
    g, t = lane // 4, lane % 4
    got = torch.full((tile.max().item() * 16 + 16, chunks * 64), -1, dtype=torch.int64)
    for j in range(8):
        r, h = j % 4, j // 4
        got[tile * 16 + g + 8 * (r % 2), (c * 4 + s) * 16 + 2 * t + 8 * (r // 2) + h] = (words >> (4 * j)) & 0xF
    assert torch.equal(got[:n, :k], ref.unpack_int4(qweight, k).to(torch.int64))


def cuda_w8a8_error(m: int, k: int, n: int, out_dtype: torch.dtype) -> float:
    """rel_err of llmc::w8a8_mm on CUDA (random int8 operands, scales and a bias) against the float64 reference."""
    x_q = torch.randint(-127, 128, (m, k), dtype=torch.int8, device="cuda")
    x_scale = torch.rand(m, device="cuda") * 0.1 + 1e-3
    w_q, w_scale = random_w8(n, k, "cuda")
    bias = torch.randn(n, device="cuda")
    y = ops.w8a8_mm(x_q, x_scale, w_q, w_scale, bias, out_dtype)
    y_ref = ref.w8a8_mm(x_q.cpu(), x_scale.cpu(), w_q.cpu(), w_scale.cpu(), bias.cpu(), torch.float64,
                        compute_dtype=torch.float64)
    return rel_err(y.cpu(), y_ref)


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize("m", [300, 1030])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pieces", [False, True])
def test_cuda_prefill_sizes(m, out_dtype, pieces, force):
    """M > 256: the large-tile W8A8 GEMM (cooperative 128 x 224 or 256 tiles) and W4A16's dequantize-then-GEMM path,
    whole or (pieces) dequantized 160 rows at a time, the last piece 40 rows."""
    if pieces:
        force(W4_DEQUANT_ELEMS=160 * 1024)
    k, n = 1024, 520
    assert cuda_w8a8_error(m, k, n, out_dtype) < TOL[out_dtype]
    if out_dtype == torch.float32:
        return
    qweight, scales, zeros = random_w4(n, k, 128, True, "cuda", scale_dtype=out_dtype)
    x = torch.randn(m, k, device="cuda").to(out_dtype)
    y = ops.w4a16_linear(x, ops.pack_w4a16(qweight, scales, zeros, 128))
    y_ref = ref.w4a16_linear(x.cpu(), qweight.cpu(), scales.cpu(), zeros.cpu(), 128, compute_dtype=torch.float64)
    assert rel_err(y.cpu(), y_ref) < TOL[out_dtype] + 3e-3


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize("variant", [0, 1, 2, 3, 4])
def test_cuda_w4a16_tiled_shapes(variant, force):
    """Every tile shape of the mid-M W4A16 kernel (W4_TILED, swept by the benchmark): part-empty token and
    feature blocks, with and without zero points, groups of 64 and 128."""
    force(W4_TILED=variant, W4_SM90_MAX_M=0)  # on Hopper these sizes would go to the wgmma kernel
    k, n = 1024, 264
    for m, group_size, asym in [(33, 64, True), (129, 128, False), (256, 64, False), (200, 128, True)]:
        qweight, scales, zeros = random_w4(n, k, group_size, asym, "cuda", scale_dtype=torch.bfloat16)
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        bias = torch.randn(n, device="cuda").to(torch.bfloat16)
        y = ops.w4a16_linear(x, ops.pack_w4a16(qweight, scales, zeros, group_size), bias)
        y_ref = ref.w4a16_linear(x.cpu(), qweight.cpu(), scales.cpu(), None if zeros is None else zeros.cpu(),
                                 group_size, bias.cpu(), compute_dtype=torch.float64)
        assert rel_err(y.cpu(), y_ref) < TOL[torch.bfloat16] + 3e-3, (m, group_size, asym)


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize("wide", [0, 1])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_w4a16_gemv_shapes(wide, dtype, force):
    """Every configuration of the decode gemv kernel run() picks (W4_GEMV_WIDE: 4 warps splitting K, or 8):
    one and two 8-token tiles; BANK (a bank's chunks at once, predicated loads) at M = 1-16 and chunk by chunk at
    M = 9-16 on more 16-feature tiles than 4 blocks per SM hold (N = 8464 on a 132-SM H100) and past M = 16 (two
    16-token tiles side by side); K of 3 chunks (fewer than the warps splitting it) and of 40 (a bank only partly
    inside a warp's run); ragged N (N = 100)."""
    force(W4_GEMV_WIDE=wide, W4_SM90_MAX_M=0)
    for m, k, n, group_size, asym in [(1, 192, 264, 64, False), (5, 2560, 264, 128, True), (8, 2560, 100, 64, False),
                                      (9, 192, 264, 64, True), (16, 2560, 264, 128, False), (12, 640, 8464, 64, True),
                                      (24, 2560, 264, 128, True)]:
        qweight, scales, zeros = random_w4(n, k, group_size, asym, "cuda", scale_dtype=dtype)
        x = torch.randn(m, k, device="cuda").to(dtype)
        y = ops.w4a16_linear(x, ops.pack_w4a16(qweight, scales, zeros, group_size))
        y_ref = ref.w4a16_linear(x.cpu(), qweight.cpu(), scales.cpu(), None if zeros is None else zeros.cpu(),
                                 group_size, compute_dtype=torch.float64)
        assert rel_err(y.cpu(), y_ref) < TOL[dtype] + 3e-3, (wide, m, k, group_size, asym)


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize("pdl", [0, 1])
def test_cuda_w4a16_decode_after_its_producer(pdl, force):
    """The decode kernel is a programmatic dependent launch on sm_90+ (W4_PDL): it may start before the kernel
    before it in the stream has finished, so it must read nothing that kernel writes until it has. Each step here
    writes the activations with a copy kernel right before the op, and the previous op's output is overwritten,
    eagerly and replayed in one CUDA graph; every result must equal its own float64 reference."""
    force(W4_PDL=pdl)
    n, k = 4096, 4096
    qweight, scales, _ = random_w4(n, k, 128, False, "cuda", scale_dtype=torch.bfloat16)
    packed = ops.pack_w4a16(qweight, scales, None, 128)
    w = ref.dequantize_int4(qweight.cpu(), scales.cpu(), None, 128, k, torch.float64)
    srcs = [torch.randn(1, k, device="cuda").to(torch.bfloat16) for _ in range(6)]
    x = torch.empty(1, k, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
    ys = [torch.empty(1, n, device="cuda", dtype=torch.bfloat16) for _ in srcs]

    def steps():
        for src, y in zip(srcs, ys):
            x.copy_(src)
            out.copy_(ops.w4a16_linear(x, packed))
            y.copy_(out)

    def check():
        for src, y in zip(srcs, ys):
            y_ref = src.cpu().double() @ w.t()
            assert rel_err(y.cpu(), y_ref) < TOL[torch.bfloat16] + 3e-3

    steps()
    torch.cuda.synchronize()
    check()
    for y in ys:
        y.zero_()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        steps()  # warm-up on the capture stream
        stream.synchronize()
        with torch.cuda.graph(graph, stream=stream):
            steps()
    torch.cuda.current_stream().wait_stream(stream)
    for y in ys:
        y.zero_()
    graph.replay()
    torch.cuda.synchronize()
    check()


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_w4a16_one_token(dtype):
    """M = 1 (the gemv kernel's banks): K of 3 chunks (fewer than the warps: most get none), of 40 and of 384
    (groups of 64: many per warp), up to 65536, ragged N, zero points or none, groups of 64, 128 and 256, bias."""
    for k, n, group_size, asym in [(192, 264, 64, False), (2560, 100, 128, True), (4096, 72, 256, True),
                                   (24576, 40, 64, False), (24576, 33, 128, True), (65536, 16, 64, True)]:
        qweight, scales, zeros = random_w4(n, k, group_size, asym, "cuda", scale_dtype=dtype)
        x = torch.randn(1, k, device="cuda").to(dtype)
        bias = torch.randn(n, device="cuda").to(dtype)
        y = ops.w4a16_linear(x, ops.pack_w4a16(qweight, scales, zeros, group_size), bias)
        y_ref = ref.w4a16_linear(x.cpu(), qweight.cpu(), scales.cpu(), None if zeros is None else zeros.cpu(),
                                 group_size, bias.cpu(), compute_dtype=torch.float64)
        assert rel_err(y.cpu(), y_ref) < TOL[dtype] + 3e-3, (k, n, group_size, asym)


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize("pipe,pair", [(0, 0), (1, 0), (1, 1)])
def test_cuda_w8a8_decode_loops(pipe, pair, force):
    """The W8A8 decode loops (W8_DECODE_PIPE: plain, or two banks of two chunks; W8_DECODE_PAIR: two
    feature tiles per block), exact int32 products: K of 1 chunk (fewer than the warps) and of 21 (not a
    multiple of a round), ragged N (N = 40: the last block's second tile lies wholly past N)."""
    force(W8_DECODE_PIPE=pipe, W8_DECODE_PAIR=pair)
    for m, k, n in [(1, 64, 40), (3, 1344, 264), (8, 1344, 17), (16, 1344, 264)]:
        xq = torch.randint(-127, 128, (m, k), dtype=torch.int8, device="cuda")
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
        xs, ws = torch.rand(m, device="cuda") + 0.5, torch.rand(n, device="cuda") + 0.5
        y = ops.w8a8_mm(xq, xs, w, ws, None, torch.float32)
        y_ref = ref.w8a8_mm(xq.cpu(), xs.cpu(), w.cpu(), ws.cpu(), None, torch.float64, torch.float64)
        assert rel_err(y.cpu(), y_ref) < TOL[torch.float32], (pipe, pair, m, k, n)


SM90 = CUDA and torch.cuda.get_device_capability()[0] == 9


@pytest.mark.skipif(not SM90, reason="no Hopper (sm_90) CUDA device")
@pytest.mark.parametrize("tile_n", [0, 224, 256])
def test_cuda_w8a8_large_tile_widths(tile_n, force):
    """The large-tile W8A8 GEMMs, 128 x 256 and 128 x 224 (W8_TILE_N; 0: chosen by wave count): ragged M and
    N against both widths (4600 = 17 x 256 + 248 = 20 x 224 + 120), an odd count of 128-row tiles (the 2 x 1
    clusters pad it), N = 14336 at M = 1024 (where the choice is 224), every output dtype."""
    force(W8_TILE_N=tile_n)
    for m, k, n, out_dtype in [(1030, 1664, 4600, torch.bfloat16), (300, 1024, 520, torch.float16),
                               (1024, 512, 14336, torch.float32), (385, 256, 232, torch.bfloat16)]:
        assert cuda_w8a8_error(m, k, n, out_dtype) < TOL[out_dtype], (tile_n, m, k, n)


@pytest.mark.skipif(not SM90, reason="no Hopper (sm_90) CUDA device")
def test_cuda_w4a16_default_dispatch_few_tiles():
    """run()'s own choice where N gives few 64-feature tiles (N = 4096: the 2-CTA split-K wgmma blocks where they
    fit one wave, and the gemv kernel below M = 33 where K is short) and N = 6144 (one wave of single blocks),
    ragged M included, against float64: whichever kernel a shape lands on must be right."""
    for m, k, n in [(17, 8192, 4096), (24, 4096, 4096), (40, 4096, 4096), (100, 4096, 4096), (128, 8192, 4096),
                    (77, 4096, 6144)]:
        qweight, scales, zeros = random_w4(n, k, 128, m % 2 == 1, "cuda", scale_dtype=torch.bfloat16)
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        y = ops.w4a16_linear(x, ops.pack_w4a16(qweight, scales, zeros, 128))
        y_ref = ref.w4a16_linear(x.cpu(), qweight.cpu(), scales.cpu(), None if zeros is None else zeros.cpu(), 128,
                                 compute_dtype=torch.float64)
        assert rel_err(y.cpu(), y_ref) < TOL[torch.bfloat16] + 3e-3, (m, k, n)


@pytest.mark.skipif(not SM90, reason="no Hopper (sm_90) CUDA device")
@pytest.mark.parametrize("variant", [1, 3, 5, 6, 10, 11])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_w4a16_wgmma_shapes(variant, dtype, force):
    """Every tile shape of the Hopper wgmma W4A16 kernel (W4_WGMMA), forced over all M: ragged token and
    feature blocks (N = 264 leaves half a 16-feature tile), zero points or none, groups of 64 and 128, and K of
    3 chunks, fewer than the warpgroups that split K in some variants (one gets no chunk at all)."""
    force(W4_WGMMA=variant, W4_SM90_MIN_M=1, W4_SM90_MAX_M=4096)
    n = 264
    for m, k, group_size, asym in [(1, 1024, 64, False), (17, 1024, 128, True), (33, 1024, 64, True),
                                   (64, 1024, 128, False), (65, 192, 64, True), (129, 1024, 128, False),
                                   (200, 1024, 64, True), (1000, 1024, 128, True)]:
        qweight, scales, zeros = random_w4(n, k, group_size, asym, "cuda", scale_dtype=dtype)
        x = torch.randn(m, k, device="cuda").to(dtype)
        bias = torch.randn(n, device="cuda").to(dtype)
        y = ops.w4a16_linear(x, ops.pack_w4a16(qweight, scales, zeros, group_size), bias)
        y_ref = ref.w4a16_linear(x.cpu(), qweight.cpu(), scales.cpu(), None if zeros is None else zeros.cpu(),
                                 group_size, bias.cpu(), compute_dtype=torch.float64)
        assert rel_err(y.cpu(), y_ref) < TOL[dtype] + 3e-3, (m, k, group_size, asym)
