"""GPTQ and AWQ GEMM checkpoints read by load_quantized, against the packing as the reference implementations
define it: AutoGPTQ's QuantLinear.pack (qlinear_cuda_old.py: qweight packed along inputs, qzeros along outputs,
zeros stored minus one, g_idx) and AutoAWQ's WQLinear_GEMM.from_linear (both packed along outputs in the order
[0, 2, 4, 6, 1, 3, 5, 7]), written here as the plain loops those files use."""

from __future__ import annotations

import json
import shutil
import zlib

import numpy as np
import pytest
import torch
from _export_cli import error_line
from safetensors.torch import load_file, save_file

from llmcompress.quant.checkpoint import load_quantized
from llmcompress.quant.qlinear import QuantLinear

LAYERS = ("model.layers.0.", "model.layers.1.")
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def _rtn_asym(w: torch.Tensor, gs: int, bits: int = 4):
    """Min-max asymmetric scales and zeros per group: scale [N, G], zero [N, G] in 0..2^b-1."""
    n, k = w.shape
    g = w.reshape(n, k // gs, gs)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    qmax = 2 ** bits - 1
    s = ((hi - lo) / qmax).clamp(min=1e-8).half().float()
    z = torch.clamp(torch.round(-lo / s), 0, qmax)
    return s, z


def _gptq_pack(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, g_idx: torch.Tensor, bits: int = 4):
    """AutoGPTQ's pack(): s, z [N, G]; returns qweight, qzeros, scales [G, N] fp16, and the codes used."""
    scales, zeros = s.t().contiguous().half(), z.t().contiguous()
    intweight = torch.round(w.t() / scales.float()[g_idx] + zeros[g_idx]).clamp(0, 2 ** bits - 1)
    intweight = intweight.numpy().astype(np.uint32)  # [K, N]
    qweight = np.zeros((intweight.shape[0] // 32 * bits, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        for j in range(i, i + 32 // bits):
            qweight[row] |= intweight[j] << (bits * (j - i))
        i += 32 // bits
        row += 1
    zeros = (zeros - 1).numpy().astype(np.int64).astype(np.uint32)
    qzeros = np.zeros((zeros.shape[0], zeros.shape[1] // 32 * bits), dtype=np.uint32)
    i = col = 0
    while col < qzeros.shape[1]:
        for j in range(i, i + 32 // bits):
            qzeros[:, col] |= zeros[:, j] << (bits * (j - i))
        i += 32 // bits
        col += 1
    return (torch.from_numpy(qweight.astype(np.int32)), torch.from_numpy(qzeros.astype(np.int32)), scales,
            torch.from_numpy(intweight.astype(np.int64)))


def _awq_pack(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, gs: int):
    """AutoAWQ's WQLinear_GEMM.from_linear packing."""
    scales, zeros = s.t().contiguous().half(), z.t().contiguous()
    k = w.shape[1]
    gi = torch.arange(k) // gs
    intweight = torch.round(w.t() / scales.float()[gi] + zeros[gi]).clamp(0, 15).to(torch.int32)  # [K, N]
    qweight = torch.zeros((k, w.shape[0] // 8), dtype=torch.int32)
    for col in range(w.shape[0] // 8):
        for i in range(8):
            qweight[:, col] |= intweight[:, col * 8 + AWQ_ORDER[i]] << (i * 4)
    zi = zeros.to(torch.int32)
    qzeros = torch.zeros((zi.shape[0], w.shape[0] // 8), dtype=torch.int32)
    for col in range(w.shape[0] // 8):
        for i in range(8):
            qzeros[:, col] |= zi[:, col * 8 + AWQ_ORDER[i]] << (i * 4)
    return qweight, qzeros, scales, intweight.long()


def _write(smollm, out, qc: dict, pack) -> dict:
    """A checkpoint of the embedded default whose Linears in LAYERS are packed by `pack`; returns the reference
    dequantized weight of each: w[n, k] = scale[g_idx[k], n] · (q[k, n] − z[g_idx[k], n])."""
    model, tok = smollm
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    ref = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.startswith(LAYERS):
            del state[f"{name}.weight"]
            tensors, ref[name] = pack(name, m.weight.detach().float())
            state.update({f"{name}.{k}": v for k, v in tensors.items()})
    out.mkdir()
    model.config.save_pretrained(out)
    tok.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = qc
    (out / "config.json").write_text(json.dumps(cfg))
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return ref


def _gptq(act_order: bool, gs: int = 64):
    def pack(name, w):
        n, k = w.shape
        g_idx = torch.arange(k) // gs
        if act_order:  # GPTQ quantizes columns in a permuted order; g_idx[k] = position of k in it // gs
            perm = torch.randperm(k, generator=torch.Generator().manual_seed(zlib.crc32(name.encode())))
            g_idx = torch.empty(k, dtype=torch.long)
            g_idx[perm] = torch.arange(k) // gs
        s, z = _rtn_asym(w, gs)  # scales per contiguous chunk, used for the group of that index
        qweight, qzeros, scales, codes = _gptq_pack(w, s, z, g_idx)
        ref = scales.float()[g_idx].t() * (codes.t().float() - z.t()[g_idx].t())
        return {"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx.to(torch.int32)}, ref
    return pack


def _awq(gs: int = 64):
    def pack(name, w):
        s, z = _rtn_asym(w, gs)
        qweight, qzeros, scales, codes = _awq_pack(w, s, z, gs)
        gi = torch.arange(w.shape[1]) // gs
        ref = scales.float()[gi].t() * (codes.t().float() - z.t()[gi].t())
        return {"qweight": qweight, "qzeros": qzeros, "scales": scales}, ref
    return pack


CASES = {
    "gptq": ({"quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": False, "sym": False,
              "checkpoint_format": "gptq"}, _gptq(False)),
    "gptq_act_order": ({"quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": True, "sym": False,
                        "checkpoint_format": "gptq"}, _gptq(True)),
    "awq": ({"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm"}, _awq()),
}


@pytest.mark.parametrize("case", list(CASES))
def test_load_quantized_reads_the_reference_packing(case, smollm, tmp_path):
    qc, pack = CASES[case]
    ref = _write(smollm, tmp_path / case, qc, pack)
    model = load_quantized(tmp_path / case)
    dense = smollm[0]
    x = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(0))
    for name, w_ref in ref.items():
        m = model.get_submodule(name)
        assert isinstance(m, QuantLinear) and m.scheme.weight_format == "int4"
        w = m.dequantized_weight(torch.float32)
        perm = getattr(m, "input_perm", None)
        if perm is not None:  # stored columns are the inputs in the order perm
            w = w[:, torch.argsort(perm)]
        assert torch.equal(w, w_ref), name
        h = torch.randn(3, m.in_features, generator=torch.Generator().manual_seed(1))
        want = torch.nn.functional.linear(h.double(), w_ref.double()).float()
        torch.testing.assert_close(m(h), want, rtol=1e-4, atol=1e-4)
    assert (case == "gptq_act_order") == any(hasattr(m, "input_perm") for m in model.modules())
    with torch.no_grad():  # the whole model: a float copy holding the reference weights gives the same logits
        import copy

        ref_model = copy.deepcopy(dense)
        for name, w_ref in ref.items():
            ref_model.get_submodule(name).weight.copy_(w_ref)
        torch.testing.assert_close(model(x).logits, ref_model(x).logits, rtol=1e-3, atol=1e-3)


def test_bad_gptq_input_is_one_line_exit_2(smollm, tmp_path, llmc):
    qc, pack = CASES["gptq"]
    src = tmp_path / "gptq"
    _write(smollm, src, qc, pack)
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["checkpoint_format"] = "marlin"
    (bad / "config.json").write_text(json.dumps(cfg))
    r = llmc("eval", "--input", str(bad), "--output", str(tmp_path / "ev"), "--set", "ppl.max_tokens=64",
             cwd=tmp_path)
    assert r.returncode == 2 and error_line(r.stderr).count("checkpoint_format") == 1, r.stderr
    shutil.rmtree(bad)
    shutil.copytree(src, bad)
    state = load_file(str(bad / "model.safetensors"))
    state["model.layers.0.mlp.down_proj.scales"] = state["model.layers.0.mlp.down_proj.scales"][:-1].contiguous()
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    r = llmc("eval", "--input", str(bad), "--output", str(tmp_path / "ev"), "--set", "ppl.max_tokens=64",
             cwd=tmp_path)
    assert r.returncode == 2 and "down_proj.scales: shape" in error_line(r.stderr), r.stderr
    assert not (tmp_path / "ev").exists()
