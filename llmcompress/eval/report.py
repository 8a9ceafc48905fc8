"""What an evaluation leaves behind: results.json (everything measured, with protocols), report.md (the
comparison table and the plots), and PNG plots drawn with matplotlib's Agg backend (no display needed).

A "result" is one evaluated model as evaluate.py builds it: role, label, name, bits_per_weight, size_mb, and the
ppl / tasks / speed sections that were measured.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

PLOTS = {"ppl_vs_bits": "ppl_vs_bits_per_weight.png", "latency_vs_batch": "latency_vs_batch.png",
         "ttft_vs_prompt": "ttft_vs_prompt_length.png"}


def metrics(result: dict) -> list[tuple[str, Optional[float], Optional[float], Optional[bool]]]:
    """(metric name, value, stderr, higher is better) for every number worth comparing; names are stable keys
    shared by all models of a run (a model lacking one shows a dash)."""
    rows = []
    ppl = result.get("ppl")
    if ppl:
        rows += [("perplexity (token)", ppl["ppl"], None, False), ("perplexity (word)", ppl["word_ppl"], None, False),
                 ("bits per byte", ppl["bits_per_byte"], None, False)]
    for task, values in sorted((result.get("tasks") or {}).items()):
        for metric, value in values.items():
            if "_stderr" in metric:
                continue
            name, _, filt = metric.partition(",")
            stderr = values.get(f"{name}_stderr" + (f",{filt}" if filt else ""))
            higher = not name.startswith(("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"))
            rows.append((f"{task} {metric}", value, stderr, higher))
    speed = result.get("speed")
    if speed:
        for n, v in speed["prefill"].items():
            rows += [(f"TTFT @{n} tokens (ms)", v["ttft_ms"], None, False),
                     (f"prefill @{n} tokens (tok/s)", v["prefill_tok_s"], None, True)]
        for b, v in speed["decode"].items():
            rows += [(f"decode batch {b} (tok/s)", v["decode_tok_s"], None, True),
                     (f"decode batch {b} (ms/step)", v["ms_per_step"], None, False)]
        rows.append((f"peak memory (MB, {speed['peak_memory_kind']})", speed["peak_memory_mb"], None, False))
    rows.append(("checkpoint size (MB)", result.get("size_mb"), None, False))
    rows.append(("bits per weight", result.get("bits_per_weight"), None, False))
    return rows


def _fmt(value, stderr=None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    text = f"{value:.4f}" if abs(value) < 10 else f"{value:.5g}" if abs(value) < 1e5 else f"{value:.4g}"
    if stderr is not None and not (isinstance(stderr, float) and math.isnan(stderr)):
        text += f" ± {stderr:.4f}" if abs(stderr) < 10 else f" ± {stderr:.4g}"
    return text


def _change(value, ref) -> str:
    if value is None or ref is None or ref == 0:
        return "—"
    return f"{(value / ref - 1) * 100:+.2f}%"


def column_titles(results: list[dict]) -> list[str]:
    return [f"{r['label']} ({r['role']})" if r["role"] != "compare" else r["label"] for r in results]


def comparison_rows(results: list[dict]) -> list[dict]:
    """One row per metric: a column per model and, where a baseline is present, the relative change of every
    other model against it (value / baseline − 1)."""
    titles = column_titles(results)
    base = next((i for i, r in enumerate(results) if r["role"] == "baseline"), None)
    per_model = [{name: (v, s) for name, v, s, _ in metrics(r)} for r in results]
    names: list[str] = []
    for r in results:
        names += [m[0] for m in metrics(r) if m[0] not in names]
    rows = []
    for name in names:
        row = {"metric": name}
        for i, (title, vals) in enumerate(zip(titles, per_model)):
            value, stderr = vals.get(name, (None, None))
            row[title] = _fmt(value, stderr)
            if base is not None and i != base:
                row[f"Δ {results[i]['label']}"] = _change(value, per_model[base].get(name, (None,))[0])
        rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def plot(results: list[dict], out_dir: Path) -> list[str]:
    """Draw the plots the measurements allow; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on CI machines
    import matplotlib.pyplot as plt

    written = []
    pts = [(r["bits_per_weight"], r["ppl"]["ppl"], r["label"]) for r in results
           if r.get("ppl") and r.get("bits_per_weight")]
    if pts:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.scatter([p[0] for p in pts], [p[1] for p in pts])
        for x, y, label in pts:
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("bits per weight (Linear layers)")
        ax.set_ylabel("perplexity (token)")
        ax.set_title(results[0]["ppl"]["protocol"]["dataset"] if results[0].get("ppl") else "perplexity")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / PLOTS["ppl_vs_bits"], dpi=120)
        plt.close(fig)
        written.append(PLOTS["ppl_vs_bits"])
    timed = [r for r in results if r.get("speed") and r["speed"]["decode"]]
    if timed:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        for r in timed:
            bs = sorted(r["speed"]["decode"], key=int)
            a1.plot([int(b) for b in bs], [r["speed"]["decode"][b]["ms_per_step"] for b in bs], marker="o",
                    label=r["label"])
            a2.plot([int(b) for b in bs], [r["speed"]["decode"][b]["decode_tok_s"] for b in bs], marker="o",
                    label=r["label"])
        a1.set(xlabel="batch size", ylabel="decode latency (ms / step)", title="latency vs batch")
        a2.set(xlabel="batch size", ylabel="decode throughput (tokens/s)", title="throughput vs batch")
        for a in (a1, a2):
            a.grid(alpha=0.3)
            a.legend(fontsize=8)
        fig.suptitle(f"device: {timed[0]['speed']['device_name']}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out_dir / PLOTS["latency_vs_batch"], dpi=120)
        plt.close(fig)
        written.append(PLOTS["latency_vs_batch"])
    timed = [r for r in results if r.get("speed") and r["speed"]["prefill"]]
    if timed:
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in timed:
            ns = sorted(r["speed"]["prefill"], key=int)
            ax.plot([int(n) for n in ns], [r["speed"]["prefill"][n]["ttft_ms"] for n in ns], marker="o",
                    label=r["label"])
        ax.set(xlabel="prompt length (tokens)", ylabel="time to first token (ms)", title="TTFT vs prompt length")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / PLOTS["ttft_vs_prompt"], dpi=120)
        plt.close(fig)
        written.append(PLOTS["ttft_vs_prompt"])
    return written


