"""compressed-tensors export and import, with the compressed-tensors library and plain transformers as the oracle.

- the library's own compressors, given our dequantized weights and our scales, write exactly the tensors we wrote
  (names, dtypes, shapes, packed bits), and its decompression of ours gives our float weights bit for bit;
- the library serialises our quantization_config unchanged, and its presets (W8A8, FP8_DYNAMIC, W4A16) are ours;
- plain transformers, in a process that never imports llmcompress, loads the export with logits within 1e-3
  relative of ours and WikiText-2 perplexity within 0.2%;
- round trip: a checkpoint written by the library's compressor loads in our load_quantized bit for bit.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _export_cli import error_line

from llmcompress.config import ActivationQuantConfig, KVCacheQuantConfig, QuantizeConfig, WeightQuantConfig
from llmcompress.export import compressed_tensors as ct
from llmcompress.quant.checkpoint import load_quantized, save_quantized
from llmcompress.quant.qlinear import QuantLinear
from llmcompress.quant.quantize import quantize_model

compressed_tensors = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationScheme, preset_name_to_scheme  # noqa: E402

HERE = Path(__file__).parent
FEW = ["model.layers.0.*", "model.layers.1.*"]  # layout tests: two decoder layers are every Linear shape
SCHEMES = {
    "w8a8": dict(w=dict(format="int8", granularity="channel"), a=dict(format="int8")),
    "w4g64": dict(w=dict(format="int4", granularity="group", group_size=64), a=dict(format="none")),
    "w4g64_asym": dict(w=dict(format="int4", granularity="group", group_size=64, symmetric=False),
                       a=dict(format="none"), include=FEW),
    "w4_channel_asym": dict(w=dict(format="int4", granularity="channel", symmetric=False), a=dict(format="none"),
                            include=FEW),
    "w8a16_g64_asym": dict(w=dict(format="int8", granularity="group", group_size=64, symmetric=False),
                           a=dict(format="none"), include=FEW),
    "w8a16_tensor": dict(w=dict(format="int8", granularity="tensor"), a=dict(format="none"), include=FEW),
    "fp8": dict(w=dict(format="fp8", granularity="channel"), a=dict(format="fp8"), include=FEW),
}


def _quantize(smollm, root: Path, name: str, w: dict, a: dict, include=("*",), **kw) -> Path:
    model, tok = smollm
    cfg = QuantizeConfig(weights=WeightQuantConfig(**w), activations=ActivationQuantConfig(**a),
                         include=list(include), **kw)
    qmodel = copy.deepcopy(model)
    quantize_model(qmodel, cfg, tokenizer=tok)
    out = root / name
    save_quantized(qmodel, out, tok, "rtn", {"weights": w, "activations": a,
                                             "kv_cache": getattr(qmodel, "llmc_kv_cache", None)})
    return out


class _Lazy(dict):
    """name -> path, each made on first use (a test needing two checkpoints does not wait for all of them)."""

    def __init__(self, make, names):
        super().__init__()
        self.make, self.names = make, list(names)

    def __missing__(self, name):
        self[name] = self.make(name)
        return self[name]

    def __iter__(self):
        return iter(self.names)

    def items(self):
        return [(n, self[n]) for n in self.names]


@pytest.fixture(scope="module")
def checkpoints(smollm, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return _Lazy(lambda name: _quantize(smollm, root, name, **SCHEMES[name]), SCHEMES)


@pytest.fixture(scope="module")
def static_kv(smollm, tmp_path_factory):
    """Static W8A8 with an int8 per-head KV cache: scales from a few calibration rows (sequential pass)."""
    from llmcompress.config import DataConfig

    root = tmp_path_factory.mktemp("static")
    return _quantize(smollm, root, "w8a8_static_kv", dict(format="int8", granularity="channel"),
                     dict(format="int8", dynamic=False), include=["model.layers.0.*"],
                     kv_cache=KVCacheQuantConfig(format="int8", granularity="head"),
                     data=DataConfig(num_samples=4, max_length=32))


@pytest.fixture(scope="module")
def exports(checkpoints, request, tmp_path_factory):
    root = tmp_path_factory.mktemp("ct")

    def make(name):
        src = request.getfixturevalue("static_kv") if name == "w8a8_static_kv" else checkpoints[name]
        (root / name).mkdir()
        ct.write(src, root / name)
        return root / name
    return _Lazy(make, [*SCHEMES, "w8a8_static_kv"])


def _local(state: dict, name: str) -> dict:
    return {k[len(name) + 1:]: v for k, v in state.items() if k.rsplit(".", 1)[0] == name}


def _scheme_of(qc: dict, name: str) -> QuantizationScheme:
    for grp in qc["config_groups"].values():
        if "Linear" in grp["targets"] or name in grp["targets"]:
            return QuantizationScheme(**{k: v for k, v in grp.items() if k != "format"})
    raise AssertionError(name)


@pytest.mark.parametrize("name", [*SCHEMES, "w8a8_static_kv"])
def test_library_compresses_and_decompresses_exactly_as_we_write(name, checkpoints, static_kv, exports):
    from safetensors.torch import load_file

    src = static_kv if name == "w8a8_static_kv" else checkpoints[name]
    ours = load_quantized(src)
    state = load_file(str(exports[name] / "model.safetensors"))
    qc = json.loads((exports[name] / "config.json").read_text())["quantization_config"]
    compressor = BaseCompressor.load_from_registry(qc["format"])
    qlinears = {n: m for n, m in ours.named_modules() if isinstance(m, QuantLinear)}
    assert qlinears and sorted(qc["ignore"]) == sorted(
        n for n, m in ours.named_modules() if isinstance(m, torch.nn.Linear) and n not in qlinears)
    for n, m in qlinears.items():
        local, scheme = _local(state, n), _scheme_of(qc, n)
        w = m.dequantized_weight(torch.float32)
        # the library's decompression of our tensors is our float weight, bit for bit
        assert torch.equal(compressor.decompress(local, scheme)["weight"], w), n
        # the library's compression of our float weight with our scales is our tensors, bit for bit
        given = {"weight": w, **{k: v for k, v in local.items() if k in ("weight_scale", "input_scale")}}
        if "weight_zero_point" in local:
            from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

            zp = local["weight_zero_point"]
            g = local["weight_scale"].shape
            given["weight_zero_point"] = unpack_from_int32(zp, scheme.weights.num_bits, g, packed_dim=0) \
                if zp.dtype == torch.int32 else zp
        theirs = compressor.compress(given, scheme)
        assert sorted(theirs) == sorted(local), n
        for key in theirs:
            assert theirs[key].dtype == local[key].dtype and torch.equal(theirs[key], local[key]), (n, key)
    if name == "w8a8_static_kv":
        kv = {k: v for k, v in state.items() if k.endswith(("k_scale", "v_scale"))}
        assert len(kv) == 2 * 30 and kv["model.layers.0.self_attn.k_scale"].shape == (3, 1, 1)
        assert qc["kv_cache_scheme"]["strategy"] == "attn_head"


def test_library_serialises_our_quantization_config_unchanged(exports, tmp_path):
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig

    for name, d in exports.items():
        ours = json.loads((d / "config.json").read_text())["quantization_config"]
        cfg = QuantizationConfig.model_validate({k: v for k, v in ours.items()
                                                 if k not in ("version", "quant_method", "sparsity_config",
                                                              "transform_config")})
        (tmp_path / "config.json").write_text("{}")
        ModelCompressor(quantization_config=cfg).update_config(str(tmp_path))
        theirs = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
        assert {**theirs, "version": None} == {**ours, "version": None}, name
    presets = {"w8a8": preset_name_to_scheme("W8A8", ["Linear"]),
               "fp8": preset_name_to_scheme("FP8_DYNAMIC", ["Linear"]),
               "w4g64": preset_name_to_scheme("W4A16", ["Linear"])}
    presets["w4g64"].weights.group_size = 64
    for name, preset in presets.items():
        grp = json.loads((exports[name] / "config.json").read_text())["quantization_config"]["config_groups"]
        assert QuantizationScheme(**{k: v for k, v in grp["group_0"].items() if k != "format"}) == preset, name


def _wikitext_windows(tok, n=3, length=256) -> torch.Tensor:
    from llmcompress.data import load_text

    ids = tok(load_text("builtin:wikitext2_test")[:40000], return_tensors="pt").input_ids[0]
    return ids[: n * length].reshape(n, length)


@pytest.fixture(scope="module")
def plain(smollm, exports, roundtrip, tmp_path_factory):
    """One subprocess without llmcompress measures every model directory with plain transformers."""
    root = tmp_path_factory.mktemp("plain")
    names = ["model.layers.0.self_attn.q_proj", "model.layers.5.mlp.down_proj"]
    torch.save({"tokens": _wikitext_windows(smollm[1]), "weights": names}, root / "tokens.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    dirs = [str(exports["w8a8"]), str(exports["w4g64"]), str(roundtrip)]
    subprocess.run([sys.executable, str(HERE / "plain_transformers.py"), str(root / "tokens.pt"),
                    str(root / "out.pt"), *dirs], check=True, env=env, cwd=root, timeout=900)
    return torch.load(root / "out.pt"), torch.load(root / "tokens.pt")


def _ours(model, tokens) -> tuple[torch.Tensor, float]:
    nll, first = 0.0, None
    with torch.no_grad():
        for row in tokens["tokens"]:
            logits = model(row[None]).logits.float()
            first = logits[0, :32] if first is None else first
            logp = torch.log_softmax(logits[0, :-1].double(), -1)
            nll -= logp.gather(-1, row[1:, None]).sum().item()
    return first, nll


def _ct_activation_grid(model) -> None:
    """Make every W8A8 QuantLinear of `model` quantize its input on compressed-tensors' dynamic per-token grid
    (s = amax / 127.5, codes −128..127; our kernels, like vLLM's, use amax / 127 and ±127), in float32."""
    import torch.nn.functional as F

    def forward(self, x):
        s = x.abs().amax(-1, keepdim=True) / 127.5
        return F.linear(torch.clamp(torch.round(x / s), -128, 127) * s, self.dequantized_weight(x.dtype), self.bias)

    for m in model.modules():
        if isinstance(m, QuantLinear) and m.scheme.act_format == "int8":
            m.forward = forward.__get__(m)


@pytest.mark.parametrize("name", ["w8a8", "w4g64"])
def test_plain_transformers_loads_the_export(name, checkpoints, exports, plain):
    out, tokens = plain
    assert out["modules"] == []  # the oracle process never imported llmcompress
    theirs = out[str(exports[name])]
    model = load_quantized(checkpoints[name])
    logits, nll = _ours(model, tokens)
    if name == "w8a8":
        # transformers runs compressed-tensors' own activation grid: with our weights and that grid, ours is
        # transformers' computation exactly; the two grids' perplexities are printed, not gated
        own = math.exp(nll / theirs["count"])
        _ct_activation_grid(model)
        logits, nll = _ours(model, tokens)
        print(f"\nw8a8: ppl with our activation grid {own:.4f}, with compressed-tensors' "
              f"{math.exp(nll / theirs['count']):.4f}")
    if name == "w4g64":  # weight-only: transformers computes with exactly our weights
        for n, w in theirs["weights"].items():
            assert torch.equal(model.get_submodule(n).dequantized_weight(torch.float32), w), n
    rel = ((logits - theirs["logits"]).norm() / logits.norm()).item()
    assert rel < 1e-3, rel
    ppl_ours, ppl_theirs = math.exp(nll / theirs["count"]), math.exp(theirs["nll"] / theirs["count"])
    print(f"\n{name}: logits rel L2 {rel:.2e}; ppl ours {ppl_ours:.4f}, transformers {ppl_theirs:.4f} "
          f"({100 * (ppl_theirs / ppl_ours - 1):+.4f}%)")
    assert abs(ppl_theirs / ppl_ours - 1) < 0.002, (ppl_ours, ppl_theirs)


@pytest.fixture(scope="module")
def roundtrip(smollm, tmp_path_factory):
    """The library's own compressor writes the embedded default as W4A16 g64 asymmetric (scales from min-max
    computed here, not by llmcompress): what llm-compressor would save."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig
    from safetensors.torch import save_file

    model, tok = smollm
    args = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=64)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    cfg = QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"], format="pack-quantized",
                             quantization_status="compressed")
    compressor = BaseCompressor.load_from_registry("pack-quantized")
    state = {}
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and n != "lm_head":
            w = m.weight.detach().float()
            g = w.reshape(w.shape[0], -1, 64)
            lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
            s = ((hi - lo) / 15).clamp(min=1e-8)
            z = torch.clamp(torch.round(-8 - lo / s), -8, 7).to(torch.int8)
            for k, v in compressor.compress({"weight": w, "weight_scale": s, "weight_zero_point": z}, scheme).items():
                state[f"{n}.{k}"] = v
    for k, v in model.state_dict().items():
        if k.rsplit(".", 1)[0] not in {n.rsplit(".", 1)[0] for n in state} and k != "lm_head.weight":
            state[k] = v.contiguous()
    out = tmp_path_factory.mktemp("rt") / "ct_w4g64_asym"
    model.config.save_pretrained(out)
    tok.save_pretrained(out)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    ModelCompressor(quantization_config=cfg).update_config(str(out))
    return out


def test_our_import_reads_the_library_checkpoint_bit_for_bit(roundtrip, plain):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32  # noqa: F401
    from safetensors.torch import load_file

    ours = load_quantized(roundtrip)
    state = load_file(str(roundtrip / "model.safetensors"))
    qc = json.loads((roundtrip / "config.json").read_text())["quantization_config"]
    compressor = BaseCompressor.load_from_registry("pack-quantized")
    qlinears = {n: m for n, m in ours.named_modules() if isinstance(m, QuantLinear)}
    assert len(qlinears) == 210
    for n, m in qlinears.items():
        theirs = compressor.decompress(_local(state, n), _scheme_of(qc, n))["weight"]
        assert torch.equal(m.dequantized_weight(torch.float32), theirs), n
    out, tokens = plain
    theirs = out[str(roundtrip)]
    logits, nll = _ours(ours, tokens)
    assert ((logits - theirs["logits"]).norm() / logits.norm()).item() < 1e-3
    assert abs(nll / theirs["nll"] - 1) < 1e-3


def test_ragged_group_is_refused_with_the_nearest_working_size(smollm, tmp_path, llmc):
    model, tok = smollm
    src = _quantize(smollm, tmp_path, "w4g128", dict(format="int4", granularity="group", group_size=128),
                    dict(format="none"), include=FEW)
    why = ct.problem(src)
    assert why.startswith("weights.group_size: 128 does not divide in_features 576") and "group_size: 96" in why
    r = llmc("export", "--input", str(src), "--output", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 2 and "group_size: 96" in error_line(r.stderr), r.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_bad_compressed_tensors_input_is_one_line_exit_2(exports, tmp_path, llmc):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(exports["w4g64_asym"], bad)
    state = load_file(str(bad / "model.safetensors"))
    key = "model.layers.0.mlp.up_proj.weight_packed"
    state[key] = state[key][:, :-1].contiguous()
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    r = llmc("eval", "--input", str(bad), "--output", str(tmp_path / "ev"), "--set", "ppl.max_tokens=64",
             cwd=tmp_path)
    assert r.returncode == 2 and key in error_line(r.stderr) and "shape" in error_line(r.stderr), r.stderr
    assert not (tmp_path / "ev").exists()
    cfg = json.loads((exports["w4g64"] / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 3
    shutil.rmtree(bad)
    shutil.copytree(exports["w4g64"], bad)
    (bad / "config.json").write_text(json.dumps(cfg))
    r = llmc("eval", "--input", str(bad), "--output", str(tmp_path / "ev"), "--set", "ppl.max_tokens=64",
             cwd=tmp_path)
    assert r.returncode == 2 and "num_bits=3" in error_line(r.stderr), r.stderr


def test_plain_transformers_refuses_our_own_checkpoint(checkpoints):
    """Our own layout (which a ragged group needs) must never load as random weights: transformers finds no
    model.safetensors and stops."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = ("import sys; from transformers import AutoModelForCausalLM; "
            "AutoModelForCausalLM.from_pretrained(sys.argv[1]); print('LOADED')")
    r = subprocess.run([sys.executable, "-c", code, str(checkpoints["w4g64_asym"])], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "LOADED" not in r.stdout
    assert "no file named model.safetensors" in r.stderr, r.stderr[-500:]
