"""The evaluate stage: measure the candidate (and a baseline, and any models to compare), one model in memory at a
time, then compare, gate and report.

Columns run baseline, compare..., candidate. A baseline or compare entry may be a model (hub id, directory, the
embedded default), a model-holding artifact (quantize, train-student), or an earlier evaluate artifact, whose
stored candidate results are reused when they were measured with the same settings.
"""

from __future__ import annotations

import collections
import gc
import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

import torch

from ..artifacts import is_artifact, read_artifact
from ..config import EvaluateConfig, ModelConfig
from ..data import load_text
from ..distributed import process_group
from ..errors import UserError
from ..models import is_quantized_dir, load_model, resolve_model
from ..progress import Reporter
from .gates import check_gates, require_measurements
from .harness import check_tasks, run_tasks
from .perplexity import perplexity
from .report import comparison_rows, write_report
from .speed import checkpoint_size_bytes, measure_speed

DTYPE_LABEL = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def bits_per_weight(model) -> float:
    """Stored bits per weight over every Linear-like layer (nn.Linear or our QuantLinear) except the output
    embedding: codes plus scales/zeros for quantized ones, the dtype's width for float ones. This is the x axis
    of the GPTQ/AWQ-style "perplexity vs bits" plot (W4 with fp16 scales per 128 columns: 4.125)."""
    skip = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    bits, weights = 0, 0
    for module in model.modules():
        if module is skip or not (hasattr(module, "in_features") and hasattr(module, "out_features")):
            continue
        tensors = [t for n, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(
            recurse=False)) if n not in ("bias", "input_scale") and t is not None]
        if not tensors:
            continue
        bits += sum(t.numel() * t.element_size() * 8 for t in tensors)
        weights += module.in_features * module.out_features
    return bits / weights if weights else float("nan")


def describe(model, model_cfg: ModelConfig) -> dict:
    """label, dtype, quantization summary, bits per weight and checkpoint size of a loaded model."""
    dtype = next(model.parameters()).dtype
    source = resolve_model(model_cfg.name)
    info = {"name": model_cfg.name, "dtype": str(dtype).replace("torch.", ""),
            "bits_per_weight": bits_per_weight(model), "quantization": None}
    size = checkpoint_size_bytes(source) if isinstance(source, Path) else None
    info["size_mb"] = size / 2**20 if size is not None else None
    label = DTYPE_LABEL.get(dtype, info["dtype"])
    if isinstance(source, Path) and source.is_dir() and is_quantized_dir(source):
        from ..quant.checkpoint import read_quantization_config
        from ..quant.qlinear import Scheme

        qc = read_quantization_config(source)
        schemes = collections.Counter(Scheme.from_dict(s).name for s in qc["modules"].values())
        info["quantization"] = {"method": qc.get("method"), "schemes": dict(schemes), "modules": len(qc["modules"])}
        label = "+".join(s for s, _ in schemes.most_common()) + f" {qc.get('method', '')}".rstrip()
    info["label"] = label
    return info


def _model_for(spec: str, template: ModelConfig) -> tuple[Optional[ModelConfig], Optional[Path]]:
    """(model config, None) for a model or model-holding artifact; (None, path) for an evaluate artifact."""
    path = Path(spec).expanduser()
    if not is_artifact(path):
        return replace(template, name=spec), None
    from ..stages import model_of_artifact

    art = read_artifact(path, verify_hashes=False)
    if art.stage == "evaluate":
        return None, path
    return model_of_artifact(art, template), None


def _measured_settings(cfg: EvaluateConfig) -> dict:
    """The settings a stored result must share to be compared with this run's measurements."""
    out = {}
    if cfg.ppl.enabled:
        out["ppl"] = {k: v for k, v in asdict(cfg.ppl).items() if k not in ("enabled", "batch_size")}
    if cfg.tasks.names:
        out["tasks"] = {k: v for k, v in asdict(cfg.tasks).items() if k in ("names", "limit", "num_fewshot")}
    if cfg.speed.enabled:
        out["speed"] = {k: v for k, v in asdict(cfg.speed).items() if k != "enabled"}
    return out


def _stored_result(path: Path, cfg: EvaluateConfig, role: str) -> dict:
    data = json.loads((path / "results.json").read_text())
    stored = next(r for r in data["models"] if r["role"] == "candidate")
    wanted, had = _measured_settings(cfg), data["settings"].get("measured", {})
    for section, values in wanted.items():
        for key, value in values.items():
            if had.get(section, {}).get(key, "<not measured>") != value:
                raise UserError(f"{path}: stored evaluation has {section}.{key}="
                                f"{had.get(section, {}).get(key, '<not measured>')!r}, this run {value!r}; "
                                f"compare with the model itself or rerun that evaluation with the same settings")
    return {**stored, "role": role, "reused_from": str(path)}


