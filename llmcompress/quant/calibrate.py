"""The `llmc calibrate` stage: statistics of weights and activations that static scales are chosen from.

N samples run through the model one decoder layer at a time (layerwise.py), with forward hooks on every Linear
of the layer being run. For each Linear's input and output (k_proj / v_proj outputs are the KV cache), over the
real (non-padding) tokens:
  per channel   min, max                                 [C]
  per tensor    signed histogram over [−R, R), its R      [bins], [] (R grows by doubling; see observers.Histogram)
                percentiles of |x| (from the histogram), token count, NaN/Inf count
and for each weight: per output channel min/max, a histogram and its percentiles. Memory is channels + bins per
tensor, never tokens. Linears reading the same tensor (q/k/v, gate/up) share one record.

Files: stats.safetensors (`<module>.<input|output|weight>.<min|max|hist|radius|count|nonfinite>`) and
summary.json (the same, readable: ranges, percentiles, outlier channels, KV-cache absmax per head).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llmcompress.config import CalibrateConfig
from llmcompress.errors import ArtifactError, UserError
from llmcompress.progress import Reporter

from .experts import expert_modules, watching_inputs
from .layerwise import Layerwise, make_batches
from .observers import Histogram, Observer

STATS_FILE = "stats.safetensors"
SUMMARY_FILE = "summary.json"
KINDS = ("input", "output", "weight")


@dataclass
class TensorStats:
    """Streaming statistics of one tensor: per-channel min/max and a per-tensor histogram."""

    bins: int = 2048
    min: Optional[torch.Tensor] = None
    max: Optional[torch.Tensor] = None
    hist: Histogram = field(default=None)
    count: int = 0
    nonfinite: int = 0

    def __post_init__(self):
        if self.hist is None:
            self.hist = Histogram(self.bins)

    def update(self, x: torch.Tensor, channel_dim_last: bool = True) -> None:
        """x [..., C] (activations) or [C, K] with channel_dim_last=False (weights: C output channels)."""
        x = x.detach().float()
        x = x.reshape(-1, x.shape[-1]) if channel_dim_last else x.reshape(x.shape[0], -1)
        if not torch.isfinite(x).all():
            bad = ~torch.isfinite(x)
            self.nonfinite += int(bad.sum())
            x = torch.where(bad, torch.zeros_like(x), x)
        lo, hi = torch.aminmax(x, dim=0 if channel_dim_last else 1)
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)
        self.hist.update(x.reshape(1, -1))
        self.count += x.shape[0] if channel_dim_last else x.shape[1]

    def percentile(self, p: float) -> float:
        return self.hist.abs_quantile(p / 100).item()

    def absmax(self) -> float:
        return max(-self.min.min().item(), self.max.max().item())

    def load_into(self, obs: Observer) -> None:
        """Give an observer (per tensor) this record's state, as if it had seen the tokens itself."""
        obs.min, obs.max = self.min.amin().reshape(1), self.max.amax().reshape(1)
        if obs.hist is not None:
            if obs.hist.bins != self.hist.bins:
                obs.hist = Histogram(self.hist.bins)
            obs.hist.counts, obs.hist.radius = self.hist.counts.clone(), self.hist.radius.clone()

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.min": self.min.cpu(), f"{prefix}.max": self.max.cpu(),
                f"{prefix}.hist": self.hist.counts[0].cpu(), f"{prefix}.radius": self.hist.radius.reshape(()).cpu(),
                f"{prefix}.count": torch.tensor(self.count), f"{prefix}.nonfinite": torch.tensor(self.nonfinite)}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], prefix: str) -> "TensorStats":
        counts = t[f"{prefix}.hist"]
        s = cls(bins=counts.shape[0], min=t[f"{prefix}.min"].float(), max=t[f"{prefix}.max"].float(),
                count=int(t[f"{prefix}.count"]), nonfinite=int(t[f"{prefix}.nonfinite"]))
        s.hist.counts, s.hist.radius = counts.double()[None].clone(), t[f"{prefix}.radius"].float().reshape(1)
        return s

    def summary(self, percentiles: list[float], top: int = 5) -> dict:
        absmax_c = torch.maximum(self.min.abs(), self.max.abs())
        k = min(top, absmax_c.numel())
        vals, idx = absmax_c.topk(k)
        return {"min": self.min.min().item(), "max": self.max.max().item(), "absmax": self.absmax(),
                "percentiles": {f"{p:g}": self.percentile(p) for p in percentiles},
                "channels": int(absmax_c.numel()), "median_channel_absmax": absmax_c.median().item(),
                "outlier_channels": [{"channel": int(i), "absmax": v.item()} for v, i in zip(vals, idx)],
                "rows": self.count, "nonfinite": self.nonfinite}


