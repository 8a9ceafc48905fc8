"""GGUF export, judged by the libraries that read GGUF: gguf's reader and dequantizer, and transformers' GGUF
loader (which un-permutes q/k for RoPE and rebuilds the tokenizer) against our own quantized model."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from llmcompress.config import QuantizeConfig, WeightQuantConfig, ActivationQuantConfig  # noqa: E402
from llmcompress.errors import UserError  # noqa: E402
from llmcompress.quant.formats import QuantSpec, fake_quantize  # noqa: E402
from llmcompress.export.gguf import GGUF_TYPES, gguf_problem, pack_blocks, write_gguf  # noqa: E402

T = gguf.GGMLQuantizationType


def _sym_g32(fmt: str) -> QuantizeConfig:
    return QuantizeConfig(weights=WeightQuantConfig(format=fmt, symmetric=True, granularity="group", group_size=32,
                                                    scale_dtype="float16"),
                          activations=ActivationQuantConfig(format="none"))


# the artifact layout each GGUF type holds exactly
LAYOUTS = {"q8_0": _sym_g32("int8"), "q4_0": _sym_g32("int4"),
           "q4_1": QuantizeConfig(weights=WeightQuantConfig(format="int4", symmetric=False, zero_point="float",
                                                            granularity="group", group_size=32, scale_dtype="float16"),
                                  activations=ActivationQuantConfig(format="none"))}
Q4_1_SPEC = QuantSpec("uint4", False, "group", 32, "float16", float_zero=True)


@pytest.fixture(scope="module")
def artifact_q4(smollm, tmp_path_factory):
    """An RTN artifact of the embedded default in q4_0's exact layout (sym int4, groups of 32, fp16 scales)."""
    from llmcompress.quant.checkpoint import load_quantized, save_quantized
    from llmcompress.quant.quantize import quantize_model

    model, tok = smollm
    q = copy.deepcopy(model)
    quantize_model(q, LAYOUTS["q4_0"])
    d = tmp_path_factory.mktemp("art_q4")
    save_quantized(q, d, tok, "rtn", {"weights": {}, "kv_cache": {"format": "none"}})
    return d, load_quantized(d, dtype=torch.float32)


@pytest.fixture(scope="module")
def q4_file(artifact_q4, tmp_path_factory):
    d, _ = artifact_q4
    out = tmp_path_factory.mktemp("gguf_q4") / "model.gguf"
    return out, write_gguf(d, out, "q4_0")


