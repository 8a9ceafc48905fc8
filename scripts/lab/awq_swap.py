"""Where does a W4 configuration lose its perplexity? Swap one decoder layer's Linears at a time between quantized
runs of the embedded default and score each mix (lab tool for issue 8's AWQ g128 sym question).

Each run's Linears are put back in the float model's coordinates (W_eff = diag(p) · Ŵ · diag(1/s), with s the
AWQ / SmoothQuant scales folded into the Linear's input and p those folded into its output rows, recorded as
fold_scales is called), so any mix of runs is a valid model with the float norms. The first run is the base;
for every other run R and layer i, the report gives ppl(base with layer i from R) − ppl(base).

    LLMC_KERNELS=reference python scripts/lab/awq_swap.py --device cuda --out DIR \
        --run "A=<overrides separated by |>" --run "B=...[@perturb SEED]" --run F=float [--per-linear 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from llmcompress.config import QuantizeConfig, load_config  # noqa: E402
from llmcompress.data import load_text  # noqa: E402
from llmcompress.eval.perplexity import perplexity  # noqa: E402
from llmcompress.models import load_model  # noqa: E402
from llmcompress.quant import smoothquant as sq  # noqa: E402
from llmcompress.quant.quantize import observer_factory, select_linears, weight_spec  # noqa: E402
from llmcompress.quant.sequential import run_on_calibration_data  # noqa: E402
from quant_results import perturb  # noqa: E402


@torch.no_grad()
def effective_weights(base, tok, overrides: list[str], seed) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(base)
    if seed is not None:
        perturb(model, seed)
    cfg = load_config(QuantizeConfig, overrides=overrides)
    linears = select_linears(model, cfg.include, cfg.exclude)
    names = {id(m): n for n, m in linears.items()}
    s_in = {n: torch.ones(m.in_features) for n, m in linears.items()}
    p_out = {n: torch.ones(m.out_features) for n, m in linears.items()}
    real = sq.fold_scales

    def record(prev, lins, s, prev_s=None):
        if id(prev) in names:
            p_out[names[id(prev)]] *= (s if prev_s is None else prev_s).float().cpu()
        for lin in lins:
            s_in[names[id(lin)]] *= s.float().cpu()
        return real(prev, lins, s, prev_s)

    sq.fold_scales = record
    try:
        res = run_on_calibration_data(model, tok, linears, weight_spec(cfg.weights), observer_factory(cfg.weights),
                                      cfg)
    finally:
        sq.fold_scales = real
    out = {}
    for n in linears:
        w = res.qweights[n].dequantize(torch.float32).cpu()
        out[n] = p_out[n].unsqueeze(1) * w / s_in[n].unsqueeze(0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", required=True)
    ap.add_argument("--run", action="append", required=True, metavar="NAME=OV|OV[@SEED]")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--per-linear", type=int, default=3, help="layers (largest swap effect) to split per Linear")
    args = ap.parse_args()
    base, tok = load_model("smollm2-135m", device=args.device, dtype="float32")
    text = load_text("builtin:wikitext2_test")
    runs = {}
    for r in args.run:
        name, _, rest = r.partition("=")
        overs, _, seed = rest.partition("@")
        if overs == "float":  # the unquantized weights
            runs[name] = {n: m.weight.detach().float().cpu().clone()
                          for n, m in select_linears(base, ["*"], ["lm_head", "*embed*"]).items()}
        else:
            runs[name] = effective_weights(base, tok, overs.split("|"), int(seed) if seed else None)
        first_name = next(iter(runs))
        if name != first_name:  # the float run names every Linear; keep the first run's
            runs[name] = {k: v for k, v in runs[name].items() if k in runs[first_name]}
    model = copy.deepcopy(base)
    mods = dict(model.named_modules())

    def load(weights: dict[str, torch.Tensor]) -> None:
        for n, w in weights.items():
            mods[n].weight.copy_(w.to(mods[n].weight.device))

    def ppl() -> float:
        return perplexity(model, tok, text, seq_len=2048, max_tokens=args.windows * 2048 + 1)["ppl"]

    names = list(runs)
    first = runs[names[0]]
    layers = sorted({int(n.split(".")[2]) for n in first})
    report = {"runs": args.run, "alone": {}, "swap": {}}
    with torch.no_grad():
        for n in names:
            load(runs[n])
            report["alone"][n] = ppl()
            print(f"{n}: ppl {report['alone'][n]:.3f}", flush=True)
        b0 = report["alone"][names[0]]
        for other in names[1:]:
            d = {}
            for i in layers:
                load(first)
                load({k: v for k, v in runs[other].items() if int(k.split(".")[2]) == i})
                d[i] = ppl() - b0
            print(f"layer swaps from {other}: " + " ".join(f"{i}:{v:+.3f}" for i, v in d.items()), flush=True)
            report["swap"][other] = {"layers": d}
            top = sorted(d, key=lambda i: abs(d[i]), reverse=True)[: args.per_linear]
            per = {}
            for i in top:
                for k in [k for k in first if int(k.split(".")[2]) == i]:
                    load(first)
                    load({k: runs[other][k]})
                    per[k] = ppl() - b0
            print("  per Linear: " + " ".join(f"{k.split('.', 2)[2]}:{v:+.3f}" for k, v in per.items()), flush=True)
            report["swap"][other]["linears"] = per
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "awq_swap.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
