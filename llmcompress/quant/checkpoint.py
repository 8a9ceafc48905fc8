"""The quantized checkpoint: a Hugging Face style directory that `load_quantized` turns back into a model.

    config.json              the model's config plus `quantization_config` (below)
    generation_config.json, tokenizer files
    llmcompress.safetensors  every tensor of the model's state dict (tied weights stored once); the
                             QuantLinear buffers of each quantized module `<name>`:
        int8  <name>.w_q int8 [N, K]; <name>.w_scale float32 [N] (per channel; per tensor is stored
              broadcast to [N]) or [N, G] (per group); <name>.w_zero int8, same shape (asymmetric only)
        int4  <name>.qweight uint8 [N, ceil(K/2)]: element k of row n in byte k // 2, low nibble for even k,
              high nibble for odd k, unsigned codes u in 0..15; <name>.scales [N, G], G = ceil(K / group_size),
              dtype = scale_dtype; <name>.zeros uint8 [N, G] codes (asymmetric only; symmetric means z = 8,
              i.e. signed q in −8..7 stored as u = q + 8). The last group may be shorter than group_size.
        fp8   <name>.w_q float8_e4m3fn [N, K]; <name>.w_scale float32 [N]
        all   <name>.input_scale float32 [] (static activation scale, x_q = clamp(round(x / s), ±127));
              <name>.bias as in the float model.
    w = scale · (code − zero), y = x Wᵀ + b.

`quantization_config` (JSON):
    quant_method  "llmcompress"        format_version 1
    method        the algorithm that chose the codes ("rtn", later "gptq", "awq")
    config        the quantize stage's weights/activations/kv_cache settings, as given
    modules       {module name: scheme} for every quantized Linear; a scheme is
                  {weight_format, granularity, group_size, symmetric, scale_dtype, act_format, act_dynamic}
    experts       (MoE models only) {experts module: {num_experts, hidden_dim, intermediate_dim, act}}: each
                  rebuilt as a QuantExperts (experts.py) whose per-expert weights `<experts>.gate_up_proj.<e>`
                  and `<experts>.down_proj.<e>` are listed in `modules` and stored like any quantized Linear
Only safetensors and JSON are written (no pickle); equal inputs give byte-identical files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llmcompress.errors import UserError
from llmcompress.models import QUANT_METHOD

from .experts import experts_config, restore_experts
from .kvcache import restore_kv_quant
from .qlinear import QuantLinear, Scheme


FORMAT_VERSION = 1
# Not model.safetensors: plain transformers (and vLLM) know no "llmcompress" quant_method, skip it with a warning
# and would fill every Linear with random weights (ppl 1e16) from a file they half understand. Without a
# model.safetensors they refuse ("no file named model.safetensors"). `llmc export` writes what they load.
WEIGHTS_FILE = "llmcompress.safetensors"
LEGACY_WEIGHTS_FILE = "model.safetensors"  # checkpoints written before the rename
# quantization_config.quant_method of other tools' checkpoints that load_quantized also reads
FOREIGN_METHODS = ("compressed-tensors", "gptq", "awq")


def quantization_config(modules: dict[str, Scheme], method: str = "rtn", config: Optional[dict] = None) -> dict:
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "method": method,
            "config": config or {}, "modules": {name: s.to_dict() for name, s in sorted(modules.items())}}


def quantized_modules(model: nn.Module) -> dict[str, Scheme]:
    return {name: m.scheme for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each shared tensor (tied embeddings) kept once, under its first name."""
    state, seen = {}, set()
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape)) if t.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen.add(key)
        state[name] = t.detach().contiguous().cpu()
    return state