class CalibrationStats:
    """A calibration artifact's statistics, read back for `llmc quantize`."""

    def __init__(self, tensors: dict[str, torch.Tensor], summary: dict):
        self.tensors, self.summary = tensors, summary

    @classmethod
    def open(cls, path) -> "CalibrationStats":
        path = Path(path)
        for f in (STATS_FILE, SUMMARY_FILE):
            if not (path / f).is_file():
                raise ArtifactError(f"{path / f}: missing from the calibration artifact")
        return cls(load_file(str(path / STATS_FILE)), json.loads((path / SUMMARY_FILE).read_text()))

    def activation(self, module: str, kind: str) -> Optional[TensorStats]:
        prefix = f"{module}.{kind}"
        if f"{prefix}.hist" not in self.tensors:
            return None
        return TensorStats.from_tensors(self.tensors, prefix)


def calibrate_model(model: nn.Module, batches: list[dict], cfg: CalibrateConfig,
                    reporter: Optional[Reporter] = None) -> dict[str, dict[str, TensorStats]]:
    """{module name: {"input"/"output"/"weight": TensorStats}} for every Linear, one decoder layer at a time; and
    {"<experts>.<gate_up_proj|down_proj>.<e>": {"input": ...}} for each MoE expert (3-D weights, experts.py) over
    the tokens routed to it."""
    reporter = reporter or Reporter()
    lw = Layerwise(model, batches)
    names = {m: n for n, m in model.named_modules()}
    stats: dict[str, dict[str, TensorStats]] = {}
    new = lambda: TensorStats(cfg.histogram_bins)  # noqa: E731
    seen: dict[int, tuple] = {}  # per batch: id(input tensor) -> (tensor, its record); holding the tensor keeps
    # its id from being reused by a later activation of the same batch

    def hook(module, args, out):
        name = names[module]
        rec = stats.setdefault(name, {})
        mask = lw.token_mask()
        x = args[0]
        if id(x) in seen:
            rec["input"] = seen[id(x)][1]  # q/k/v and gate/up read one tensor: observe it once
        else:
            seen[id(x)] = (x, rec.setdefault("input", new()))
            seen[id(x)][1].update(x[mask])
        rec.setdefault("output", new()).update(out[mask])

    def expert_input(key: str, rows: torch.Tensor) -> None:
        stats.setdefault(key, {}).setdefault("input", new()).update(rows)

    steps = [(i, b) for i in range(len(lw)) for b in range(len(batches))]
    handles, watching = [], None
    try:
        for i, b in reporter.track(steps, total=len(steps), description="calibrate"):
            if b == 0:
                handles = [m.register_forward_hook(hook) for m in lw.layers[i].modules() if isinstance(m, nn.Linear)]
                prefix = names[lw.layers[i]]
                moe = {f"{prefix}.{rel}": m for rel, m in expert_modules(lw.layers[i]).items()}
                watching = watching_inputs(moe, expert_input, lw.token_mask)
                watching.__enter__()
                reporter.update(layer=i)
            seen.clear()
            lw.run(i, update=True, batches=[b])
            if b == len(batches) - 1:
                for h in handles:
                    h.remove()
                handles = []
                watching.__exit__(None, None, None)
                watching = None
    finally:
        for h in handles:
            h.remove()
        if watching is not None:
            watching.__exit__(None, None, None)
    # layers outside the decoder stack that read its final states (lm_head, after the final norm)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    norm = getattr(getattr(model, "model", None), "norm", None)
    if isinstance(head, nn.Linear) and norm is not None:
        rec = stats.setdefault(names[head], {})
        with torch.no_grad():
            for b, h in enumerate(lw.final_hidden()):
                rec.setdefault("input", new()).update(norm(h)[batches[b]["attention_mask"].bool()])
    if cfg.weights:
        for m, name in names.items():
            if isinstance(m, nn.Linear):
                stats.setdefault(name, {})["weight"] = w = new()
                w.update(m.weight, channel_dim_last=False)
    return stats


