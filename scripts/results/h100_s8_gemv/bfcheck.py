# precision of the bias-mma W4A16 decode kernels against the HSUB2 ones, float64 reference, including all-positive
# activations (the bias term then adds up instead of cancelling)
import os, torch
from llmcompress.kernels import ops, reference as ref
torch.manual_seed(0)
def rel(a, b): return ((a.double() - b).norm() / b.norm()).item()
for dtype in (torch.bfloat16, torch.float16):
    for pos in (False, True):
        for m in (1, 4, 16):
            k, n, gs = 8192, 512, 128
            q = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
            s = (torch.rand(n, k // gs) * 0.02 + 0.001)
            x = torch.randn(m, k)
            if pos: x = x.abs()
            x = x.to(dtype)
            y_ref = x.double() @ ref.dequantize_int4(q, s.to(dtype), None, gs, k, torch.float64).t()
            packed = ops.pack_w4a16(q.cuda(), s.to(dtype).cuda(), None, gs)
            out = {}
            for bf in ("0", "1"):
                os.environ["LLMC_W4_BIAS_MMA"] = bf
                out[bf] = rel(ops.w4a16_linear(x.cuda(), packed).cpu(), y_ref)
            print(f"{str(dtype):16s} pos={pos!s:5s} M={m:2d} rel_err hsub2 {out['0']:.2e} bias_mma {out['1']:.2e}")