def save_quantized(model: nn.Module, out_dir: Union[str, Path], tokenizer=None, method: str = "rtn",
                   config: Optional[dict] = None, dtype: Optional[torch.dtype] = None) -> dict:
    """Write `model` (with QuantLinear modules swapped in) as a checkpoint; returns its quantization_config.
    `dtype`: what the unquantized tensors (parameters outside QuantLinear, QuantLinear biases) are stored in,
    recorded as config.json's dtype; None keeps the model's own. Codes and scales keep their formats' dtypes."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = _unique_state(model)
    if dtype is not None:
        dense = {n for n, _ in model.named_parameters()} | {
            f"{n}.bias" for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.bias is not None}
        state.update({n: t.to(dtype) for n, t in state.items() if n in dense and t.is_floating_point()})
    bad = [name for name, t in state.items() if t.is_floating_point() and not torch.isfinite(t.float()).all()]
    if bad:
        raise UserError(f"refusing to write a checkpoint with NaN/Inf in: {', '.join(bad[:10])}"
                        + (f" and {len(bad) - 10} more" if len(bad) > 10 else ""))
    qc = quantization_config(quantized_modules(model), method, config)
    if experts_config(model):
        qc["experts"] = experts_config(model)
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    if dtype is not None:
        cfg["dtype"] = str(dtype).removeprefix("torch.")
    cfg["quantization_config"] = qc
    # one metadata key only: safetensors writes a multi-key mapping in hash order, so bytes would differ per run
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return qc


def weights_file(path: Union[str, Path]) -> Path:
    """The tensors file of one of our checkpoints (llmcompress.safetensors, or model.safetensors if older)."""
    p = Path(path) / WEIGHTS_FILE
    return p if p.is_file() or not (Path(path) / LEGACY_WEIGHTS_FILE).is_file() else Path(path) / LEGACY_WEIGHTS_FILE


def read_quantization_config(path: Union[str, Path]) -> dict:
    p = Path(path) / "config.json"
    if not p.is_file():
        raise UserError(f"{p}: not a model directory (no config.json)")
    try:
        qc = json.loads(p.read_text()).get("quantization_config")
    except json.JSONDecodeError as e:
        raise UserError(f"{p}: invalid JSON ({e})") from None
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        raise UserError(f"{p}: quantization_config.quant_method: expected {QUANT_METHOD!r} (not an llmc "
                        f"quantized checkpoint)")
    if qc.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{p}: quantization_config.format_version: expected {FORMAT_VERSION}, "
                        f"got {qc.get('format_version')!r}")
    return qc


def swap_in(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted `name` (gpt-fast style module swapping)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def load_quantized(path: Union[str, Path], device: Union[str, torch.device] = "cpu",
                   dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Rebuild the model of a checkpoint written by `save_quantized` (or a compressed-tensors, GPTQ or AWQ
    checkpoint, read as ours): float modules in `dtype` (default: the dtype recorded in config.json), QuantLinear
    modules with the stored tensors, bit for bit."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    path = Path(path)
    raw = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    foreign = (raw.get("quantization_config") or {}).get("quant_method") in FOREIGN_METHODS
    if foreign:  # another tool's layout, read as ours (llmcompress/export/)
        from llmcompress.export.imports import translate

        qc, state = translate(path, raw)
    else:
        qc = read_quantization_config(path)
        state = None
    raw.pop("quantization_config")
    model_type = raw.pop("model_type", None)
    if model_type is None:
        raise UserError(f"{path / 'config.json'}: model_type missing")
    config = AutoConfig.for_model(model_type, **raw)
    if dtype is None:
        dtype = getattr(torch, str(raw.get("dtype") or raw.get("torch_dtype") or "float32"))
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    restore_experts(model, qc.get("experts", {}))
    for name, scheme_dict in qc["modules"].items():
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise UserError(f"{path / 'config.json'}: quantization_config.modules: no module {name!r} in the "
                            f"model") from None
        scheme = Scheme.from_dict(scheme_dict)
        swap_in(model, name, QuantLinear(linear.in_features, linear.out_features, scheme,
                                         bias=linear.bias is not None, dtype=dtype))
    wfile = path / LEGACY_WEIGHTS_FILE if foreign else weights_file(path)
    if state is None:
        state = load_file(str(wfile))
    for key in [k for k in state if k.endswith(".input_perm")]:  # GPTQ act-order read as ours (gptq_import.py)
        permute_inputs(model.get_submodule(key.rsplit(".", 1)[0]), state.pop(key))
    expected = set(model.state_dict())
    missing = expected - set(state)
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise UserError(f"{wfile}: unexpected tensors {result.unexpected_keys[:5]}")
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    still_missing = [k for k in missing if not _tied_key(model, k)]
    if still_missing:
        raise UserError(f"{wfile}: missing tensors {sorted(still_missing)[:5]}")
    # assign=True keeps stored dtypes; float parameters follow the requested compute dtype
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            if mod.bias is not None:
                mod.bias = mod.bias.to(dtype)
            continue
        for pname, p in list(mod.named_parameters(recurse=False)):
            if p.dtype != dtype and p.is_floating_point():
                setattr(mod, pname, nn.Parameter(p.to(dtype), requires_grad=False))
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    restore_kv_quant(model, qc.get("config", {}).get("kv_cache"))  # KV-cache scales recorded by kvcache.py
    return model.to(device).eval()


def permute_inputs(module: nn.Module, perm: torch.Tensor) -> None:
    """The module's stored columns are the input columns in the order `perm`: it computes on x[..., perm]."""
    module.register_buffer("input_perm", perm.long(), persistent=False)
    module.register_forward_pre_hook(lambda m, args: (args[0].index_select(-1, m.input_perm), *args[1:]))


def _tied_key(model: nn.Module, key: str) -> bool:
    """True if `key` is a tensor shared with another key (tied embeddings), restored by tie_weights()."""
    state = model.state_dict()
    t = state.get(key)
    return t is not None and any(o is not t and o.data_ptr() == t.data_ptr() for k, o in state.items() if k != key)
