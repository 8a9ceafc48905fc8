"""The README's quantization results table: perplexity of the embedded default (SmolLM2-135M-Instruct) under each
quantization method, on one fixed protocol.

Protocol: WikiText-2 test (builtin:wikitext2_test), first 16 non-overlapping windows of 2048 tokens
(llmcompress.eval.perplexity); calibration = 128 rows of builtin:alpaca_en_demo, ≤ 512 tokens (QuantizeConfig.data
defaults); every configuration goes through `quantize_model`, the same code as `llmc quantize`.

    python benchmarks/quant_results.py                       # everything (long on 2 CPU cores: see --only)
    python benchmarks/quant_results.py --only gptq_g64_sym,awq_g64_sym --device cuda
    python benchmarks/quant_results.py --list

Results merge into benchmarks/results/quant_results.json (one entry per configuration, with the device and the
wall time of the quantization step) and the table is rewritten to benchmarks/results/quant_results.md. The
unquantized baseline is cached there too and reused unless --force names it.
Timing: time.perf_counter around quantize_model (calibration forward passes included, model load and
perplexity excluded), on whatever device and threads the run had; the JSON records both.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmcompress.config import QuantizeConfig, load_config  # noqa: E402
from llmcompress.data import load_text, sample_texts  # noqa: E402
from llmcompress.eval.perplexity import perplexity  # noqa: E402
from llmcompress.models import load_model  # noqa: E402
from llmcompress.quant.kvcache import KVObserver, apply_kv_quant  # noqa: E402
from llmcompress.quant.layerwise import make_batches  # noqa: E402
from llmcompress.quant.quantize import quantize_model  # noqa: E402

OUT = ROOT / "benchmarks" / "results"
W4 = ["weights.format=int4", "weights.granularity=group", "activations.format=none"]
OLD_GPTQ = ["gptq.refit_scales=false", "gptq.normalize_tokens=false"]  # rows measured before these options
OLD_AWQ = ["awq.clip=false", "awq.both_scalings=false", "awq.refit_scales=false", "awq.unscaled_groups=false"]
RETIRED = "e3399bd"  # the last commit with the AWQ options some rows use (docs/quantization.md: lost options)
W8A8 = ["weights.format=int8", "weights.granularity=channel", "weights.symmetric=true", "activations.format=int8"]
SQ_GRID = "smoothquant.alpha_grid=[0.3,0.4,0.5,0.6,0.7,0.8]"
LAYOUTS = {"g64_sym": ["weights.group_size=64", "weights.symmetric=true"],
           "g64_asym": ["weights.group_size=64", "weights.symmetric=false"],
           "g128_sym": ["weights.group_size=128", "weights.symmetric=true"]}


def configurations() -> dict[str, dict]:
    """name -> {"label", "set": QuantizeConfig overrides} (or "kv": format for KV-cache-only rows). Rows whose
    options were deleted keep their measured numbers in the table and carry "retired": the commit to rerun them
    at."""
    c: dict[str, dict] = {"unquantized": {"label": "unquantized (float32)", "set": None}}
    for lay, over in LAYOUTS.items():
        for obs in ("minmax", "mse"):
            c[f"rtn_{lay}_{obs}"] = {"label": f"RTN W4A16 {lay} ({obs})",
                                     "set": W4 + over + ["method=rtn", f"weights.observer={obs}"]}
        c[f"gptq_{lay}"] = {"label": f"GPTQ W4A16 {lay} (no act_order)",
                            "set": W4 + over + ["method=gptq", "gptq.act_order=false"] + OLD_GPTQ}
        c[f"gptq_{lay}_actorder_mse"] = {"label": f"GPTQ W4A16 {lay} act_order, mse observer",
                                         "set": W4 + over + ["method=gptq", "gptq.act_order=true",
                                                             "weights.observer=mse"] + OLD_GPTQ}
        c[f"gptq_{lay}_refit"] = {"label": f"GPTQ W4A16 {lay} act_order + scale refit",
                                  "set": W4 + over + ["method=gptq", "gptq.act_order=true",
                                                      "gptq.refit_scales=true", "gptq.normalize_tokens=false"]}
        c[f"gptq_{lay}_norm"] = {"label": f"GPTQ W4A16 {lay} act_order + token-normalized H",
                                 "set": W4 + over + ["method=gptq", "gptq.act_order=true",
                                                     "gptq.refit_scales=false", "gptq.normalize_tokens=true"]}
        c[f"gptq_{lay}_refit_norm"] = {"label": f"GPTQ W4A16 {lay} act_order + token-normalized H + scale refit",
                                       "set": W4 + over + ["method=gptq", "gptq.act_order=true",
                                                           "gptq.refit_scales=true", "gptq.normalize_tokens=true"]}
        c[f"awq_{lay}"] = {"label": f"AWQ W4A16 {lay} (duo scaling)", "set": W4 + over + ["method=awq"] + OLD_AWQ,
                           "retired": RETIRED}
        c[f"awq_{lay}_noduo"] = {"label": f"AWQ W4A16 {lay} (s = x̄^α)",
                                 "set": W4 + over + ["method=awq"] + OLD_AWQ + ["awq.duo_scaling=false"],
                                 "retired": RETIRED}
        c[f"awq_{lay}_clip"] = {"label": f"AWQ W4A16 {lay} (duo scaling) + clip search",
                                "set": W4 + over + ["method=awq"] + OLD_AWQ + ["awq.clip=true"], "retired": RETIRED}
        c[f"awq_{lay}_refit"] = {"label": f"AWQ W4A16 {lay} (defaults: both scalings, clip, scale refit, "
                                          "o_proj clipped + refit)", "set": W4 + over + ["method=awq"]}
        for key, ov, what in (("cliprefit", "awq.clip_refit=true", "clip candidates scored after the scale refit"),
                              ("block", "awq.loss=block", "α scored on the attention / MLP block output"),
                              ("seqin", "awq.sequential_inputs=true", "groups on the quantized earlier groups' "
                                                                      "outputs"),
                              ("cliptok", "awq.clip_tokens=4096", "clip search on 4,096 rows, not 512")):
            c[f"awq_{lay}_{key}"] = {"label": f"AWQ W4A16 {lay} (defaults + {what})",
                                     "set": W4 + over + ["method=awq", ov]}
            if key != "cliptok":
                c[f"awq_{lay}_{key}"]["retired"] = RETIRED
        c[f"awq_{lay}_gptq"] = {"label": f"AWQ (s = x̄^α) + GPTQ act_order, mse W4A16 {lay}",
                                "set": W4 + over + ["method=awq"] + OLD_AWQ + [
                                    "awq.duo_scaling=false", "awq.gptq=true", "gptq.act_order=true",
                                    "weights.observer=mse"] + OLD_GPTQ, "retired": RETIRED}
    c["w8a8_static"] = {"label": "W8A8 static per-tensor (RTN)", "set": W8A8 + ["activations.dynamic=false"]}
    c["w8a8_static_sq"] = {"label": "W8A8 static per-tensor + SmoothQuant (α searched)",
                           "set": W8A8 + ["activations.dynamic=false", "smoothquant.enabled=true", SQ_GRID]}
    c["w8a8_dynamic"] = {"label": "W8A8 dynamic per-token (RTN)", "set": W8A8 + ["activations.dynamic=true"]}
    c["w8a8_dynamic_gptq"] = {"label": "W8A8 dynamic per-token (GPTQ, no act_order)",
                              "set": W8A8 + ["activations.dynamic=true", "method=gptq", "gptq.act_order=false"] + OLD_GPTQ}
    c["w8a8_dynamic_sq"] = {"label": "W8A8 dynamic per-token + SmoothQuant (α searched)",
                            "set": W8A8 + ["activations.dynamic=true", "smoothquant.enabled=true", SQ_GRID]}
    c["w8a8_dynamic_sq_gptq"] = {"label": "W8A8 dynamic per-token + SmoothQuant + GPTQ",
                                 "set": W8A8 + ["activations.dynamic=true", "smoothquant.enabled=true", SQ_GRID,
                                                "method=gptq", "gptq.act_order=false"] + OLD_GPTQ}
    c["fp8_w8a8_dynamic"] = {"label": "FP8 E4M3 W8A8 dynamic per-token",
                             "set": ["weights.format=fp8", "weights.granularity=channel", "activations.format=fp8",
                                     "activations.dynamic=true"]}
    for fmt in ("int8", "fp8"):
        for gran in ("tensor", "head"):
            c[f"kv_{fmt}_{gran}"] = {"label": f"KV cache {fmt.upper()} per-{gran} (float weights)",
                                     "kv": (fmt, gran)}
    return c


def kv_only(model, tok, fmt: str, gran: str, cfg: QuantizeConfig) -> None:
    """Float weights, quantized K/V: scales observed on the calibration rows, then the fake-quant hooks."""
    texts = sorted(sample_texts(cfg.data, cfg.seed), key=len)
    device = next(model.parameters()).device
    obs = KVObserver(model)
    with torch.no_grad(), obs.watching():
        for b in make_batches(tok, texts, cfg.data.max_length, cfg.batch_size, device):
            obs.mask = b["attention_mask"].bool()
            model(**b, use_cache=False)
    apply_kv_quant(model, fmt, gran, obs.scales(fmt, gran))


@torch.no_grad()
def perturb(model, seed: int) -> None:
    """Every float weight times 1 + e, e in {-2^-24, 0, 2^-24} at random (CPU generator, parameter order)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.is_floating_point():
            p.mul_(1 + (torch.randint(-1, 2, p.shape, generator=g).float() * 2.0 ** -24).to(p.device, p.dtype))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated configuration names (default: all)")
    ap.add_argument("--list", action="store_true", help="list configuration names and exit")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--windows", type=int, default=16, help="windows of --seq-len tokens scored")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--memory", action="store_true", help="GPU peak memory of GPTQ W4 g64 with sequential "
                    "onloading (model on CPU, one decoder layer on the GPU at a time) against the whole model on it")
    ap.add_argument("--skip-ppl", action="store_true", help="time the quantization only")
    ap.add_argument("--force", action="store_true", help="recompute the cached unquantized baseline too")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--perturb", type=int, default=None, metavar="SEED",
                    help="multiply every float weight by 1 + e, e drawn from {-2^-24, 0, 2^-24} (at most one ulp) "
                         "before quantizing: how much a result moves under a rounding-level change (use with --out)")
    ap.add_argument("--exp", action="append", default=[], metavar="NAME=OV|OV|...",
                    help="an extra configuration: QuantizeConfig overrides separated by '|' (repeatable)")
    args = ap.parse_args()
    confs = configurations()
    for e in args.exp:
        name, _, overs = e.partition("=")
        confs[name] = {"label": f"experiment {name}", "set": overs.split("|")}
    if args.list:
        for k, v in confs.items():
            print(f"{k:28s} {v['label']}")
        return
    if args.memory:
        return memory(Path(args.out))
    names = [n for n in args.only.split(",") if n] or list(confs)
    unknown = [n for n in names if n not in confs]
    if unknown:
        sys.exit(f"unknown configuration(s): {', '.join(unknown)}; see --list")
    if args.only:
        retired = [n for n in names if "retired" in confs[n]]
        if retired:
            sys.exit(f"{', '.join(retired)}: options deleted; rerun at commit {confs[retired[0]]['retired']}")
    else:
        names = [n for n in names if "retired" not in confs[n]]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "quant_results.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    text = load_text("builtin:wikitext2_test")
    base_model, tok = load_model("smollm2-135m", device=args.device, dtype="float32")
    if args.perturb is not None:
        perturb(base_model, args.perturb)
    device = next(base_model.parameters()).device
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads")
    protocol = {"dataset": "builtin:wikitext2_test", "windows": args.windows, "seq_len": args.seq_len,
                "calibration": "128 rows of builtin:alpaca_en_demo, <= 512 tokens"}

    def score(model) -> dict:
        return perplexity(model, tok, text, seq_len=args.seq_len, max_tokens=args.windows * args.seq_len + 1)

    cached = results.get("unquantized", {})
    if not args.skip_ppl and (args.force or cached.get("protocol") != protocol
                              or (args.only and "unquantized" in names)):
        r = score(base_model)
        results["unquantized"] = {"label": confs["unquantized"]["label"], "ppl": r["ppl"],
                                  "tokens_scored": r["tokens_scored"], "device": where, "protocol": protocol}
        print(f"unquantized: ppl {r['ppl']:.3f}", flush=True)
    for name in names:
        if name == "unquantized":
            continue
        spec = confs[name]
        model = copy.deepcopy(base_model)
        cfg = load_config(QuantizeConfig, overrides=spec.get("set") or [])
        t0 = time.perf_counter()
        try:
            if "kv" in spec:
                kv_only(model, tok, *spec["kv"], cfg)
                rows = []
            else:
                rows = quantize_model(model, cfg, None, None, tok)
            seconds = time.perf_counter() - t0
            ppl = None if args.skip_ppl else score(model)["ppl"]
        except Exception as e:  # one broken configuration must not lose the others' numbers
            print(f"{name}: FAILED: {type(e).__name__}: {e}", flush=True)
            continue
        entry = {"label": spec["label"] + ("" if args.perturb is None else f" (weights perturbed, seed {args.perturb})"),
                 "quantize_seconds": seconds, "device": where, "threads":
                 torch.get_num_threads(), "overrides": spec.get("set"), "kv": spec.get("kv"), "layers": len(rows),
                 "protocol": protocol}
        if ppl is not None:
            entry["ppl"] = ppl
        results.setdefault(name, {}).update(entry)
        if ppl is None:
            results[name][f"quantize_seconds_{where}"] = seconds
        print(f"{name}: ppl {ppl} (quantize {seconds:.1f} s on {where})", flush=True)
        del model
        store.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    store.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    (out / "quant_results.md").write_text(table(results, confs))
    print(table(results, confs))


