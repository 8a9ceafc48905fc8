"""GGUF export: one .gguf file that llama.cpp (and transformers' GGUF loader) runs, from a quantize artifact or
a dense model directory.

Block formats written (ggml's block of 32 consecutive inputs of one row, scale d and offset m stored as fp16):

  q8_0   x = d · q            q int8         (34 bytes a block)
  q4_0   x = d · (u − 8)      u 0..15        (18 bytes: d, then 16 bytes; byte j = u[j] | u[j + 16] << 4)
  q4_1   x = d · u + m        u 0..15        (20 bytes: d, m, then the nibbles as q4_0)

A quantize artifact whose weights already lie on the type's grid is copied code for code and scale for scale
(no re-rounding): symmetric int8 groups of 32 with fp16 scales are q8_0 (d = s, q = q); symmetric int4 groups of
32 with fp16 scales are q4_0 (d = s, u = q + 8); asymmetric int4 groups of 32 with a float zero point
(weights.zero_point: float, fp16) are q4_1 (d = s, m = the offset). GPTQ / AWQ run with that layout therefore reach llama.cpp as
they were optimised. A dense model (or an artifact's Linears left in float) are rounded by llama.cpp's own
quantizer (gguf.quants, a bit-exact port of ggml-quants.c). Embeddings, lm_head and norms stay in float (F32,
or F16/BF16 when the model is stored so), as they are in our artifacts.

llama.cpp computes RoPE on interleaved pairs, Hugging Face Llama on halves: its converter permutes the rows of
q_proj and k_proj (per head, [2, d/2] -> [d/2, 2]) and readers (transformers' GGUF loader) undo it. Blocks run
along a row, so the permutation moves whole rows of blocks and never touches a code.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np
import torch

GGUF_TYPES = ("q8_0", "q4_0", "q4_1")
BLOCK = 32
# The artifact layout (quantization_config.modules scheme) that each type holds exactly, for copying codes.
_EXACT_SCHEME = {"q8_0": {"weight_format": "int8", "symmetric": True, "float_zero": False},
                 "q4_0": {"weight_format": "int4", "symmetric": True, "float_zero": False},
                 "q4_1": {"weight_format": "int4", "symmetric": False, "float_zero": True}}
_NEAREST = {"q8_0": "weights: {format: int8, symmetric: true, granularity: group, group_size: 32, "
                    "scale_dtype: float16}",
            "q4_0": "weights: {format: int4, symmetric: true, granularity: group, group_size: 32, "
                    "scale_dtype: float16}",
            "q4_1": "weights: {format: int4, symmetric: false, zero_point: float, granularity: group, "
                    "group_size: 32, scale_dtype: float16}"}
_FLOAT_TYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def _ggml_type(qtype: str):
    import gguf

    return {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0,
            "q4_1": gguf.GGMLQuantizationType.Q4_1}[qtype]


# ------------------------------------------------------------------------------------------ checks

def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _tokenizer_problem(d: Path) -> Optional[str]:
    tj = _read_json(d / "tokenizer.json")
    if tj is None:
        return f"{d / 'tokenizer.json'}: missing or unreadable; GGUF export writes the tokenizer and needs it"
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        return (f"{d / 'tokenizer.json'}: model.type {model.get('type')!r}: GGUF export writes byte-level BPE "
                f"tokenizers only (GPT-2 style, as Llama 3 / SmolLM use)")
    pre = tj.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if len(parts) != 1 or parts[0].get("type") != "ByteLevel" or not parts[0].get("use_regex", True):
        return (f"{d / 'tokenizer.json'}: pre_tokenizer: only a single ByteLevel pre-tokenizer with the GPT-2 "
                f"regex maps onto a llama.cpp pre-tokenizer ('gpt-2'); got {json.dumps(pre)[:80]}")
    norm = tj.get("normalizer")
    if norm and not (norm.get("type") == "Sequence" and not norm.get("normalizers")):
        return f"{d / 'tokenizer.json'}: normalizer {norm.get('type')!r}: llama.cpp's BPE has no normalizer"
    return None


def gguf_problem(artifact_dir: Path, qtype: str) -> Optional[str]:
    """One line saying why `artifact_dir` cannot be written as GGUF `qtype` (naming the key and the nearest
    layout that works), or None. Reads config.json and tokenizer.json only."""
    d = Path(artifact_dir)
    if qtype not in GGUF_TYPES:
        return f"gguf.type: {qtype!r} is not supported; choose one of {', '.join(GGUF_TYPES)}"
    cfg = _read_json(d / "config.json")
    if cfg is None:
        return f"{d / 'config.json'}: missing or not JSON (not a model directory)"
    if cfg.get("model_type") not in ("llama", "mistral"):
        return (f"{d / 'config.json'}: model_type {cfg.get('model_type')!r}: GGUF export writes Llama-architecture "
                f"models (model_type llama)")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            return f"{d / 'config.json'}: {key}: true: GGUF export writes Llama models without Linear biases"
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        return (f"{d / 'config.json'}: rope_parameters.rope_type {rope.get('rope_type')!r}: GGUF export writes "
                f"plain RoPE only (rope_type default)")
    for key in ("hidden_size", "intermediate_size"):
        if int(cfg.get(key, 0)) % BLOCK:
            return (f"{d / 'config.json'}: {key} {cfg.get(key)} is not a multiple of {BLOCK}, the block size of "
                    f"{qtype}")
    problem = _tokenizer_problem(d)
    if problem:
        return problem
    qc = cfg.get("quantization_config")
    if qc is None:
        return None
    if qc.get("quant_method") != "llmcompress":
        return (f"{d / 'config.json'}: quantization_config.quant_method {qc.get('quant_method')!r}: only llmc "
                f"quantize artifacts or dense models can be written as GGUF")
    kv = (qc.get("config") or {}).get("kv_cache") or {}
    if kv.get("format", "none") != "none":
        return (f"{d / 'config.json'}: quantization_config.config.kv_cache.format {kv.get('format')!r}: llama.cpp "
                f"chooses its KV-cache type at run time (--cache-type-k); quantize with kv_cache.format: none")
    for name, s in sorted((qc.get("modules") or {}).items()):
        if s.get("act_format") is not None:
            return (f"{d / 'config.json'}: quantization_config.modules.{name}.act_format {s.get('act_format')!r}: "
                    f"GGUF stores weights only; nearest that works for {qtype}: activations: {{format: none}} with "
                    f"{_NEAREST[qtype]}")
        want = _EXACT_SCHEME[qtype]
        ok = (s.get("weight_format") == want["weight_format"] and bool(s.get("symmetric")) == want["symmetric"]
              and bool(s.get("float_zero", False)) == want["float_zero"]
              and s.get("granularity") == "group" and s.get("group_size") == BLOCK
              and s.get("scale_dtype") == "float16")
        if not ok:
            zero = "" if s.get("symmetric") else (" float zero point" if s.get("float_zero") else " integer zero point")
            got = (f"{s.get('weight_format')} {'symmetric' if s.get('symmetric') else 'asymmetric'}{zero} "
                   f"{s.get('granularity')} group_size={s.get('group_size')} scale_dtype={s.get('scale_dtype')}")
            return (f"{d / 'config.json'}: quantization_config.modules.{name}: {got} is not on the {qtype} grid "
                    f"(copied without re-rounding only from {_NEAREST[qtype]})")
    return None


# ------------------------------------------------------------------------------------------ blocks

def _nibbles(u: np.ndarray) -> np.ndarray:
    """u [N, K] codes 0..15 -> [N, K/32, 16] bytes, ggml's order: byte j of a block = u[j] | u[j + 16] << 4."""
    n, k = u.shape
    b = u.reshape(n, k // BLOCK, 2, BLOCK // 2).astype(np.uint8)
    return b[:, :, 0] | (b[:, :, 1] << np.uint8(4))


def _fp16_bytes(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.astype(np.float16)).view(np.uint8).reshape(*x.shape[:2], 2)


def pack_blocks(qtype: str, codes: np.ndarray, d: np.ndarray, m: Optional[np.ndarray] = None) -> np.ndarray:
    """Codes [N, K] (q8_0: int8 q; q4_0 / q4_1: uint8 u) with per-block d (and m) [N, K/32] exactly
    representable in fp16 -> the tensor's bytes [N, K/32 · block bytes]."""
    n, k = codes.shape
    for p in (d, m):
        if p is not None and not np.array_equal(p.astype(np.float16).astype(np.float32), p.astype(np.float32)):
            raise ValueError("block scales / offsets are not fp16 values: they would be re-rounded")
    if qtype == "q8_0":
        q = codes.astype(np.int8).view(np.uint8).reshape(n, k // BLOCK, BLOCK)
        parts = [_fp16_bytes(d), q]
    elif qtype == "q4_0":
        parts = [_fp16_bytes(d), _nibbles(codes)]
    else:
        parts = [_fp16_bytes(d), _fp16_bytes(m), _nibbles(codes)]
    return np.concatenate(parts, axis=-1).reshape(n, -1)


def _quantized_bytes(module, qtype: str) -> np.ndarray:
    """A QuantLinear on the type's grid -> its GGUF bytes, codes and scales copied."""
    from llmcompress.kernels.reference import unpack_int4

    if qtype in ("q4_0", "q4_1"):
        u = unpack_int4(module.qweight, module.in_features).numpy()
        m = module.zeros.float().numpy() if qtype == "q4_1" else None
        return pack_blocks(qtype, u, module.scales.float().numpy(), m)
    return pack_blocks(qtype, module.w_q.numpy(), module.w_scale.float().numpy())


def _rtn_bytes(w: torch.Tensor, qtype: str) -> np.ndarray:
    """llama.cpp's own round-to-nearest (gguf.quants ports ggml-quants.c bit for bit)."""
    import gguf

    return gguf.quants.quantize(w.detach().float().numpy(), _ggml_type(qtype))


def _llama_rope_permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of q_proj / k_proj in Hugging Face order -> llama.cpp's (pairs interleaved within each head)."""
    n = rows.shape[0]
    return rows.reshape(n_head, 2, n // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


# ------------------------------------------------------------------------------------------ tokenizer

def _add_tokenizer(writer, d: Path, cfg: dict) -> dict:
    import gguf

    tj = json.loads((d / "tokenizer.json").read_text())
    tc = _read_json(d / "tokenizer_config.json") or {}
    vocab: dict[str, int] = dict(tj["model"]["vocab"])
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    for i, a in added.items():
        vocab[a["content"]] = i
    n_vocab = max(int(cfg.get("vocab_size") or 0), max(vocab.values()) + 1)
    by_id: dict[int, str] = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:  # an embedding row no token uses (vocab padded for the matmul)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # the GPT-2 regex, what a single ByteLevel(use_regex) pre-tokenizer runs
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    # special ids: config.json first (the model's own record), then tokenizer_config's token strings
    ids = {}
    for kind in ("bos", "eos", "pad", "unk"):
        i = cfg.get(f"{kind}_token_id")
        if isinstance(i, list):
            i = i[0] if i else None
        if i is None:
            tok = tc.get(f"{kind}_token")
            tok = tok.get("content") if isinstance(tok, dict) else tok
            i = vocab.get(tok) if tok is not None else None
        if i is not None:
            ids[kind] = int(i)
    for kind, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("pad", writer.add_pad_token_id), ("unk", writer.add_unk_token_id)):
        if kind in ids:
            add(ids[kind])
    writer.add_add_bos_token(bool(tc.get("add_bos_token", False)))
    template = None
    if (d / "chat_template.jinja").is_file():
        template = (d / "chat_template.jinja").read_text()
    elif isinstance(tc.get("chat_template"), str):
        template = tc["chat_template"]
    if template:
        writer.add_chat_template(template)
    return {"tokens": len(tokens), "merges": len(merges), "special_ids": ids, "chat_template": bool(template)}


# ------------------------------------------------------------------------------------------ the file

def _load(d: Path):
    """(model, config dict, quantized?) in float32 on CPU: a quantize artifact through load_quantized (codes as
    stored), a dense model directory through transformers."""
    from llmcompress.models import is_quantized_dir

    cfg = json.loads((d / "config.json").read_text())
    if is_quantized_dir(d):
        from llmcompress.quant.checkpoint import load_quantized

        return load_quantized(d, dtype=torch.float32), cfg, True
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval(), cfg, False


def _float_array(t: torch.Tensor, store: str):
    import gguf

    a = t.detach().float().numpy()
    if a.ndim == 1 or store == "F32":
        return a, None
    if store == "F16":
        return a.astype(np.float16), None
    return gguf.quants.quantize(a, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16


def write_gguf(artifact_dir: Path, out_file: Path, qtype: str) -> dict:
    """Write `out_file` (one .gguf) from a quantize artifact or dense model directory; returns a summary
    {file, type, tensors, types, bytes, copied, rtn, float, tokenizer}. Raises UserError on what
    gguf_problem refuses; nothing is left at out_file unless the whole file was written."""
    import gguf

    from llmcompress.errors import UserError
    from llmcompress.quant.qlinear import QuantLinear

    d, out_file = Path(artifact_dir), Path(out_file)
    problem = gguf_problem(d, qtype)
    if problem:
        raise UserError(problem)
    model, cfg, quantized = _load(d)
    n_layers, n_head = int(cfg["num_hidden_layers"]), int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    hidden = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // n_head)
    rope = cfg.get("rope_parameters") or {}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    store = _FLOAT_TYPES.get(str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"), "F32")
    ggml_type = _ggml_type(qtype)

    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, "llama")
    writer.add_name(str(cfg.get("_name_or_path") or cfg.get("_model_name_or_path") or d.name))
    writer.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(hidden)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(int(cfg["intermediate_size"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    if head_dim != hidden // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(int(cfg["vocab_size"]))
    writer.add_file_type({"q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
                          "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}[qtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tok_info = _add_tokenizer(writer, d, cfg)

    tied = bool(cfg.get("tie_word_embeddings", False))
    modules = dict(model.named_modules())
    counts, types = Counter(), Counter()
    state = model.state_dict()
    emitted = set()
    for key in state:
        mod_name, _, leaf = key.rpartition(".")
        module = modules.get(mod_name)
        if tied and key == "lm_head.weight":
            continue
        if isinstance(module, QuantLinear):
            if leaf != "qweight" and leaf != "w_q":
                continue  # scales/zeros travel inside the blocks
            hf_name = f"{mod_name}.weight"
            data, raw = _quantized_bytes(module, qtype), ggml_type
            counts["copied"] += 1
        elif isinstance(module, torch.nn.Linear) and ".layers." in key and leaf == "weight":
            hf_name, data, raw = key, _rtn_bytes(state[key], qtype), ggml_type
            counts["rtn"] += 1
        else:
            hf_name = key
            data, raw = _float_array(state[key], store)
            counts["float"] += 1
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"{d}: tensor {hf_name!r} has no GGUF name for the llama architecture")
        if hf_name.endswith("q_proj.weight"):
            data = _llama_rope_permute(data, n_head)
        elif hf_name.endswith("k_proj.weight"):
            data = _llama_rope_permute(data, n_kv)
        writer.add_tensor(name, np.ascontiguousarray(data), raw_dtype=raw)
        types[(raw.name if raw is not None else {np.float32: "F32", np.float16: "F16"}[data.dtype.type])] += 1
        emitted.add(name)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out_file)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {"file": str(out_file), "type": qtype, "source": "quantized artifact" if quantized else "dense model",
            "tensors": len(emitted), "types": dict(sorted(types.items())), "bytes": out_file.stat().st_size,
            "copied": counts["copied"], "rtn": counts["rtn"], "float": counts["float"], "tokenizer": tok_info}
