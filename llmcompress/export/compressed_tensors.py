"""Our checkpoint <-> compressed-tensors (the layout llm-compressor writes; vLLM, SGLang and transformers load it).

Per quantized Linear `<name>` (tensor names, dtypes and shapes as compressed-tensors 0.20 writes them):

  pack-quantized  (W4A16, W8A16)   <name>.weight_packed int32 [N, ⌈K·b/32⌉] (ct_packing.py), <name>.weight_scale
                  [N, G] group / [N, 1] channel / [1] tensor, <name>.weight_shape int64 [2] = (N, K), and for
                  asymmetric group/channel <name>.weight_zero_point int32 [⌈N·b/32⌉, G] packed along dim 0
  int-quantized   (W8A8 int8)      <name>.weight int8 [N, K], <name>.weight_scale [N, 1] (or [1]),
                                   <name>.input_scale [1] for static activation scales
  float-quantized (FP8)            <name>.weight float8_e4m3fn [N, K], <name>.weight_scale [N, 1] (or [1]),
                                   <name>.input_scale [1] for static activation scales
  KV cache                         <attention>.k_scale, <attention>.v_scale: [1] per tensor, [H_kv, 1, 1] per head

Codes are signed (int4 −8..7, int8 −128..127, zero points likewise): our unsigned int4 code u is q = u − 8.
w = s · (q − z) in the scale's dtype. Scales are written in float32, so compressed-tensors' dequantization
(computed in the scale's dtype) gives our float32 weights bit for bit; our scales were rounded through their
scale_dtype when chosen, so float32 holds them exactly.

What compressed-tensors cannot hold is refused before any work (`ct_problem`): a group size that does not divide
a Linear's in_features (our ragged last group), and asymmetric or grouped W8A8 weights (our kernels never make
those). Our KV scales are measured on pre-RoPE keys (kvcache.py); compressed-tensors' runtimes apply k_scale to
post-RoPE keys, so an exported k_scale is the same number under a slightly different reading (docs/interop.md).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from llmcompress.errors import UserError

from .ct_packing import pack_int32

CT_VERSION = "0.20.1"  # the compressed-tensors release whose writer this layout was checked against
WEIGHTS_FILE = "model.safetensors"
_NOT_COPIED = {"config.json", WEIGHTS_FILE, "llmcompress.safetensors", "manifest.json", "quant_report.json"}


# ------------------------------------------------------------------------------------------ schemes

def _args(num_bits: int, typ: str, symmetric: bool, strategy: str, group_size: Optional[int] = None,
          dynamic: bool = False) -> dict:
    """One QuantizationArgs as compressed-tensors serialises it (keys left at their defaults are not written)."""
    return {"dynamic": dynamic, "group_size": group_size, "num_bits": num_bits, "strategy": strategy,
            "symmetric": symmetric, "type": typ}


def weight_strategy(s: dict, in_features: int) -> tuple[str, Optional[int]]:
    """(strategy, group_size) of one of our module schemes."""
    if s["granularity"] == "group" and s["group_size"] < in_features:
        return "group", s["group_size"]
    return ("tensor", None) if s["granularity"] == "tensor" else ("channel", None)


def ct_scheme(s: dict, in_features: int) -> dict:
    """One of our module schemes (quantization_config.modules[name]) as a compressed-tensors config group
    (without targets): {format, weights, input_activations, output_activations}."""
    strategy, group = weight_strategy(s, in_features)
    fmt = s["weight_format"]
    act = s.get("act_format")
    if fmt == "fp8":
        weights = _args(8, "float", True, strategy)
        inputs = None if act is None else _args(8, "float", True, "token" if s["act_dynamic"] else "tensor",
                                                dynamic=s["act_dynamic"])
        return {"format": "float-quantized", "input_activations": inputs, "output_activations": None,
                "weights": weights}
    bits = 4 if fmt == "int4" else 8
    weights = _args(bits, "int", s["symmetric"], strategy, group)
    if act == "int8":
        inputs = _args(8, "int", True, "token" if s["act_dynamic"] else "tensor", dynamic=s["act_dynamic"])
        return {"format": "int-quantized", "input_activations": inputs, "output_activations": None,
                "weights": weights}
    return {"format": "pack-quantized", "input_activations": None, "output_activations": None, "weights": weights}


def nearest_group_size(group_size: int, widths: list[int]) -> int:
    """The group size closest to `group_size` (ties: the smaller, which keeps accuracy) that divides every width
    and is even (int4 codes are stored two per byte)."""
    candidates = [g for g in range(2, min(widths) + 1, 2) if all(w % g == 0 for w in widths)]
    return min(candidates, key=lambda g: (abs(g - group_size), g)) if candidates else min(widths)


def ct_problem(modules: dict[str, dict], in_features: dict[str, int]) -> Optional[str]:
    """One line naming the key and the nearest layout that works, if compressed-tensors cannot hold these
    module schemes; else None."""
    ragged = sorted({(s["group_size"], in_features[n]) for n, s in modules.items()
                     if s["granularity"] == "group" and in_features[n] % s["group_size"]})
    if ragged:
        gs = ragged[0][0]
        widths = sorted({in_features[n] for n, s in modules.items() if s["granularity"] == "group"})
        return (f"weights.group_size: {gs} does not divide in_features {ragged[0][1]} (a ragged last group), "
                f"which compressed-tensors cannot hold; nearest that works: weights.group_size: "
                f"{nearest_group_size(gs, widths)} (divides {', '.join(map(str, widths))})")
    for name, s in modules.items():
        if s.get("float_zero"):
            return (f"quantization_config.modules.{name}.float_zero: a float zero point (GGUF q4_1's offset) has no "
                    f"compressed-tensors layout; nearest that works: the same scheme with integer zero points")
        if s.get("act_format") == "int8" and (not s["symmetric"] or s["granularity"] == "group"):
            return (f"quantization_config.modules.{name}: W8A8 with asymmetric or grouped weights has no "
                    f"compressed-tensors int-quantized layout; nearest that works: weights: {{symmetric: true, "
                    f"granularity: channel}}")
    return None


def quantization_config(modules: dict[str, dict], in_features: dict[str, int], linears: list[str],
                        kv: Optional[dict]) -> dict:
    """The config.json `quantization_config` compressed-tensors writes for these schemes. One config group per
    distinct scheme; a single group targets "Linear" (llm-compressor's usual form), several target module names.
    `ignore` lists every Linear left in float."""
    groups: list[tuple[dict, list[str]]] = []
    for name in sorted(modules):
        sch = ct_scheme(modules[name], in_features[name])
        for g, names in groups:
            if g == sch:
                names.append(name)
                break
        else:
            groups.append((sch, [name]))
    config_groups = {}
    for i, (sch, names) in enumerate(groups):
        targets = ["Linear"] if len(groups) == 1 else names
        config_groups[f"group_{i}"] = {**sch, "targets": targets}
    formats = {sch["format"] for sch, _ in groups}
    return {
        "config_groups": config_groups,
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "global_compression_ratio": None,
        "ignore": sorted(n for n in linears if n not in modules),
        "kv_cache_scheme": _kv_scheme(kv),
        "moe_sparsity_config": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": CT_VERSION,
    }


def _kv_scheme(kv: Optional[dict]) -> Optional[dict]:
    if not kv or kv.get("format", "none") == "none" or "scales" not in kv:
        return None
    strategy = "attn_head" if kv["granularity"] == "head" else "tensor"
    return _args(8, "int" if kv["format"] == "int8" else "float", True, strategy)


# ------------------------------------------------------------------------------------------ tensors

def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """Our per-row parameter ([N], [N, 1] or [N, G]) as compressed-tensors' [N, G]."""
    return t.reshape(n, -1)


def module_tensors(name: str, s: dict, state: dict[str, torch.Tensor], n: int, k: int) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one quantized Linear from our checkpoint's tensors (no re-rounding)."""
    strategy, _ = weight_strategy(s, k)
    out: dict[str, torch.Tensor] = {}
    fmt, sym = s["weight_format"], s["symmetric"]
    if fmt == "int4":
        from llmcompress.kernels.reference import unpack_int4

        q = unpack_int4(state[f"{name}.qweight"], k).to(torch.int16) - 8
        scale = _rows(state[f"{name}.scales"].float(), n)
        zero = None if sym else _rows(state[f"{name}.zeros"], n).to(torch.int16) - 8
        bits = 4
    else:
        q = state[f"{name}.w_q"]
        scale = _rows(state[f"{name}.w_scale"].float(), n)
        zero = None if sym else _rows(state[f"{name}.w_zero"], n)
        bits = 8
    if strategy == "tensor":
        scale = scale[:1, :1].reshape(1)
        zero = None if zero is None else zero[:1, :1].reshape(1)
    if fmt == "fp8" or s.get("act_format") == "int8":
        out[f"{name}.weight"] = q.contiguous()
        out[f"{name}.weight_scale"] = scale.contiguous()
    else:
        out[f"{name}.weight_packed"] = pack_int32(q, bits)
        out[f"{name}.weight_scale"] = scale.contiguous()
        out[f"{name}.weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
        if zero is not None:
            out[f"{name}.weight_zero_point"] = (pack_int32(zero, bits, packed_dim=0) if strategy != "tensor"
                                                else zero.to(torch.int8))
    if f"{name}.input_scale" in state:
        out[f"{name}.input_scale"] = state[f"{name}.input_scale"].float().reshape(1)
    if f"{name}.bias" in state:
        out[f"{name}.bias"] = state[f"{name}.bias"]
    return out


def kv_tensors(kv: Optional[dict]) -> dict[str, torch.Tensor]:
    if _kv_scheme(kv) is None:
        return {}
    out = {}
    for attn, scales in kv["scales"].items():
        for kind in ("k", "v"):
            t = torch.tensor(scales[kind], dtype=torch.float32)
            out[f"{attn}.{kind}_scale"] = t.reshape(-1, 1, 1) if kv["granularity"] == "head" else t.reshape(1)
    return out


# ------------------------------------------------------------------------------------------ the export

def linear_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """{name: (out_features, in_features)} of every nn.Linear of the model config.json describes (built on the
    meta device: no memory, no weights)."""
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = {k: v for k, v in config.items() if k != "quantization_config"}
    model_type = raw.pop("model_type", None)
    if model_type is None:
        raise UserError("config.json: model_type missing")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **raw))
    return {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def read_llmc_checkpoint(src: Path) -> tuple[dict, dict, dict[str, tuple[int, int]]]:
    """(config.json, our quantization_config, Linear shapes) of a quantize artifact, refusing anything else."""
    from llmcompress.quant.checkpoint import read_quantization_config

    qc = read_quantization_config(src)
    config = json.loads((src / "config.json").read_text())
    shapes = linear_shapes(config)
    missing = sorted(set(qc["modules"]) - set(shapes))
    if missing:
        raise UserError(f"{src / 'config.json'}: quantization_config.modules: no Linear {missing[0]!r} in the model")
    return config, qc, shapes


def experts_problem(qc: dict) -> Optional[str]:
    """MoE experts we stored as 3-D parameters (`<experts>.gate_up_proj.<e>`, quant/experts.py): compressed-tensors
    (llm-compressor, and transformers 5's loader, which decompresses such experts into its fused 3-D ones) describes
    experts as one Linear per expert and projection (`<experts>.<e>.gate_proj` / `up_proj` / `down_proj`; Mixtral's
    hub checkpoints `w1` / `w3` / `w2`), a layout this export does not write (nor ct_import read)."""
    experts = sorted(qc.get("experts") or {})
    if not experts:
        return None
    return (f"quantization_config.experts: {experts[0]!r}: MoE experts stored as 3-D parameters have no "
            f"compressed-tensors layout this export writes (it describes experts as one Linear per expert "
            f"and projection, <experts>.<e>.<proj>); nearest that works: exclude the experts "
            f"(exclude: ['*.mlp.experts*']) and export the rest")


def problem(src: Path) -> Optional[str]:
    """Why the quantize artifact at `src` cannot be written as compressed-tensors, or None (no work done)."""
    from llmcompress.quant.checkpoint import read_quantization_config

    why = experts_problem(read_quantization_config(src))
    if why:
        return why
    _, qc, shapes = read_llmc_checkpoint(src)
    return ct_problem(qc["modules"], {n: shapes[n][1] for n in qc["modules"]})


def write(src: Path, out: Path) -> dict:
    """Write the quantize artifact at `src` as a compressed-tensors model directory `out` (which must exist).
    Returns a summary for the manifest."""
    why = problem(src)
    if why:
        raise UserError(f"{src}: {why}")
    config, qc, shapes = read_llmc_checkpoint(src)
    modules = qc["modules"]
    kv = qc.get("config", {}).get("kv_cache")
    from llmcompress.quant.checkpoint import weights_file

    state = load_file(str(weights_file(src)))
    tensors: dict[str, torch.Tensor] = {}
    taken = set()
    for name, s in modules.items():
        n, k = shapes[name]
        tensors.update(module_tensors(name, s, state, n, k))
        taken.update(key for key in state if key.rsplit(".", 1)[0] == name)
    for key, t in state.items():
        if key not in taken:
            tensors[key] = t
    tensors.update(kv_tensors(kv))
    ct_qc = quantization_config(modules, {n: shapes[n][1] for n in modules}, list(shapes), kv)
    save_file({k: tensors[k].contiguous() for k in sorted(tensors)}, str(out / WEIGHTS_FILE),
              metadata={"format": "pt"})
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    config["quantization_config"] = ct_qc
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name not in _NOT_COPIED:
            shutil.copyfile(f, out / f.name)
    return {"format": "compressed-tensors", "ct_format": ct_qc["format"], "config_groups": len(ct_qc["config_groups"]),
            "layers": len(modules), "ignored": len(ct_qc["ignore"]),
            "kv_cache_scheme": ct_qc["kv_cache_scheme"] is not None,
            "file_bytes": (out / WEIGHTS_FILE).stat().st_size}
