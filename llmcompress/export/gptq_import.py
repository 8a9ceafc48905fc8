"""GPTQ (AutoGPTQ / GPTQModel / llm-compressor's gptq export) and AWQ GEMM (AutoAWQ) checkpoints read as ours.

GPTQ, per Linear `<name>` with K inputs, N outputs, b bits, G groups (AutoGPTQ's QuantLinear.pack):
  qweight int32 [K·b/32, N]  code of input k in word k // (32/b), bits (k mod 32/b)·b: packed along the INPUTS
  qzeros  int32 [G, N·b/32]  zero codes packed along the OUTPUTS, stored minus one (checkpoint_format "gptq";
                             "gptq_v2" stores them as they are)
  scales  float16 [G, N];  g_idx int32 [K] (the group of each input column);  bias
  w[n, k] = scales[g_idx[k], n] · (q[k, n] − z[g_idx[k], n])
With act-order (desc_act) g_idx is not k // group_size: the columns of one group are scattered. Sorting the
columns by group (a stable argsort of g_idx) makes every group contiguous; the module then computes with
W[:, perm] on x[..., perm], the same product, and load_quantized permutes the input (`<name>.input_perm`).

AWQ GEMM, per Linear (AutoAWQ's WQLinear_GEMM; awq/utils/packing_utils.py):
  qweight int32 [K, N/8], qzeros int32 [G, N/8]: packed along the OUTPUTS, eight 4-bit codes a word in the
  interleaved order AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7] (word bits 4i..4i+3 hold output column 8c + ORDER[i]);
  scales float16 [G, N];  w[n, k] = scales[k // g, n] · (q[k, n] − z[k // g, n]), zeros as they are.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llmcompress.errors import UserError

from .compressed_tensors import linear_shapes
from .ct_import import read_state

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C] holding 32/b codes per word along dim 0 (GPTQ qweight) -> int64 codes [R·32/b, C]."""
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int64) * bits
    u = (packed.to(torch.int64).unsqueeze(1) >> shifts[None, :, None]) & ((1 << bits) - 1)
    return u.reshape(-1, packed.shape[1])


def unpack_cols(packed: torch.Tensor, bits: int, order: list[int] | None = None) -> torch.Tensor:
    """int32 [R, C] holding 32/b codes per word along dim 1 -> int64 codes [R, C·32/b]; `order[i]` is the column
    (within its word's group) that bit field i holds (AWQ), default i."""
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int64) * bits
    u = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [R, C, field]
    if order is not None:
        u = u[..., torch.argsort(torch.tensor(order))]  # field i holds column order[i]: put column j at j
    return u.reshape(packed.shape[0], -1)


def _take(state: dict, key: str, where: Path, shape: tuple, dtype=None) -> torch.Tensor:
    if key not in state:
        raise UserError(f"{where}: tensor {key!r} missing")
    t = state.pop(key)
    if tuple(t.shape) != tuple(shape):
        raise UserError(f"{where}: {key}: shape {tuple(t.shape)}, expected {tuple(shape)}")
    if dtype is not None and t.dtype != dtype:
        raise UserError(f"{where}: {key}: dtype {t.dtype}, expected {dtype}")
    return t


def _settings(qc: dict, where: Path) -> tuple[str, int, int, bool]:
    method = qc["quant_method"]
    bits = qc.get("bits", qc.get("w_bit"))
    gs = qc.get("group_size", qc.get("q_group_size", 128))
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise UserError(f"{where}: quantization_config.version: {version!r} is not served (AWQ 'gemm' packing)")
        if bits != 4:
            raise UserError(f"{where}: quantization_config.bits: AWQ GEMM packs 4 bits, got {bits!r}")
        return method, bits, gs, not qc.get("zero_point", True)
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise UserError(f"{where}: quantization_config.checkpoint_format: {fmt!r} is not served (gptq, gptq_v2)")
    if bits not in (4, 8):
        raise UserError(f"{where}: quantization_config.bits: {bits!r} is not served (4 or 8)")
    return fmt, bits, gs, bool(qc.get("sym", True))