def test_pack_blocks_is_what_gguf_dequantizes():
    """Our block packing read back by gguf's own dequantizer: d·q, d·(u − 8), d·u + m, on random codes."""
    g = torch.Generator().manual_seed(0)
    n, k = 6, 96
    d = (torch.rand(n, k // 32, generator=g) + 0.01).half().float().numpy()
    m = (torch.randn(n, k // 32, generator=g)).half().float().numpy()
    q8 = torch.randint(-128, 128, (n, k), generator=g).numpy().astype(np.int8)
    u4 = torch.randint(0, 16, (n, k), generator=g).numpy().astype(np.uint8)
    rep = lambda p: np.repeat(p, 32, axis=1)  # noqa: E731
    cases = {"q8_0": (q8, rep(d) * q8.astype(np.float32)),
             "q4_0": (u4, rep(d) * (u4.astype(np.float32) - 8)),
             "q4_1": (u4, rep(d) * u4.astype(np.float32) + rep(m))}
    for qtype, (codes, want) in cases.items():
        raw = pack_blocks(qtype, codes, d, m)
        got = gguf.quants.dequantize(raw, getattr(T, qtype.upper()))
        assert np.array_equal(got, want.astype(np.float32)), qtype
    with pytest.raises(ValueError, match="fp16"):
        pack_blocks("q4_0", u4, d + 1e-4)


def _artifact_dir(tmp_path, smollm_path, **scheme):
    """A copy of the dense model's config + tokenizer with a one-module quantization_config (no weights)."""
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm_path / f, tmp_path / f)
    cfg = json.loads((smollm_path / "config.json").read_text())
    s = {"weight_format": "int4", "granularity": "group", "group_size": 32, "symmetric": True,
         "scale_dtype": "float16", "act_format": None, "act_dynamic": True, **scheme}
    cfg["quantization_config"] = {"quant_method": "llmcompress", "format_version": 1, "method": "gptq",
                                  "config": {}, "modules": {"model.layers.0.mlp.up_proj": s}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


@pytest.mark.parametrize("qtype,scheme,key", [
    ("q4_0", {"symmetric": False}, "asymmetric"),
    ("q4_0", {"group_size": 128}, "group_size=128"),
    ("q4_0", {"scale_dtype": "float32"}, "scale_dtype=float32"),
    ("q8_0", {}, "int4"),
    ("q4_0", {"act_format": "int8"}, "act_format"),
    ("q4_1", {}, "symmetric"),
    ("q4_1", {"symmetric": False}, "integer zero point"),
])
def test_problem_names_key_and_nearest_layout(tmp_path, smollm_path, qtype, scheme, key):
    d = _artifact_dir(tmp_path, smollm_path, **scheme)
    msg = gguf_problem(d, qtype)
    assert msg is not None and key in msg and "model.layers.0.mlp.up_proj" in msg, msg
    assert "\n" not in msg and "group_size: 32" in msg and qtype in msg
    with pytest.raises(UserError):
        write_gguf(d, tmp_path / "out.gguf", qtype)
    assert not list(tmp_path.glob("*.gguf*"))  # nothing written


def test_problem_on_exact_layouts_and_bad_inputs(tmp_path, smollm_path):
    assert gguf_problem(_artifact_dir(tmp_path, smollm_path), "q4_0") is None
    assert gguf_problem(_artifact_dir(tmp_path, smollm_path, weight_format="int8"), "q8_0") is None
    assert gguf_problem(smollm_path, "q4_1") is None  # dense: the type's own rounding
    assert "q5_k" in gguf_problem(smollm_path, "q5_k") and "q4_0" in gguf_problem(smollm_path, "q5_k")
    (tmp_path / "tokenizer.json").unlink()
    assert "tokenizer.json" in gguf_problem(tmp_path, "q4_0")
    cfg = json.loads((smollm_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    assert "model_type 'gpt2'" in gguf_problem(tmp_path, "q4_0")
    assert set(GGUF_TYPES) == {"q8_0", "q4_0", "q4_1"}


def test_reader_sees_types_shapes_and_metadata(q4_file, smollm_path):
    out, summary = q4_file
    cfg = json.loads((smollm_path / "config.json").read_text())
    r = gguf.GGUFReader(out)
    f = lambda key: r.fields[key].contents()  # noqa: E731
    assert f("general.architecture") == "llama"
    assert f("llama.block_count") == cfg["num_hidden_layers"] == 30
    assert f("llama.attention.head_count") == 9 and f("llama.attention.head_count_kv") == 3
    assert f("llama.rope.dimension_count") == 64
    assert f("tokenizer.ggml.model") == "gpt2" and len(r.fields["tokenizer.ggml.tokens"].data) == 49152
    assert (f("tokenizer.ggml.bos_token_id"), f("tokenizer.ggml.eos_token_id")) == (1, 2)
    assert "<|im_start|>" in f("tokenizer.chat_template")
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["blk.0.attn_q.weight"] == T.Q4_0 and types["blk.29.ffn_down.weight"] == T.Q4_0
    assert types["token_embd.weight"] == T.F32 and types["blk.0.attn_norm.weight"] == T.F32
    assert "output.weight" not in types  # tied embeddings: llama.cpp reuses token_embd
    shapes = {t.name: [int(x) for x in t.shape] for t in r.tensors}
    assert shapes["blk.0.attn_k.weight"] == [576, 192] and shapes["blk.0.ffn_down.weight"] == [1536, 576]
    assert summary["copied"] == 210 and summary["rtn"] == 0 and summary["types"]["Q4_0"] == 210


def test_q4_1_rtn_is_llama_cpp_quantizer_bit_for_bit(smollm):
    """weights.zero_point: float with the minmax observer rounds as ggml's quantize_row_q4_1_ref: the packed
    bytes equal gguf.quants.quantize's (random weights with exact ties and a constant block, and a real layer)."""
    from llmcompress.quant.rtn import quantize_weight

    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 128, generator=g)
    w[0, :32] = torch.round(w[0, :32] * 4) / 4
    w[1, 32:64] = 0.5
    real = smollm[0].model.layers[5].mlp.down_proj.weight.detach()[:64]
    for x in (w, real):
        qw = quantize_weight(x, Q4_1_SPEC)
        raw = pack_blocks("q4_1", qw.codes.numpy(), qw.scale.numpy(), qw.zero_point.numpy())
        assert np.array_equal(raw, gguf.quants.quantize(x.float().numpy(), T.Q4_1))
        assert np.array_equal(qw.dequantize().numpy(), gguf.quants.dequantize(raw, T.Q4_1))


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_stays_on_the_q4_1_grid_and_beats_rtn(act_order):
    """GPTQ with a float offset: Ŵ is a fixed point of the q4_1 quantizer (so it packs without re-rounding), with
    fp16 d and m, and its layer error is below RTN's."""
    from llmcompress.quant.algorithms.gptq import gptq_quantize, layer_error
    from llmcompress.quant.observers import MinMaxObserver
    from llmcompress.quant.rtn import quantize_weight

    g = torch.Generator().manual_seed(2)
    w = torch.randn(32, 192, generator=g)
    x = torch.randn(512, 192, generator=g) * torch.linspace(0.2, 3, 192)
    h = 2 * x.t() @ x / 512
    res = gptq_quantize(w, h, Q4_1_SPEC, MinMaxObserver(Q4_1_SPEC), act_order=act_order, refit_scales=True)
    assert torch.equal(fake_quantize(res.weight, res.scale, res.zero_point, Q4_1_SPEC), res.weight)
    for p in (res.scale, res.zero_point):
        assert torch.equal(p.half().float(), p)
    assert res.error < 0.9 * layer_error(w, quantize_weight(w, Q4_1_SPEC).dequantize(), h)


@pytest.mark.parametrize("qtype", ["q8_0", "q4_1"])
def test_artifact_codes_copied_exactly(smollm, tmp_path, qtype):
    """Read back with gguf's dequantizer (q/k un-permuted): every weight equals our dequantized weight."""
    from llmcompress.quant.checkpoint import save_quantized
    from llmcompress.quant.qlinear import QuantLinear
    from llmcompress.quant.quantize import quantize_model

    model, tok = smollm
    q = copy.deepcopy(model)
    q.model.layers = q.model.layers[:2]  # two layers keep the test fast
    q.config.num_hidden_layers = 2
    quantize_model(q, LAYOUTS[qtype])
    save_quantized(q, tmp_path / "art", tok, "rtn", {"kv_cache": {"format": "none"}})
    assert gguf_problem(tmp_path / "art", qtype) is None
    assert gguf_problem(tmp_path / "art", "q4_0" if qtype != "q4_0" else "q8_0") is not None
    out = tmp_path / f"{qtype}.gguf"
    write_gguf(tmp_path / "art", out, qtype)
    r = gguf.GGUFReader(out)
    by_name = {t.name: t for t in r.tensors}
    for name, mod in q.named_modules():
        if not isinstance(mod, QuantLinear):
            continue
        layer, kind = name.split(".")[2], name.split(".")[-1]
        gname = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                 "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[kind]
        t = by_name[f"blk.{layer}.{gname}.weight"]
        assert t.tensor_type == getattr(T, qtype.upper())
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        heads = {"q_proj": 9, "k_proj": 3}.get(kind)
        if heads:  # llama.cpp's RoPE row order back to Hugging Face's
            w = w.reshape(heads, w.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
        assert np.array_equal(w, mod.dequantized_weight().numpy()), name


def test_dense_model_rounded_by_llama_cpp_rule(smollm_path, tmp_path):
    """A dense directory is quantized with llama.cpp's own rule: the file's bytes are gguf.quants.quantize's."""
    from safetensors.torch import load_file

    out = tmp_path / "dense.gguf"
    summary = write_gguf(smollm_path, out, "q4_1")
    assert summary["rtn"] == 210 and summary["copied"] == 0
    state = load_file(str(smollm_path / "model.safetensors"))
    r = gguf.GGUFReader(out)
    by_name = {t.name: t for t in r.tensors}
    for hf, g in (("model.layers.3.mlp.down_proj.weight", "blk.3.ffn_down.weight"),
                  ("model.layers.7.self_attn.v_proj.weight", "blk.7.attn_v.weight")):
        want = gguf.quants.quantize(state[hf].float().numpy(), T.Q4_1)
        assert by_name[g].tensor_type == T.Q4_1 and np.array_equal(np.asarray(by_name[g].data), want)


def test_transformers_gguf_loader_equals_our_model(q4_file, artifact_q4, smollm):
    """transformers' GGUF loader: dequantized weights equal ours bit for bit, the tokenizer encodes alike, and
    perplexity on WikiText-2 windows matches ours within 0.2%."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmcompress.data import load_text
    from llmcompress.eval.perplexity import perplexity
    from llmcompress.quant.qlinear import QuantLinear

    out, _ = q4_file
    _, ours = artifact_q4
    _, tok = smollm
    theirs = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32).eval()
    their_tok = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    state = theirs.state_dict()
    for name, mod in ours.named_modules():
        if isinstance(mod, QuantLinear):
            assert torch.equal(state[f"{name}.weight"], mod.dequantized_weight()), name
    assert torch.equal(state["model.embed_tokens.weight"], ours.model.embed_tokens.weight)
    text = load_text("builtin:wikitext2_test")
    sample = text[:4000]
    assert their_tok(sample)["input_ids"] == tok(sample)["input_ids"]
    ppl_ours = perplexity(ours, tok, text, seq_len=512, max_tokens=1024)["ppl"]
    ppl_theirs = perplexity(theirs, tok, text, seq_len=512, max_tokens=1024)["ppl"]
    assert abs(ppl_theirs / ppl_ours - 1) < 0.002, (ppl_ours, ppl_theirs)
