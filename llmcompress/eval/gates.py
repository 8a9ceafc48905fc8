"""CI gates: thresholds on a candidate's metrics, absolute or relative to a baseline. Each miss is one line that
says which gate, the measured value, the limit, and by how much it was missed."""

from __future__ import annotations

from typing import Optional

from ..config import EvaluateConfig, GatesConfig
from ..errors import UserError

# lm-eval metrics where higher is better and a ratio to baseline means "retention"
ACCURACY_PREFIXES = ("acc", "exact_match", "f1", "mcc")


def accuracy_metrics(task_metrics: dict) -> dict[str, float]:
    return {k: v for k, v in task_metrics.items()
            if k.split(",")[0].startswith(ACCURACY_PREFIXES) and "_stderr" not in k}


def require_measurements(cfg: EvaluateConfig) -> None:
    """Fail before any work when a gate is set whose measurement or baseline is not: a gate that cannot be
    evaluated must not pass silently."""
    g, needs = cfg.gates, []
    if g.max_ppl_increase_pct is not None or g.max_ppl is not None:
        if not cfg.ppl.enabled:
            needs.append("gates.max_ppl* need perplexity (--ppl or ppl.enabled=true)")
    if g.min_task_retention_pct is not None and not cfg.tasks.names:
        needs.append("gates.min_task_retention_pct needs tasks (--tasks)")
    if g.min_decode_speedup is not None and not cfg.speed.enabled:
        needs.append("gates.min_decode_speedup needs speed (--speed or speed.enabled=true)")
    relative = [k for k in ("max_ppl_increase_pct", "min_task_retention_pct", "min_decode_speedup",
                            "max_size_ratio") if getattr(g, k) is not None]
    if relative and not cfg.baseline:
        needs.append(f"gates.{', gates.'.join(relative)} compare with a baseline: pass --baseline MODEL_OR_ARTIFACT")
    if needs:
        raise UserError("; ".join(needs))


def check_gates(gates: GatesConfig, cand: dict, base: Optional[dict]) -> list[str]:
    """Lines for every missed gate; `cand` and `base` are per-model results as evaluate.py builds them."""
    failed = []
    cp = (cand.get("ppl") or {}).get("ppl")
    bp = ((base or {}).get("ppl") or {}).get("ppl")
    if gates.max_ppl is not None and cp is not None and cp > gates.max_ppl:
        failed.append(f"max_ppl: perplexity {cp:.4g} > {gates.max_ppl:.4g} (over by {cp - gates.max_ppl:.4g})")
    if gates.max_ppl_increase_pct is not None and cp is not None and bp:
        rise = (cp / bp - 1) * 100
        if rise > gates.max_ppl_increase_pct:
            failed.append(f"max_ppl_increase_pct: perplexity rose {rise:.2f}% ({bp:.4g} -> {cp:.4g}), limit "
                          f"{gates.max_ppl_increase_pct:g}% (over by {rise - gates.max_ppl_increase_pct:.2f} points)")
    if gates.min_task_retention_pct is not None and base is not None:
        for task, metrics in sorted((cand.get("tasks") or {}).items()):
            ref = (base.get("tasks") or {}).get(task, {})
            for metric, value in sorted(accuracy_metrics(metrics).items()):
                b = ref.get(metric)
                if not b:  # a zero baseline has nothing to retain
                    continue
                kept = value / b * 100
                if kept < gates.min_task_retention_pct:
                    failed.append(f"min_task_retention_pct: {task} {metric} kept {kept:.1f}% of baseline "
                                  f"({b:.4g} -> {value:.4g}), limit {gates.min_task_retention_pct:g}% (short by "
                                  f"{gates.min_task_retention_pct - kept:.1f} points)")
    if gates.min_decode_speedup is not None and base is not None:
        cd = (cand.get("speed") or {}).get("decode", {})
        bd = (base.get("speed") or {}).get("decode", {})
        for batch in sorted(set(cd) & set(bd), key=int):
            speedup = cd[batch]["decode_tok_s"] / bd[batch]["decode_tok_s"]
            if speedup < gates.min_decode_speedup:
                failed.append(f"min_decode_speedup: decode at batch {batch} is {speedup:.2f}x baseline "
                              f"({bd[batch]['decode_tok_s']:.4g} -> {cd[batch]['decode_tok_s']:.4g} tok/s), limit "
                              f"{gates.min_decode_speedup:g}x (short by {gates.min_decode_speedup - speedup:.2f}x)")
    if gates.max_size_ratio is not None and base is not None:
        cs, bs = cand.get("size_mb"), base.get("size_mb")
        if cs is None or not bs:
            failed.append("max_size_ratio: checkpoint size unknown (not a local model directory): cannot check")
        elif cs / bs > gates.max_size_ratio:
            failed.append(f"max_size_ratio: checkpoint is {cs / bs:.3f}x baseline ({bs:.4g} -> {cs:.4g} MB), "
                          f"limit {gates.max_size_ratio:g}x (over by {cs / bs - gates.max_size_ratio:.3f}x)")
    return failed