def memory(out: Path) -> None:
    """Peak CUDA memory of the same GPTQ run twice: onloading one layer at a time, and the whole model on the GPU."""
    from llmcompress.quant.quantize import observer_factory, select_linears, weight_spec
    from llmcompress.quant.sequential import run_on_calibration_data

    cfg = load_config(QuantizeConfig, overrides=W4 + LAYOUTS["g64_sym"] + ["method=gptq"])
    rec = {}
    for mode in ("onload", "whole"):
        model, tok = load_model("smollm2-135m", device="cpu" if mode == "onload" else "cuda", dtype="float32")
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        linears = select_linears(model, cfg.include, cfg.exclude)
        t0 = time.perf_counter()
        res = run_on_calibration_data(model, tok, linears, weight_spec(cfg.weights), observer_factory(cfg.weights),
                                      cfg, None, device=torch.device("cuda"))
        rec[mode] = {"peak_cuda_bytes": torch.cuda.max_memory_allocated(), "resident_before_bytes": base,
                     "seconds": time.perf_counter() - t0,
                     "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
        print(mode, rec[mode], res.seconds, flush=True)
        del model
    out.mkdir(parents=True, exist_ok=True)
    (out / "quant_memory.json").write_text(json.dumps(rec, indent=2) + "\n")


def table(results: dict, confs: dict) -> str:
    """Markdown table; W4 rows also say how much of RTN's perplexity increase (RTN with its best observer, same
    layout) they recover: (ppl_RTN − ppl) / (ppl_RTN − ppl_unquantized)."""
    base = results.get("unquantized", {}).get("ppl")
    rtn_best = {}
    for lay in LAYOUTS:
        got = [results[n]["ppl"] for n in results if n.startswith(f"rtn_{lay}_") and "ppl" in results[n]]
        if got:
            rtn_best[lay] = min(got)
    lines = ["| configuration | WikiText-2 ppl | vs unquantized | recovers of RTN's increase | quantize time | device |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for name in confs:
        r = results.get(name)
        if not r or "ppl" not in r:
            continue
        delta = f"{100 * (r['ppl'] / base - 1):+.2f}%" if base and name != "unquantized" else ""
        lay = next((lay for lay in LAYOUTS if f"_{lay}" in name), None)
        rec = ""
        if lay in rtn_best and base and not name.startswith("rtn_"):
            rec = f"{100 * (rtn_best[lay] - r['ppl']) / (rtn_best[lay] - base):.0f}%"
        secs = f"{r['quantize_seconds']:.1f} s" if "quantize_seconds" in r else ""
        lines.append(f"| {r['label']} (`{name}`) | {r['ppl']:.2f} | {delta} | {rec} | {secs} | {r['device']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