def evaluate_model(model_cfg: ModelConfig, role: str, cfg: EvaluateConfig, reporter: Reporter,
                   text_cache: dict, device: Optional[str] = None) -> dict:
    reporter.info(f"evaluate: {role} {model_cfg.name}")
    model, tok = load_model(model_cfg, device=device)
    try:
        result = {"role": role, **describe(model, model_cfg)}
        if cfg.ppl.enabled:
            key = (cfg.ppl.dataset, cfg.ppl.split)
            if key not in text_cache:
                text_cache[key] = load_text(*key)
            result["ppl"] = perplexity(model, tok, text_cache[key], seq_len=cfg.ppl.seq_len, stride=cfg.ppl.stride,
                                       max_tokens=cfg.ppl.max_tokens, batch_size=cfg.ppl.batch_size,
                                       reporter=reporter, dataset=cfg.ppl.dataset)
        if cfg.tasks.names:
            tasks = run_tasks(model, tok, cfg.tasks.names, limit=cfg.tasks.limit, num_fewshot=cfg.tasks.num_fewshot,
                              batch_size=cfg.tasks.batch_size, bootstrap_iters=cfg.tasks.bootstrap_iters,
                              data_dir_path=cfg.tasks.data_dir,
                              include_path=cfg.tasks.include_path, max_gen_toks=cfg.tasks.max_gen_toks,
                              seed=cfg.seed, reporter=reporter)
            result["tasks_meta"] = tasks.pop("_meta")
            result["tasks"] = tasks
        if cfg.speed.enabled:
            result["speed"] = measure_speed(model, cfg.speed, seed=cfg.seed, reporter=reporter)
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return result


def run(cfg: EvaluateConfig, out_dir: Path, inputs, reporter: Reporter) -> dict:
    """Under torchrun the perplexity windows are split across the ranks (tasks and speed run on every rank)."""
    with process_group() as ranks:
        return _run(cfg, out_dir, inputs, reporter, ranks.device)


def _run(cfg: EvaluateConfig, out_dir: Path, inputs, reporter: Reporter, device: Optional[str]) -> dict:
    require_measurements(cfg)
    check_tasks(cfg.tasks.names, cfg.tasks.data_dir, cfg.tasks.include_path)
    candidate = inputs.model or cfg.model
    plan: list[tuple[str, str]] = ([("baseline", cfg.baseline)] if cfg.baseline else []) + \
        [("compare", c) for c in cfg.compare]
    # resolve every spec before the first (slow) measurement so a typo fails at once
    resolved = [(role, *_model_for(spec, candidate)) for role, spec in plan]
    for role, mcfg, _ in resolved:
        if mcfg is not None:
            resolve_model(mcfg.name, role)
    resolve_model(candidate.name)

    text_cache: dict = {}
    results = []
    for role, mcfg, stored in resolved:
        results.append(_stored_result(stored, cfg, role) if stored is not None
                       else evaluate_model(mcfg, role, cfg, reporter, text_cache, device))
    results.append(evaluate_model(candidate, "candidate", cfg, reporter, text_cache, device))
    _unique_labels(results)

    base = next((r for r in results if r["role"] == "baseline"), None)
    failed = check_gates(cfg.gates, results[-1], base)
    settings = {"measured": _measured_settings(cfg), "tasks": {**asdict(cfg.tasks)}}
    if results[-1].get("tasks_meta"):
        settings["tasks"]["lm_eval_version"] = results[-1]["tasks_meta"].get("lm_eval_version")
        settings["tasks"]["data"] = results[-1]["tasks_meta"].get("data", {})
    files = write_report(out_dir, results, settings, failed, asdict(cfg.gates))

    cand = results[-1]
    title = f"evaluate: {cand['label']}" + (f" vs {base['label']}" if base else "")
    rows = comparison_rows(results)
    summary = {"model": cand["name"], "label": cand["label"], "bits_per_weight": cand["bits_per_weight"],
               "size_mb": cand["size_mb"], "files": files,
               "tables": {title: rows}, "table_columns": {title: list(rows[0])}}
    if cand.get("ppl"):
        summary.update(ppl=cand["ppl"]["ppl"], word_ppl=cand["ppl"]["word_ppl"],
                       bits_per_byte=cand["ppl"]["bits_per_byte"], tokens_scored=cand["ppl"]["tokens_scored"])
    if failed:
        summary["gates_failed"] = failed
    return summary


def _unique_labels(results: list[dict]) -> None:
    """Two columns must never share a title: same-label models get their directory name appended."""
    counts = collections.Counter(r["label"] for r in results)
    for r in results:
        if counts[r["label"]] > 1:
            r["label"] = f"{r['label']} {Path(r['name']).name}"
    counts = collections.Counter(r["label"] for r in results)
    seen: collections.Counter = collections.Counter()
    for r in results:
        if counts[r["label"]] > 1:
            seen[r["label"]] += 1
            r["label"] = f"{r['label']} #{seen[r['label']]}"
