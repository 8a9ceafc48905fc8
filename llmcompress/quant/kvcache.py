"""KV-cache quantization: keys and values stored as INT8 or FP8 E4M3 with static scales from calibration, one per
tensor or one per KV head, for every attention layer.

Where it applies: on the outputs of k_proj and v_proj (or the k and v column blocks of a fused qkv_proj, Phi-3),
through forward hooks that quantize and dequantize them,
so the attention (and the cache during generation) only ever sees what a quantized cache holds. Values are
cached exactly as v_proj produces them; keys are quantized before the rotary embedding, as KVQuant (Hooper et
al., 2024, "pre-RoPE key quantization") stores them: the cache holds Q(k) and RoPE is applied on read, which is
exactly RoPE(Q(k)), the key the attention uses here. Pre-RoPE keys keep their per-channel outlier structure,
which rotation would smear across positions. Because the hooks sit on the projections, prefill, perplexity and
token-by-token decoding all see the same quantized K/V, with or without a cache object.

Scales (symmetric, z = 0):  int8  s = amax / 127.5 (formats' convention; ±amax round to ±127 and ±128→127)
                            fp8   s = amax / 448   (saturating cast)
Recorded in the checkpoint's quantization_config["kv_cache"] = {format, granularity, scales: {attention module:
{"k": [...], "v": [...]}}} and re-applied on load by `apply_kv_quant`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn

from .formats import QuantSpec, compute_qparams, fake_quantize

KV_FORMATS = {"int8": "int8", "fp8": "fp8_e4m3"}


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{name: attention module} for every module with k_proj and v_proj children (Llama, Mistral, Qwen2, ...) or a
    fused qkv_proj (Phi-3)."""
    return {name: m for name, m in model.named_modules()
            if (hasattr(m, "k_proj") and hasattr(m, "v_proj")) or isinstance(getattr(m, "qkv_proj", None), nn.Module)}


def kv_sources(attn: nn.Module) -> list[tuple[nn.Module, dict[str, slice]]]:
    """The modules whose outputs hold the keys and values, each with {"k" | "v": its slice of the last dim}:
    k_proj and v_proj whole, or the k and v column blocks of a fused qkv_proj ([q | k | v], as Phi-3 splits it)."""
    if hasattr(attn, "k_proj"):
        return [(attn.k_proj, {"k": slice(None)}), (attn.v_proj, {"v": slice(None)})]
    q = attn.config.num_attention_heads * attn.head_dim
    kv = attn.config.num_key_value_heads * attn.head_dim
    return [(attn.qkv_proj, {"k": slice(q, q + kv), "v": slice(q + kv, q + 2 * kv)})]


def _heads(m: nn.Module) -> int:
    return int(m.config.num_key_value_heads) if hasattr(m, "config") else 1


def _spec(fmt: str, granularity: str) -> QuantSpec:
    if fmt not in KV_FORMATS:
        raise ValueError(f"kv_cache.format must be one of {', '.join(KV_FORMATS)}, got {fmt!r}")
    return QuantSpec(KV_FORMATS[fmt], True, "channel" if granularity == "head" else "tensor")


