"""Read a compressed-tensors checkpoint (llm-compressor's, or our export) as our own checkpoint layout, so that
`load_quantized` rebuilds it with QuantLinear and our kernels serve it.

    pack-quantized 4-bit       -> int4 (W4A16): codes u = q + 8 repacked two per byte, scales [N, G], zeros u8
    pack-quantized 8-bit       -> int8 weight-only (W8A16)
    int-quantized 8-bit        -> int8; with int8 input activations W8A8 (symmetric per-channel/tensor weights)
    float-quantized 8-bit      -> fp8 (weight-only or W8A8 FP8, dynamic per token or static)
    kv_cache_scheme + k_scale/v_scale -> our KV-cache record (kvcache.py)
Anything else (other bit widths, block or tensor-group strategies, act-order g_idx, asymmetric activations,
sparsity) is refused with one line naming the file and the key.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import torch

from llmcompress.errors import UserError
from llmcompress.quant.formats import SCALE_DTYPES

from .compressed_tensors import linear_shapes
from .ct_packing import unpack_int32


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory: model.safetensors, or the shards a model.safetensors.index.json names."""
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError):
            raise UserError(f"{index}: weight_map: expected a mapping of tensor -> shard file") from None
    elif (path / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise UserError(f"{path}: no model.safetensors (or model.safetensors.index.json)")
    state = {}
    for shard in shards:
        f = path / shard
        if not f.is_file() or Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise UserError(f"{index}: weight_map: shard {shard!r} missing")
        state.update(load_file(str(f)))
    return state


def _matches(name: str, targets: list[str]) -> bool:
    for t in targets:
        if t == "Linear" or t == name or (t.startswith("re:") and re.match(t[3:], name)):
            return True
    return False


def _ignored(name: str, ignore: list[str]) -> bool:
    return any(t == name or (t.startswith("re:") and re.match(t[3:], name)) for t in ignore)


def _scheme(args: dict, inputs: Optional[dict], fmt: str, k: int, where: str) -> dict:
    """Our module scheme for one compressed-tensors config group, or a one-line refusal."""
    typ, bits, strategy = args.get("type", "int"), args.get("num_bits"), args.get("strategy", "tensor")
    sym, gs = bool(args.get("symmetric", True)), args.get("group_size")
    if strategy not in ("tensor", "channel", "group"):
        raise UserError(f"{where}.weights.strategy: {strategy!r} is not served (tensor, channel or group)")
    if typ == "float":
        if bits != 8 or strategy == "group" or not sym:
            raise UserError(f"{where}.weights: float weights are served as symmetric FP8 per channel or tensor, "
                            f"got num_bits={bits} strategy={strategy} symmetric={sym}")
        wf = "fp8"
    elif typ == "int" and bits == 4 and fmt == "pack-quantized":
        wf = "int4"
    elif typ == "int" and bits == 8:
        wf = "int8"
    else:
        raise UserError(f"{where}.weights: num_bits={bits} type={typ} in format {fmt!r} is not served (int4 "
                        f"pack-quantized, int8, fp8)")
    group = gs if strategy == "group" else k + (k % 2 if wf == "int4" else 0)
    if wf == "int4" and group % 2:
        raise UserError(f"{where}.weights.group_size: {gs} is odd; our int4 layout stores two codes per byte")
    act, dynamic = None, True
    if inputs is not None:
        a_typ, a_strategy = inputs.get("type", "int"), inputs.get("strategy")
        if inputs.get("num_bits") != 8 or not inputs.get("symmetric", True) or a_strategy not in ("token", "tensor"):
            raise UserError(f"{where}.input_activations: served are symmetric 8-bit per-token (dynamic) or "
                            f"per-tensor (static) activations")
        act = "fp8" if a_typ == "float" else "int8"
        dynamic = bool(inputs.get("dynamic", a_strategy == "token"))
        if act == "int8" and (wf != "int8" or not sym or strategy == "group"):
            raise UserError(f"{where}: int8 activations run on our W8A8 kernel, which needs symmetric int8 "
                            f"per-channel weights")
        if act == "fp8" and wf != "fp8":
            raise UserError(f"{where}: fp8 activations need fp8 weights")
    return {"weight_format": wf, "granularity": strategy, "group_size": group, "symmetric": sym,
            "scale_dtype": "float32", "act_format": act, "act_dynamic": dynamic}


def _narrowest(scale: Optional[torch.Tensor]) -> str:
    """float16 when it holds every int4 scale exactly (the kernels' native scale dtype; what our own checkpoints
    store), else float32."""
    if scale is not None and torch.equal(scale.float().half().float(), scale.float()):
        return "float16"
    return "float32"


def _take(state: dict, key: str, where: Path) -> torch.Tensor:
    if key not in state:
        raise UserError(f"{where}: tensor {key!r} missing")
    return state.pop(key)


def _shape(t: torch.Tensor, shape: tuple, key: str, where: Path) -> torch.Tensor:
    if tuple(t.shape) != tuple(shape):
        raise UserError(f"{where}: {key}: shape {tuple(t.shape)}, expected {tuple(shape)}")
    return t


def _module(name: str, s: dict, state: dict, n: int, k: int, wf: Path) -> dict[str, torch.Tensor]:
    """Our QuantLinear buffers of one module from its compressed-tensors tensors."""
    from llmcompress.kernels.reference import pack_int4

    g = -(-k // s["group_size"]) if s["granularity"] == "group" else 1
    gidx = state.pop(f"{name}.weight_g_idx", None)
    if gidx is not None and not torch.equal(gidx.long(), torch.arange(k) // s["group_size"]):
        raise UserError(f"{wf}: {name}.weight_g_idx: activation-order groups (non-contiguous) are not served")
    scale = _take(state, f"{name}.weight_scale", wf).float()
    scale = scale.reshape(1, 1).expand(n, 1) if scale.numel() == 1 else _shape(scale, (n, g), f"{name}.weight_scale", wf)
    zero = state.pop(f"{name}.weight_zero_point", None)
    bits = 4 if s["weight_format"] == "int4" else 8
    out: dict[str, torch.Tensor] = {}
    if f"{name}.weight_packed" in state:
        packed = _take(state, f"{name}.weight_packed", wf)
        shape = state.pop(f"{name}.weight_shape", None)
        if shape is not None and tuple(int(v) for v in shape.reshape(-1)) != (n, k):
            raise UserError(f"{wf}: {name}.weight_shape: {shape.tolist()}, the model has ({n}, {k})")
        _shape(packed, (n, -(-k * bits // 32)), f"{name}.weight_packed", wf)
        q = unpack_int32(packed, bits, k)
    else:
        q = _shape(_take(state, f"{name}.weight", wf), (n, k), f"{name}.weight", wf)
    if zero is not None and not s["symmetric"]:
        if zero.dtype == torch.int32:
            zero = unpack_int32(zero, bits, n, packed_dim=0)
        zero = zero.reshape(1, 1).expand(n, 1) if zero.numel() == 1 else _shape(zero, (n, g), f"{name}.weight_zero_point", wf)
    elif not s["symmetric"]:
        raise UserError(f"{wf}: {name}.weight_zero_point missing for an asymmetric scheme")
    if s["weight_format"] == "int4":
        if q.min() < -8 or q.max() > 7:
            raise UserError(f"{wf}: {name}: int4 codes outside -8..7")
        out["qweight"] = pack_int4((q.to(torch.int16) + 8).to(torch.uint8))
        out["scales"] = scale.to(SCALE_DTYPES[s["scale_dtype"]]).contiguous()
        if not s["symmetric"]:
            out["zeros"] = (zero.to(torch.int16) + 8).to(torch.uint8).contiguous()
    else:
        if s["weight_format"] == "int8" and q.dtype != torch.int8:
            raise UserError(f"{wf}: {name}.weight: dtype {q.dtype}, expected int8")
        if s["weight_format"] == "fp8" and q.dtype != torch.float8_e4m3fn:
            raise UserError(f"{wf}: {name}.weight: dtype {q.dtype}, expected float8_e4m3fn")
        out["w_q"] = q.contiguous()
        out["w_scale"] = (scale if s["granularity"] == "group" else scale[:, 0]).contiguous()
        if not s["symmetric"]:
            z = zero.to(torch.int8)
            out["w_zero"] = (z if s["granularity"] == "group" else z[:, 0]).contiguous()
    if s["act_format"] is not None and not s["act_dynamic"]:
        out["input_scale"] = _take(state, f"{name}.input_scale", wf).float().reshape(())
    else:
        state.pop(f"{name}.input_scale", None)
    bias = state.pop(f"{name}.bias", None)
    if bias is not None:
        out["bias"] = bias
    return {f"{name}.{key}": t for key, t in out.items()}


def _kv(qc: dict, state: dict, where: Path) -> Optional[dict]:
    scheme = qc.get("kv_cache_scheme")
    if not scheme:
        return None
    if scheme.get("num_bits") != 8 or scheme.get("strategy") not in ("tensor", "attn_head"):
        raise UserError(f"{where}: quantization_config.kv_cache_scheme: served are 8-bit per-tensor or per-head "
                        f"(attn_head) scales")
    scales: dict[str, dict] = {}
    for key in sorted(k for k in state if k.endswith((".k_scale", ".v_scale"))):
        attn, kind = key.rsplit(".", 1)
        scales.setdefault(attn, {})[kind[0]] = state.pop(key).float().reshape(-1).tolist()
    return {"format": "fp8" if scheme.get("type") == "float" else "int8",
            "granularity": "head" if scheme["strategy"] == "attn_head" else "tensor", "scales": scales}


def translate(path: Path, config: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """(our quantization_config, our state dict) of the compressed-tensors checkpoint at `path`."""
    where = path / "config.json"
    qc = config["quantization_config"]
    if qc.get("sparsity_config") or qc.get("transform_config"):
        raise UserError(f"{where}: quantization_config: sparsity and transforms are not served")
    if qc.get("quantization_status", "compressed") != "compressed":
        raise UserError(f"{where}: quantization_config.quantization_status: expected 'compressed', got "
                        f"{qc.get('quantization_status')!r}")
    groups = qc.get("config_groups") or {}
    if not isinstance(groups, dict) or not groups:
        raise UserError(f"{where}: quantization_config.config_groups: expected at least one group")
    shapes = linear_shapes(config)
    wfile = path / "model.safetensors"
    state = read_state(path)
    modules: dict[str, dict] = {}
    tensors: dict[str, torch.Tensor] = {}
    ignore = qc.get("ignore") or []
    for name, (n, k) in shapes.items():
        if _ignored(name, ignore):
            continue
        for gname, grp in groups.items():
            if not _matches(name, grp.get("targets") or []):
                continue
            if grp.get("weights") is None:
                break
            fmt = grp.get("format") or qc.get("format")
            if fmt not in ("pack-quantized", "int-quantized", "float-quantized", "naive-quantized"):
                raise UserError(f"{where}: quantization_config.config_groups.{gname}.format: {fmt!r} is not served "
                                f"(pack-quantized, int-quantized, float-quantized, naive-quantized)")
            s = _scheme(grp["weights"], grp.get("input_activations"), fmt, k,
                        f"quantization_config.config_groups.{gname}")
            if s["weight_format"] == "int4":
                s["scale_dtype"] = _narrowest(state.get(f"{name}.weight_scale"))
            if grp["weights"].get("strategy") == "group" and k % s["group_size"]:
                raise UserError(f"{where}: config_groups.{gname}.weights.group_size {s['group_size']} does not "
                                f"divide {name}'s in_features {k}")
            modules[name] = s
            tensors.update(_module(name, s, state, n, k, wfile))
            break
    if not modules:
        raise UserError(f"{where}: quantization_config: no Linear of the model matches a config group's targets")
    kv = _kv(qc, state, wfile)
    leftovers = [key for key in state if any(key.startswith(m + ".") for m in modules)]
    if leftovers:
        raise UserError(f"{wfile}: unexpected tensors {sorted(leftovers)[:5]}")
    tensors.update(state)
    ours = {"quant_method": "llmcompress", "format_version": 1, "method": "compressed-tensors",
            "config": {"kv_cache": kv} if kv else {},
            "modules": dict(sorted(modules.items()))}
    return ours, tensors