def kv_summary(model: nn.Module, stats: dict[str, dict[str, TensorStats]]) -> dict:
    """absmax of k_proj / v_proj outputs per layer, per tensor and per KV head."""
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    out = {}
    for name, rec in stats.items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("k_proj", "v_proj") and "output" in rec:
            o = rec["output"]
            per_channel = torch.maximum(o.min.abs(), o.max.abs())
            out[name] = {"absmax": o.absmax(), "per_head_absmax": per_channel.reshape(-1, head_dim).amax(1).tolist()}
    return out


def run(cfg: CalibrateConfig, out_dir: Path, inputs, reporter: Optional[Reporter] = None) -> dict:
    from llmcompress.data import sample_texts
    from llmcompress.models import load_model

    reporter = reporter or Reporter()
    out_dir = Path(out_dir)
    model, tok = load_model(inputs.model or cfg.model)
    texts = sample_texts(cfg.data, cfg.seed)
    device = next(model.parameters()).device
    batches = make_batches(tok, texts, cfg.data.max_length, cfg.batch_size, device)
    if not batches:
        raise UserError(f"{cfg.data.source}: no samples left after tokenization")
    stats = calibrate_model(model, batches, cfg, reporter)
    bad = [f"{name}.{kind} ({s.nonfinite} values)" for name, rec in stats.items() for kind, s in rec.items()
           if s.nonfinite]
    if bad:
        raise UserError(f"NaN/Inf in {len(bad)} calibration statistic(s): {', '.join(bad[:10])}; a model or data "
                        f"problem; nothing written")
    tensors = {}
    for name, rec in sorted(stats.items()):
        for kind, s in rec.items():
            # q/k/v (and gate/up) share one input observer: clone so each name owns its tensor on disk
            tensors.update({k: v.detach().clone() for k, v in s.tensors(f"{name}.{kind}").items()})
    save_file(tensors, str(out_dir / STATS_FILE), metadata={"format": "llmc-calibration-v1"})
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    summary = {
        "samples": len(texts), "tokens": tokens, "batches": len(batches), "histogram_bins": cfg.histogram_bins,
        "percentiles": cfg.percentiles,
        "modules": {name: {kind: s.summary(cfg.percentiles) for kind, s in sorted(rec.items())}
                    for name, rec in sorted(stats.items())},
    }
    if cfg.kv_cache:
        summary["kv_cache"] = kv_summary(model, stats)
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    inputs_ = [(n, r["input"]) for n, r in summary["modules"].items() if "input" in r]
    top = sorted(inputs_, key=lambda t: -t[1]["absmax"])[:10]
    p_hi = f"{max(cfg.percentiles):g}" if cfg.percentiles else None
    return {
        "samples": len(texts), "tokens": tokens, "modules": len(stats),
        "max_input_absmax": top[0][1]["absmax"] if top else 0.0,
        "tables": {"largest Linear inputs (all in summary.json)": [
            {"module": n, "absmax": r["absmax"], **({f"p{p_hi}": r["percentiles"][p_hi]} if p_hi else {}),
             "top_channel": r["outlier_channels"][0]["channel"] if r["outlier_channels"] else -1}
            for n, r in top]},
    }