def _by_head(y: torch.Tensor, heads: int) -> torch.Tensor:
    """[..., H·D] -> [H, tokens, D] (heads first, so a per-head scale broadcasts as a 'channel' scale)."""
    return y.reshape(-1, heads, y.shape[-1] // heads).transpose(0, 1)


class KVObserver:
    """Running per-head max |k| and |v| of every attention layer (over real tokens only, if a mask is set)."""

    def __init__(self, model: nn.Module):
        self.modules = attention_modules(model)
        self.amax: dict[str, dict[str, torch.Tensor]] = {}
        self.mask: Optional[torch.Tensor] = None  # bool [batch, seq] of the batch being run

    @contextmanager
    def watching(self, names: Optional[list[str]] = None) -> Iterator["KVObserver"]:
        handles = []
        for name, attn in self.modules.items():
            if names is not None and name not in names:
                continue
            for proj, slices in kv_sources(attn):
                handles.append(proj.register_forward_hook(self._hook(name, slices, _heads(attn))))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def _hook(self, name: str, slices: dict[str, slice], heads: int):
        def hook(module, args, out):
            y = out if self.mask is None else out[self.mask.to(out.device)]
            for kind, sl in slices.items():
                a = _by_head(y[..., sl].detach().float(), heads).abs().amax(dim=(1, 2))
                prev = self.amax.setdefault(name, {}).get(kind)
                self.amax[name][kind] = a if prev is None else torch.maximum(prev, a)
        return hook

    def scales(self, fmt: str, granularity: str) -> dict[str, dict[str, torch.Tensor]]:
        """{attention name: {"k": scale, "v": scale}}: shape [H] per head or [] per tensor."""
        spec = _spec(fmt, granularity)
        out = {}
        for name, kv in self.amax.items():
            out[name] = {}
            for kind, a in kv.items():
                a = a if granularity == "head" else a.amax()
                out[name][kind] = compute_qparams(-a, a, spec)[0].cpu()
        return out


def apply_kv_quant(model: nn.Module, fmt: str, granularity: str,
                   scales: dict[str, dict[str, torch.Tensor]]) -> list:
    """Fake-quantize k_proj/v_proj outputs with the given static scales; returns the hook handles.
    Remembers the setting on the model (`model.llmc_kv_cache`) so a checkpoint can record it."""
    spec = _spec(fmt, granularity)
    modules = attention_modules(model)
    missing = sorted(set(modules) - set(scales))
    if missing:
        raise ValueError(f"kv_cache scales missing for {len(missing)} attention module(s), e.g. {missing[0]}")
    handles = []
    for name, attn in modules.items():
        heads = _heads(attn)
        for proj, slices in kv_sources(attn):
            s = {kind: torch.as_tensor(scales[name][kind], dtype=torch.float32) for kind in slices}
            handles.append(proj.register_forward_hook(_quant_hook(s, slices, spec, heads)))
    model.llmc_kv_cache = {"format": fmt, "granularity": granularity,
                           "scales": {n: {k: torch.as_tensor(v).float().reshape(-1).tolist() for k, v in kv.items()}
                                      for n, kv in sorted(scales.items())}}
    return handles


def _quant_hook(scales: dict[str, torch.Tensor], slices: dict[str, slice], spec: QuantSpec, heads: int):
    scales = {k: s.reshape(()) if spec.granularity == "tensor" else s.reshape(-1) for k, s in scales.items()}

    def quant(y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        q = fake_quantize(_by_head(y.float(), heads), s.to(y.device), None, spec)
        return q.transpose(0, 1).reshape(y.shape).to(y.dtype)

    def hook(module, args, out):
        if len(slices) == 1 and next(iter(slices.values())) == slice(None):
            return quant(out, scales[next(iter(slices))])
        out = out.clone()  # a fused qkv_proj: only its k and v column blocks are cached
        for kind, sl in slices.items():
            out[..., sl] = quant(out[..., sl], scales[kind])
        return out
    return hook


def kv_config(model: nn.Module) -> Optional[dict]:
    """What to record in quantization_config["kv_cache"] (None if the KV cache is not quantized)."""
    return getattr(model, "llmc_kv_cache", None)


def restore_kv_quant(model: nn.Module, recorded: Optional[dict]) -> None:
    """Re-apply a recorded quantization_config["kv_cache"] to a freshly loaded model (no-op for None)."""
    if not recorded or recorded.get("format", "none") == "none" or "scales" not in recorded:
        return
    scales = {n: {k: torch.tensor(v, dtype=torch.float32) for k, v in kv.items()}
              for n, kv in recorded["scales"].items()}
    apply_kv_quant(model, recorded["format"], recorded["granularity"], scales)