def write_report(out_dir: Path, results: list[dict], settings: dict, gates_failed: list[str],
                 gates_set: dict) -> dict:
    """results.json, report.md and the plots; returns {kind: file name} of what was written."""
    out_dir = Path(out_dir)
    plots = plot(results, out_dir)
    rows = comparison_rows(results)
    payload = {"models": results, "comparison": rows, "settings": settings,
               "gates": {"set": gates_set, "failed": gates_failed, "passed": not gates_failed}, "plots": plots}
    (out_dir / "results.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")

    md = ["# llmc evaluate", ""]
    md += ["## Models", "", markdown_table([
        {"column": t, "model": r["name"], "bits per weight": _fmt(r.get("bits_per_weight")),
         "checkpoint MB": _fmt(r.get("size_mb")), "dtype": r.get("dtype", "")}
        for t, r in zip(column_titles(results), results)]), ""]
    md += ["## Results", "", markdown_table(rows), ""]
    if any(r.get("ppl") for r in results):
        p = next(r["ppl"]["protocol"] for r in results if r.get("ppl"))
        md += ["## Perplexity protocol", "", f"{p['dataset']}: {p['joined']}; {p['windows']} windows of "
               f"{p['seq_len']} tokens, stride {p['stride']}; {p['num_windows']} windows, tokens used "
               f"{p['tokens_used']} of {p['tokens_in_split'] or 'the split (prefix tokenized)'}; the first token "
               f"of each window is context only. Word perplexity and bits per byte divide the same summed NLL by "
               f"the words / UTF-8 bytes of the text covered.", ""]
    if settings.get("tasks", {}).get("names"):
        t = settings["tasks"]
        md += ["## Tasks", "", f"lm-eval {t.get('lm_eval_version', '')}, tasks {', '.join(t['names'])}, limit "
               f"{t['limit']}, few-shot {t['num_fewshot'] if t['num_fewshot'] is not None else 'task default'}; "
               f"metric names and stderrs are lm-eval's.", ""]
        md += [f"- {task}: {data}" for task, data in sorted(t.get("data", {}).items())] + \
            ([""] if t.get("data") else [])
    if any(r.get("speed") for r in results):
        s = next(r["speed"] for r in results if r.get("speed"))
        pr = s["protocol"]
        md += ["## Speed protocol", "", f"device {s['device_name']} ({s['threads']} threads); {pr['warmup']} "
               f"warm-up + {pr['repeats']} timed runs, median; prompts are {pr['prompt']}; decode: "
               f"{pr['new_tokens']} {pr['decode']} steps after a {pr['decode_context']}-token prefill; peak "
               f"memory: {s['peak_memory_kind']}.", ""]
        if s.get("skipped"):
            md += ["Skipped: " + "; ".join(s["skipped"]), ""]
    md += ["## Gates", ""]
    if not any(v is not None for v in gates_set.values()):
        md += ["none set", ""]
    elif gates_failed:
        md += [f"- FAILED {line}" for line in gates_failed] + [""]
    else:
        md += ["all passed: " + ", ".join(f"{k}={v}" for k, v in gates_set.items() if v is not None), ""]
    if plots:
        md += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    (out_dir / "report.md").write_text("\n".join(md))
    return {"results": "results.json", "report": "report.md", **{p.split(".")[0]: p for p in plots}}