def _module(name: str, state: dict, n: int, k: int, fmt: str, bits: int, gs: int, where: Path) -> tuple[dict, dict]:
    """(our scheme, our tensors) of one packed Linear."""
    from llmcompress.kernels.reference import pack_int4

    gs = k if gs in (-1, None, 0) else gs
    g = -(-k // gs)
    if fmt == "awq":
        if n % 8:
            raise UserError(f"{where}: {name}: AWQ GEMM packs 8 outputs a word; out_features {n} is not a multiple")
        u = unpack_cols(_take(state, f"{name}.qweight", where, (k, n // 8), torch.int32), 4, AWQ_ORDER).t()
        zkey = f"{name}.qzeros"
        z = unpack_cols(_take(state, zkey, where, (g, n // 8), torch.int32), 4, AWQ_ORDER).t() \
            if zkey in state else torch.full((n, g), 8, dtype=torch.int64)
        perm = None
    else:
        per = 32 // bits
        if k % per or n % per:
            raise UserError(f"{where}: {name}: GPTQ packs {per} codes a word; shape ({n}, {k}) is not a multiple")
        u = unpack_rows(_take(state, f"{name}.qweight", where, (k // per, n), torch.int32), bits).t()  # [N, K]
        z = unpack_cols(_take(state, f"{name}.qzeros", where, (g, n // per), torch.int32), bits).t()
        if fmt == "gptq":
            z = (z + 1) & ((1 << bits) - 1)  # a zero of 0 was stored as −1, which wraps to all ones
        gidx = state.pop(f"{name}.g_idx", None)
        contiguous = torch.arange(k) // gs
        perm = None
        if gidx is not None:
            gidx = gidx.long()
            if tuple(gidx.shape) != (k,) or gidx.min() < 0 or gidx.max() >= g:
                raise UserError(f"{where}: {name}.g_idx: expected [{k}] group indices in 0..{g - 1}")
            if not torch.equal(gidx, contiguous):
                perm = torch.argsort(gidx, stable=True)
                if not torch.equal(gidx[perm], contiguous):
                    raise UserError(f"{where}: {name}.g_idx: groups of unequal sizes cannot be made contiguous")
                u = u[:, perm]
    scales = _take(state, f"{name}.scales", where, (g, n)).t().contiguous()
    sym = bool(torch.all(z == (1 << (bits - 1))))
    gran = "group" if g > 1 else "channel"
    out = {}
    if bits == 4:
        scheme = {"weight_format": "int4", "granularity": gran, "group_size": gs if g > 1 else k + k % 2,
                  "symmetric": sym, "act_format": None, "act_dynamic": True,
                  "scale_dtype": {torch.float16: "float16", torch.bfloat16: "bfloat16"}.get(scales.dtype, "float32")}
        if scheme["group_size"] % 2:
            raise UserError(f"{where}: {name}: group size {gs} is odd; our int4 layout stores two codes per byte")
        out["qweight"] = pack_int4(u.to(torch.uint8))
        out["scales"] = scales.to({"float16": torch.float16, "bfloat16": torch.bfloat16}.get(
            scheme["scale_dtype"], torch.float32))
        if not sym:
            out["zeros"] = z.to(torch.uint8).contiguous()
    else:
        scheme = {"weight_format": "int8", "granularity": gran, "group_size": gs if g > 1 else k, "symmetric": sym,
                  "act_format": None, "act_dynamic": True, "scale_dtype": "float32"}
        out["w_q"] = (u - 128).to(torch.int8).contiguous()
        out["w_scale"] = (scales.float() if g > 1 else scales.float()[:, 0]).contiguous()
        if not sym:
            zz = (z - 128).to(torch.int8)
            out["w_zero"] = (zz if g > 1 else zz[:, 0]).contiguous()
    if perm is not None:
        out["input_perm"] = perm
    bias = state.pop(f"{name}.bias", None)
    if bias is not None:
        out["bias"] = bias
    return scheme, {f"{name}.{key}": t for key, t in out.items()}


def translate(path: Path, config: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """(our quantization_config, our state dict) of the GPTQ or AWQ checkpoint at `path`."""
    where = path / "config.json"
    fmt, bits, gs, _ = _settings(config["quantization_config"], where)
    shapes = linear_shapes(config)
    state = read_state(path)
    wfile = path / "model.safetensors"
    modules, tensors = {}, {}
    for name, (n, k) in shapes.items():
        if f"{name}.qweight" not in state:
            continue
        scheme, t = _module(name, state, n, k, fmt, bits, gs, wfile)
        modules[name] = scheme
        tensors.update(t)
    if not modules:
        raise UserError(f"{wfile}: no <Linear>.qweight tensor: not a {fmt} checkpoint of this model")
    leftovers = [key for key in state if key.rsplit(".", 1)[0] in modules]
    if leftovers:
        raise UserError(f"{wfile}: unexpected tensors {sorted(leftovers)[:5]}")
    tensors.update(state)
    return {"quant_method": "llmcompress", "format_version": 1, "method": fmt, "config": {},
            "modules": dict(sorted(modules.items()))}, tensors
