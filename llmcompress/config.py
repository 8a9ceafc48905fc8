"""Typed config schemas, one per stage, and the one place configs are validated.

A schema is a dataclass whose fields carry their default and a one-line help (`opt`). `load_config` reads
YAML (safe_load only), applies `--set key.path=value` overrides, and converts the mapping into the schema,
rejecting unknown keys, wrong types and out-of-range values with a `ConfigError` that names the file, the key
path and what was expected. Validation happens once, here, at the edge; stages trust the object they get.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .errors import ConfigError, UserError

_UNSET = object()
_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def opt(default=_UNSET, help: str = "", *, factory=None, **checks) -> Any:
    """A schema field: default (or factory for lists/dicts), a one-line help, and checks
    (ge, gt, le, lt on numbers; min_len on lists/strings)."""
    meta = {"help": help, **checks}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


class Invalid(Exception):
    """Raised by a schema's `check()` for a cross-field rule; `from_dict` adds the file and key prefix."""

    def __init__(self, key: str, expected: str, got=_UNSET):
        super().__init__(key, expected)
        self.key, self.expected, self.got = key, expected, got


def _join(prefix: str, key) -> str:
    if isinstance(key, int):
        return f"{prefix}[{key}]"
    return f"{prefix}.{key}" if prefix else str(key)


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0])}"
    if origin is dict:
        return f"a mapping of str to {_describe(args[1])}"
    if is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _convert(value, tp, source: str, path: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        if len(arms) == 1:  # Optional[X]: X's own message is the precise one
            return _convert(value, arms[0], source, path)
        for arm in args:
            if arm is type(None):
                continue
            try:
                return _convert(value, arm, source, path)
            except ConfigError:
                continue
        raise ConfigError(source, path, _describe(tp), value)
    if origin is Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        raise ConfigError(source, path, _describe(tp), value)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(source, path, _describe(tp), value)
        return [_convert(v, args[0], source, _join(path, i)) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(source, path, _describe(tp), value)
        return {str(k): _convert(v, args[1], source, _join(path, k)) for k, v in value.items()}
    if is_dataclass(tp):
        return from_dict(tp, value, source, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            value = float(value)  # YAML 1.1 reads 3e-4 (no dot) as a string; it is plainly a number
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if value != value or value in (float("inf"), float("-inf")):
                raise ConfigError(source, path, "a finite number", value)
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(source, path, _describe(tp), value)


def _check_range(value, meta: dict, source: str, path: str) -> None:
    if value is None:
        return
    bounds = {"ge": (lambda v, b: v >= b, ">= "), "gt": (lambda v, b: v > b, "> "),
              "le": (lambda v, b: v <= b, "<= "), "lt": (lambda v, b: v < b, "< ")}
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        wanted = [f"{sym}{meta[k]}" for k, (ok, sym) in bounds.items() if k in meta and not ok(value, meta[k])]
        if wanted:
            allowed = " and ".join(f"{sym}{meta[k]}" for k, (_, sym) in bounds.items() if k in meta)
            raise ConfigError(source, path, f"a value {allowed}", value)
    if "min_len" in meta and hasattr(value, "__len__") and len(value) < meta["min_len"]:
        raise ConfigError(source, path, f"at least {meta['min_len']} item(s)", value)


def from_dict(cls, data, source: str = "<config>", prefix: str = "", base=None):
    """Build schema `cls` from a plain mapping, validating every key, type and range. Keys the mapping leaves out
    come from `base` (the field's own default instance for a nested section), so a partial override such as
    `--set data.max_length=256` keeps the stage's other `data` defaults rather than the section class's."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, prefix, f"a mapping ({cls.__name__})", data)
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if f.init}
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(source, _join(prefix, key),
                              f"a known key{hint}; allowed: {', '.join(sorted(known))}", has_got=False)
    kwargs = {}
    for name, f in known.items():
        if name not in data:
            continue
        path = _join(prefix, name)
        tp = hints[name]
        if is_dataclass(tp) and isinstance(data[name], dict):
            nested_base = getattr(base, name) if base is not None else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            value = from_dict(tp, data[name], source, path, nested_base)
        else:
            value = _convert(data[name], tp, source, path)
        _check_range(value, f.metadata, source, path)
        kwargs[name] = value
    if base is not None:
        for name in known:
            if name not in kwargs:
                kwargs[name] = copy.deepcopy(getattr(base, name))
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        try:
            check()
        except Invalid as e:
            got = e.got
            raise ConfigError(source, _join(prefix, e.key), e.expected, got, has_got=got is not _UNSET) from None
    return obj


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def parse_override(text: str) -> tuple[str, Any]:
    """`key.path=value`; the value is read as YAML so `3`, `true`, `[a, b]` and `null` get their types."""
    if "=" not in text:
        raise UserError(f"--set {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"--set {text!r}: expected key.path=value with a non-empty key path")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(data: dict, overrides: list[str]) -> tuple[dict, list[str]]:
    keys = []
    for text in overrides:
        key, value = parse_override(text)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
        keys.append(key)
    return data, keys


def read_yaml(path: Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory; expected a YAML config file")
    if not path.is_file():
        raise UserError(f"{path}: config file not found" if not path.exists() else f"{path}: not a regular file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); expected a YAML config file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "malformed YAML"
        raise UserError(f"{path}: malformed YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), "", "a YAML mapping at the top level", data)
    return data


def load_config(cls, path: Optional[Path] = None, overrides: Optional[list[str]] = None,
                flags: Optional[dict[str, str]] = None):
    """Read `path` (optional: defaults alone are a valid config), apply `--set` overrides, validate.
    `flags` maps a key an override sets to the CLI option that set it (`tasks.limit` -> `--limit`), so an error in
    it names that option; any other override's error names `--set`."""
    source = str(path) if path else "<defaults>"
    data = read_yaml(path) if path else {}
    data, keys = apply_overrides(data, list(overrides or []))
    try:
        return from_dict(cls, data, source)
    except ConfigError as e:
        for k in reversed(keys):  # the last override of a key is the one that counts
            if e.key == k or e.key.startswith((k + ".", k + "[")) or k.startswith(e.key + "."):
                raise ConfigError((flags or {}).get(k, "--set"), e.key, e.expected, e.got,
                                  has_got=e.has_got) from None
        raise


def schema_rows(cls, prefix: str = "", instance=None) -> list[tuple[str, str, str, str]]:
    """(key path, type, default, help) for every leaf key: the README's config table and `--help` read this.
    Defaults come from an instance, so a nested section's stage-specific defaults show as they apply."""
    instance = cls() if instance is None else instance
    rows = []
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        tp = hints[f.name]
        path = _join(prefix, f.name)
        value = getattr(instance, f.name)
        if is_dataclass(tp):
            rows.extend(schema_rows(tp, path, value))
            continue
        rows.append((path, _describe(tp), repr(value), f.metadata.get("help", "")))
    return rows


# --------------------------------------------------------------------------------------------------------------
# Shared pieces


@dataclass
class ModelConfig:
    name: str = opt("smollm2-135m", "Hugging Face id, local model/artifact directory, .gguf file, or the "
                    "embedded default 'smollm2-135m' (SmolLM2-135M-Instruct)")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = opt(
        "auto", "weights/compute dtype; auto = bfloat16 on CUDA, float32 on CPU")
    device: str = opt("auto", "torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    revision: Optional[str] = opt(None, "hub revision (branch, tag or commit) for a hub id")
    trust_remote_code: bool = opt(False, "run Python code shipped with a hub model; off unless you trust it")

    def check(self):
        if not self.name.strip():
            raise Invalid("name", "a model id, path or 'smollm2-135m'", self.name)
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise Invalid("device", "auto, cpu, cuda or cuda:N", self.device)


@dataclass
class DataConfig:
    source: str = opt("builtin:alpaca_en_demo", "dataset: builtin:NAME (shipped in the package), a .txt/.json/"
                      ".jsonl/.tsv/.csv file, or a hub dataset 'name' / 'name:config'")
    split: str = opt("train", "split for hub datasets")
    template: str = opt("", "Python format string over a row's fields, e.g. '{instruction}\\n{output}'; "
                        "empty = the 'text' field, or all string fields joined")
    num_samples: int = opt(128, "rows to use", ge=1)
    max_length: int = opt(512, "tokens per sample (longer samples are truncated)", ge=8)
    shuffle: bool = opt(True, "sample rows at random (seeded) rather than the first N")

    def check(self):
        problem = data_source_problem(self.source)
        if problem:
            raise Invalid("source", problem, self.source)
        problem = template_problem(self.template)
        if problem:
            raise Invalid("template", problem, self.template)


DATA_SUFFIXES = (".txt", ".md", ".raw", "", ".json", ".jsonl", ".tsv", ".csv")


def data_source_problem(source: str) -> Optional[str]:
    """What is wrong with a dataset name (None if nothing is): an unknown builtin, a directory or other non-file,
    an unsupported file type, or a path-like name that does not exist. Other names are hub datasets."""
    if source.startswith("builtin:"):
        if source.split(":", 1)[1] not in BUILTIN_DATA:
            return "builtin:NAME with NAME one of " + ", ".join(sorted(BUILTIN_DATA))
        return None
    try:
        p = Path(source).expanduser()
        exists = p.exists()
    except (OSError, ValueError):
        return "a dataset file path or hub dataset name"
    if exists:
        if p.is_dir():
            return "a dataset file, not a directory"
        if not p.is_file():
            return "a regular dataset file"
        if p.suffix.lower() not in DATA_SUFFIXES:
            return "a .txt, .json, .jsonl, .tsv or .csv file"
        return None
    if (not source.strip() or source.startswith((".", "/", "~")) or "\\" in source or source.count("/") > 1
            or Path(source.split(":", 1)[0]).suffix.lower() in (".txt", ".json", ".jsonl", ".tsv", ".csv")):
        return "an existing dataset file (not found)"
    return None


def template_problem(template: str, allowed: Optional[tuple[str, ...]] = None) -> Optional[str]:
    """A row template may only name fields, `{instruction}`: positional fields (`{}`, `{0}`), attribute or index
    access (`{0.__class__}`, `{a[b]}`) and nested specs are refused, as they can only be mistakes or probes."""
    import string

    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        return f"a Python format string with named fields ({e})"
    for _, name, spec, _conv in parsed:
        if name is None:
            continue
        if name == "" or name.isdigit():
            return "named fields only, e.g. {instruction}; positional fields such as {} or {0} are refused"
        if any(c in name for c in ".[]"):
            return "plain field names only, e.g. {instruction}; attribute or index access is refused"
        if spec and "{" in spec:
            return "field formats without nested {fields}"
        if allowed is not None and name not in allowed:
            return "only the fields " + ", ".join("{" + a + "}" for a in allowed)
    return None


BUILTIN_DATA = {
    "wikitext2_test": "wikitext2_test.txt",
    "alpaca_en_demo": "alpaca_en_demo.json",
    "gsm8k_train": "gsm8k_train_400.jsonl",
    "gsm8k_test": "gsm8k_test_250.jsonl",
    "sst2_train": "sst2_train_2000.tsv",
    "sst2_dev": "sst2_dev.tsv",
}


# --------------------------------------------------------------------------------------------------------------
# calibrate


def _default_calib_data() -> DataConfig:
    return DataConfig(source="builtin:alpaca_en_demo", num_samples=64, max_length=512)


@dataclass
class CalibrateConfig:
    model: ModelConfig = opt(factory=ModelConfig, help="the model to calibrate")
    data: DataConfig = opt(factory=_default_calib_data, help="calibration samples (never an evaluation split)")
    batch_size: int = opt(8, "samples per forward pass", ge=1)
    percentiles: list[float] = opt(factory=lambda: [99.0, 99.9, 99.99], help="activation |x| percentiles to record",
                                   min_len=1)
    histogram_bins: int = opt(2048, "bins of each per-layer |x| histogram (bounds observer memory)", ge=16)
    weights: bool = opt(True, "also record weight statistics")
    kv_cache: bool = opt(True, "record k_proj/v_proj outputs for KV-cache scales")
    seed: int = opt(0, "seed for sampling rows")

    def check(self):
        for i, p in enumerate(self.percentiles):
            if not 0.0 < p <= 100.0:
                raise Invalid(f"percentiles[{i}]", "a percentile in (0, 100]", p)


# --------------------------------------------------------------------------------------------------------------
# quantize


@dataclass
class WeightQuantConfig:
    format: Literal["int8", "int4", "fp8", "none"] = opt("int8", "weight number format")
    symmetric: bool = opt(True, "symmetric (zero point 0) or asymmetric")
    granularity: Literal["tensor", "channel", "group"] = opt("channel", "one scale per tensor, output channel, "
                                                             "or group of input columns")
    group_size: int = opt(128, "columns per group when granularity is 'group' (a ragged last group is allowed; "
                          "a group longer than every selected layer's rows is refused)", ge=1, le=65536)
    observer: Literal["minmax", "percentile", "clip", "mse", "kl"] = opt("minmax", "how a range becomes a scale")
    percentile: float = opt(99.99, "percentile for the 'percentile' observer", gt=0.0, le=100.0)
    clip_threshold: Optional[float] = opt(None, "fixed |x| clipping threshold T for the 'clip' observer", gt=0.0)
    scale_dtype: Literal["float16", "bfloat16", "float32"] = opt("float16", "dtype the scales are stored in")
    zero_point: Literal["int", "float"] = opt("int", "asymmetric int4 only: the offset as an integer code, "
                                              "w = s·(q − z), or as a float m in the scale dtype, w = s·q + m "
                                              "(GGUF q4_1's grid; with the minmax observer RTN rounds exactly as "
                                              "llama.cpp does); float runs dequantize-then-matmul, not the W4A16 "
                                              "kernel")

    def check(self):
        if self.zero_point == "float" and (self.format != "int4" or self.symmetric):
            raise Invalid("zero_point", "'int' unless format is int4 and symmetric is false", self.zero_point)
        if self.observer == "clip" and self.clip_threshold is None:
            raise Invalid("clip_threshold", "a threshold T > 0 when observer is 'clip'", None)


@dataclass
class ActivationQuantConfig:
    format: Literal["none", "int8", "fp8"] = opt("int8", "activation number format; none = weight-only")
    dynamic: bool = opt(True, "per-token scales computed at run time (true) or static per-tensor scales from "
                        "the calibration artifact (false)")
    observer: Literal["minmax", "percentile", "mse", "kl"] = opt("minmax", "observer for static scales")
    percentile: float = opt(99.99, "percentile for the 'percentile' observer", gt=0.0, le=100.0)

    @property
    def static(self) -> bool:
        """Static per-tensor input scales (observed in calibration) rather than per-token ones at run time."""
        return self.format != "none" and not self.dynamic


@dataclass
class KVCacheQuantConfig:
    format: Literal["none", "int8", "fp8"] = opt("none", "KV-cache number format")
    granularity: Literal["tensor", "head"] = opt("tensor", "one scale per tensor or per KV head")


def _default_algo_data() -> DataConfig:
    return DataConfig(source="builtin:alpaca_en_demo", num_samples=128, max_length=512)


@dataclass
class GPTQConfig:
    damp: float = opt(0.01, "percdamp: λ = damp · mean(diag H) added to H's diagonal before inverting", ge=0.0)
    block_size: int = opt(128, "columns per lazy batch update (GPTQ's blocksize)", ge=1)
    act_order: bool = opt(True, "quantize columns in order of decreasing diag(H) (activation order)")
    static_groups: bool = opt(False, "fix every group's scale from the original W before any update; act_order "
                              "always does, so groups stay contiguous in the checkpoint (no g_idx) for the kernels")
    true_sequential: bool = opt(True, "within a decoder layer, quantize q/k/v, then o, then gate/up, then down, "
                                "each on inputs produced by the already-quantized sublayers")
    refit_scales: bool = opt(True, "after GPTQ, re-solve each row's scales for the chosen codes by least squares "
                             "on the same damped Hessian (a row keeps its old scales unless the error drops)")
    normalize_tokens: bool = opt(True, "build H from unit-norm input rows, so every calibration token weighs the "
                                 "same (the plain H is dominated by the few huge-norm tokens: attention sinks)")

    def check(self):
        if self.block_size % 2:
            raise Invalid("block_size", "an even number of columns", self.block_size)


@dataclass
class AWQConfig:
    grid: int = opt(20, "number of α values searched in [0, 1) for each of s = x̄^α / w̄^(1−α) and s = x̄^α "
                    "(α = 0 is scale 1)", ge=1)
    gptq: bool = opt(False, "quantize the scaled weights with GPTQ (settings from gptq.*) instead of RTN")
    clip: bool = opt(True, "after scaling, clip each group's weights to the max |w| that minimises its output "
                     "error (AWQ's clip search; group granularity only)")
    clip_qk: bool = opt(False, "also clip q_proj and k_proj (AutoAWQ does not: attention logits amplify their "
                        "error)")
    clip_tokens: int = opt(512, "calibration rows (evenly spaced among the search_tokens sampled) the clip search "
                           "scores each clip on", ge=16)
    refit_scales: bool = opt(True, "after scaling and clipping, keep each row's RTN codes and re-solve its group "
                             "scales by least squares on the unit-norm input rows' Gram matrix (as "
                             "gptq.refit_scales)")
    group_rounds: int = opt(0, "after the α grid, rounds of coordinate descent in which each quantization group "
                            "of input channels takes its own α from the same grid (never a worse loss; about 3x "
                            "slower); 0: one α per group of Linears, as AWQ", ge=0)
    search_tokens: int = opt(4096, "calibration tokens (rows) sampled per layer to score each α", ge=16)
    normalize_tokens: bool = opt(False, "score α and the clip search on unit-norm input rows, so every "
                                 "calibration token weighs the same (as gptq.normalize_tokens)")


@dataclass
class SmoothQuantConfig:
    enabled: bool = opt(False, "migrate activation outliers into the weights before W8A8 (SmoothQuant)")
    alpha: float = opt(0.5, "migration strength α in s_j = max|X_j|^α / max|W_j|^(1−α)", ge=0.0, le=1.0)
    alpha_grid: list[float] = opt(factory=list, help="if non-empty, α is searched per layer over these values on "
                                  "the quantized output error (alpha is then unused)")
    mlp_down: bool = opt(True, "also smooth down_proj inputs by folding into up_proj")


@dataclass
class QuantizeConfig:
    model: ModelConfig = opt(factory=ModelConfig, help="model to quantize when the input is not a calibration "
                             "artifact (a calibration artifact names its own model)")
    method: Literal["rtn", "gptq", "awq"] = opt("rtn", "weight quantization algorithm")
    gptq: GPTQConfig = opt(factory=GPTQConfig, help="GPTQ settings (method: gptq)")
    awq: AWQConfig = opt(factory=AWQConfig, help="AWQ settings (method: awq)")
    smoothquant: SmoothQuantConfig = opt(factory=SmoothQuantConfig, help="SmoothQuant before W8A8")
    data: DataConfig = opt(factory=_default_algo_data, help="calibration rows for gptq / awq / smoothquant / "
                           "KV-cache and static scales, run layer by layer (never an evaluation split)")
    batch_size: int = opt(8, "calibration rows per forward pass in the layer-by-layer algorithms", ge=1)
    weights: WeightQuantConfig = opt(factory=WeightQuantConfig, help="weight quantization")
    activations: ActivationQuantConfig = opt(factory=ActivationQuantConfig, help="activation quantization")
    kv_cache: KVCacheQuantConfig = opt(factory=KVCacheQuantConfig, help="KV-cache quantization")
    include: list[str] = opt(factory=lambda: ["*"], help="fnmatch patterns of Linear module names to quantize",
                             min_len=1)
    exclude: list[str] = opt(factory=lambda: ["lm_head", "*embed*"], help="patterns kept in high precision")
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", "dtype the checkpoint stores its unquantized tensors in (embeddings, norms, excluded Linears, "
        "biases); auto = the source model's own (bfloat16 for the embedded default)")
    seed: int = opt(0, "seed for anything random")

    def check(self):
        """What cannot work, refused before any work (the nested sections checked their own keys already)."""
        w, a = self.weights, self.activations
        if w.format == "none":
            raise Invalid("weights.format", "int8, int4 or fp8 ('none' leaves nothing to quantize; KV-cache-only "
                          "quantization is not implemented)", w.format)
        from llmcompress.quant.quantize import weight_spec  # lazy: the schema module stays free of torch

        try:
            weight_spec(w)
        except ValueError as e:
            raise Invalid("weights", f"a servable weight format ({e})") from None
        if w.format == "int4" and w.granularity == "group" and w.group_size % 2:
            raise Invalid("weights.group_size", "an even group size for int4 (two codes per byte)", w.group_size)
        if w.zero_point == "float" and self.method == "awq":
            raise Invalid("weights.zero_point", "int with method awq (AWQ's clip and scale refit assume integer "
                          "zero points; float runs with rtn or gptq)", w.zero_point)
        if a.format == "int8":
            if w.format != "int8":
                raise Invalid("activations.format", f"none for {w.format} weights: int8 activations run on the "
                              f"W8A8 int8 kernel and need weights.format int8", a.format)
            if not w.symmetric or w.granularity == "group":
                raise Invalid("weights", "W8A8 needs symmetric per-channel or per-tensor weights "
                              "(weights.symmetric: true, weights.granularity: channel)")
        if a.format == "fp8" and w.format != "fp8":
            raise Invalid("activations.format", "none or weights.format fp8: fp8 activations need fp8 weights",
                          a.format)
        for key in ("include", "exclude"):
            for i, pattern in enumerate(getattr(self, key)):
                if not pattern.strip():
                    raise Invalid(f"{key}[{i}]", "a non-empty fnmatch pattern", pattern)
        for i, pattern in enumerate(self.exclude):
            if set(pattern) == {"*"}:
                raise Invalid(f"exclude[{i}]", "a pattern that leaves some layer to quantize ('*' excludes every "
                              "layer)", pattern)


# --------------------------------------------------------------------------------------------------------------
# evaluate


@dataclass
class PerplexityConfig:
    enabled: bool = opt(False, "measure perplexity (also turned on by --ppl)")
    dataset: str = opt("builtin:wikitext2_test", "text to score: builtin:NAME, a text file, or a hub dataset; the "
                       "whole split is joined and tokenized once (WikiText-2 raw test: ~300k tokens, minutes on "
                       "CPU; use max_tokens for a quick run)")
    split: str = opt("test", "split for hub datasets")
    seq_len: int = opt(2048, "window length in tokens (capped at the model's context)", ge=8)
    stride: Optional[int] = opt(None, "sliding-window stride: each window scores only its last `stride` tokens; "
                                "null = non-overlapping windows", ge=1)
    max_tokens: Optional[int] = opt(None, "use only the first N tokens of the split (quick runs, e.g. 16384); "
                                    "null = the whole split", ge=16)
    batch_size: int = opt(1, "windows per forward pass", ge=1)

    def check(self):
        problem = data_source_problem(self.dataset)
        if problem:
            raise Invalid("dataset", problem, self.dataset)
        if self.stride is not None and self.stride > self.seq_len:
            raise Invalid("stride", f"a stride <= seq_len ({self.seq_len}); a longer one skips tokens", self.stride)


@dataclass
class TasksConfig:
    names: list[str] = opt(factory=list, help="lm-eval tasks: the shipped llmc_* tasks on local files (llmc_arc_easy, "
                           "llmc_arc_challenge, llmc_piqa, llmc_hellaswag, llmc_lambada_openai, llmc_boolq, "
                           "llmc_gsm8k), stock lm-eval names (arc_easy, hellaswag, ...; read the hub), a task YAML "
                           "path, or a task of include_path")
    limit: Optional[int] = opt(None, "examples per task (quick runs)", ge=1)
    num_fewshot: Optional[int] = opt(None, "few-shot examples; null = each task's default", ge=0)
    batch_size: int = opt(8, "requests per forward pass", ge=1)
    max_gen_toks: int = opt(256, "generation cap for generative tasks whose config sets none", ge=1)
    bootstrap_iters: int = opt(1000, "bootstrap resamples for stderrs lm-eval cannot compute in closed form "
                               "(lm-eval's own default is 100000; 0 = none)", ge=0)
    data_dir: Optional[str] = opt(None, "folder the llmc_* tasks read their files from (arc/, piqa/, ...); null = "
                                  "$LLMC_DATA_DIR")
    include_path: Optional[str] = opt(None, "folder of your own lm-eval task YAMLs, whose task names tasks.names "
                                      "may then use")


@dataclass
class SpeedConfig:
    enabled: bool = opt(False, "measure latency/throughput/memory (also turned on by --speed)")
    prompt_lengths: list[int] = opt(factory=lambda: [512, 2048], help="prefill lengths (TTFT, prefill tokens/s); "
                                    "lengths over the model's context are skipped", min_len=1)
    batch_sizes: list[int] = opt(factory=lambda: [1, 8], help="decode batch sizes (decode tokens/s, per-step "
                                 "latency)", min_len=1)
    decode_context: int = opt(128, "prompt tokens prefilled (untimed) before the timed decode steps", ge=1)
    new_tokens: int = opt(32, "tokens generated per decode measurement", ge=1)
    warmup: int = opt(1, "untimed warm-up repetitions", ge=0)
    repeats: int = opt(3, "timed repetitions (the median is reported)", ge=1)

    def check(self):
        for key in ("prompt_lengths", "batch_sizes"):
            for i, v in enumerate(getattr(self, key)):
                if v < 1:
                    raise Invalid(f"{key}[{i}]", "a positive integer", v)


@dataclass
class GatesConfig:
    max_ppl_increase_pct: Optional[float] = opt(None, "fail if perplexity rises more than this % over baseline")
    min_task_retention_pct: Optional[float] = opt(None, "fail if any task accuracy metric keeps less than this % "
                                                  "of baseline", ge=0.0)
    min_decode_speedup: Optional[float] = opt(None, "fail if decode tokens/s / baseline's is lower, at any "
                                              "measured batch size", gt=0.0)
    max_size_ratio: Optional[float] = opt(None, "fail if checkpoint size / baseline size is larger", gt=0.0)
    max_ppl: Optional[float] = opt(None, "fail if perplexity is above this absolute value", gt=0.0)


@dataclass
class EvaluateConfig:
    model: ModelConfig = opt(factory=ModelConfig, help="model evaluated when no --input artifact is given")
    baseline: Optional[str] = opt(None, "model or artifact to compare with (enables the comparison table and the "
                                  "relative gates); null = no comparison")
    compare: list[str] = opt(factory=list, help="more models or artifacts measured alongside, one column each "
                             "(e.g. several quantizations in one table and one plot)")
    ppl: PerplexityConfig = opt(factory=PerplexityConfig, help="perplexity")
    tasks: TasksConfig = opt(factory=TasksConfig, help="downstream accuracy through lm-eval")
    speed: SpeedConfig = opt(factory=SpeedConfig, help="speed, memory, latency")
    gates: GatesConfig = opt(factory=GatesConfig, help="thresholds; a miss exits 1")
    seed: int = opt(0, "seed")


# --------------------------------------------------------------------------------------------------------------
# distill-data


@dataclass
class PromptsConfig(DataConfig):
    """DataConfig with distill-data's defaults as class defaults, so `--set prompts.num_samples=8` keeps them
    (a nested mapping is built from its class's defaults, not from the parent field's factory)."""

    source: str = opt("builtin:gsm8k_train", "dataset: builtin:NAME, a .txt/.json/.jsonl/.tsv/.csv file, or a hub "
                      "dataset 'name' / 'name:config'")
    template: str = opt("{question}", "Python format string over a row's fields that makes the user prompt")
    num_samples: int = opt(32, "prompts to use", ge=1)
    max_length: int = opt(256, "longest prompt in tokens (longer prompts are dropped)", ge=8)


DISTILL_STYLES = ("plain", "cot", "structured", "multiturn")


@dataclass
class DifficultyConfig:
    min_prompt_tokens: int = opt(0, "drop prompts shorter than this many tokens (before the chat template)", ge=0)
    max_prompt_tokens: Optional[int] = opt(None, "drop prompts longer than this (null = prompts.max_length)", ge=1)
    field: Optional[str] = opt(None, "metadata field to filter on: a number, or a string whose non-empty lines "
                               "not starting with '####' are counted (GSM8K 'answer' = solution steps)")
    min: Optional[float] = opt(None, "keep rows whose field value is >= this")
    max: Optional[float] = opt(None, "keep rows whose field value is <= this")

    def check(self):
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < self.min_prompt_tokens:
            raise Invalid("max_prompt_tokens", f"a value >= min_prompt_tokens ({self.min_prompt_tokens})",
                          self.max_prompt_tokens)
        if (self.min is not None or self.max is not None) and not self.field:
            raise Invalid("field", "a metadata field name when min or max is set", self.field)
        if self.min is not None and self.max is not None and self.max < self.min:
            raise Invalid("max", f"a value >= min ({self.min})", self.max)


@dataclass
class DistillDataConfig:
    teacher: ModelConfig = opt(factory=ModelConfig, help="the teacher LLM that writes the data")
    prompts: PromptsConfig = opt(factory=PromptsConfig, help="where prompts come from (prompts longer than "
                              "prompts.max_length tokens are dropped, not truncated)")
    styles: dict[str, float] = opt(factory=lambda: {"cot": 1.0}, help="task mix: style -> weight (prompts are "
                                   "split in these proportions); styles: plain, cot, structured, multiturn")
    system_prompt: Optional[str] = opt(None, "system message; null = the chat template's default")
    followup: str = opt("Now give only the final answer, in one short sentence.",
                        "the second user turn of the multiturn style")
    difficulty: DifficultyConfig = opt(factory=DifficultyConfig, help="filters on prompt length or metadata")
    answer_field: Optional[str] = opt("answer", "field holding a gold answer for answer checking (null = none); "
                                      "GSM8K style: the number after '####'")
    check_answers: bool = opt(True, "keep only responses whose final number matches the gold answer "
                              "(rejection sampling); rows without a gold answer are kept")
    min_new_tokens: int = opt(1, "minimum generated tokens", ge=0)
    max_new_tokens: int = opt(192, "maximum generated tokens", ge=1)
    do_sample: bool = opt(True, "sample (true) or greedy (false)")
    temperature: float = opt(0.7, "sampling temperature", gt=0.0)
    top_p: float = opt(0.95, "nucleus sampling mass", gt=0.0, le=1.0)
    top_k: int = opt(0, "sample only from the k most likely tokens (0 = off)", ge=0)
    samples_per_prompt: int = opt(1, "responses generated per prompt", ge=1)
    batch_size: int = opt(8, "sequences per generate() call (left-padded, KV cache on)", ge=1)
    dedup: bool = opt(True, "drop rows whose (prompt, response) repeats an earlier row (whitespace-normalised)")
    save_logits: bool = opt(False, "store the teacher's top-k log-probs of every generated token (safetensors)")
    logits_top_k: int = opt(16, "k for stored log-probs", ge=1)
    shard_rows: int = opt(1000, "rows per output JSONL shard", ge=1)
    seed: int = opt(0, "seed (prompt sampling, style assignment, and one generation seed per batch)")

    def check(self):
        for name, w in self.styles.items():
            if name not in DISTILL_STYLES:
                raise Invalid(f"styles.{name}", "one of " + ", ".join(DISTILL_STYLES), name)
            if w < 0:
                raise Invalid(f"styles.{name}", "a weight >= 0", w)
        if not self.styles or sum(self.styles.values()) <= 0:
            raise Invalid("styles", "at least one style with a weight > 0", self.styles)
        if self.min_new_tokens > self.max_new_tokens:
            raise Invalid("min_new_tokens", f"a value <= max_new_tokens ({self.max_new_tokens})",
                          self.min_new_tokens)


# --------------------------------------------------------------------------------------------------------------
# train-student


@dataclass
class ClassifierTrainData(DataConfig):
    """DataConfig with SST-2 train defaults as class defaults (so a partial override keeps them)."""

    source: str = opt("builtin:sst2_train", "dataset: builtin:NAME, a .json/.jsonl/.tsv/.csv file, or a hub "
                      "dataset 'name' / 'name:config'")
    num_samples: int = opt(512, "examples to use", ge=1)
    max_length: int = opt(96, "tokens per example for the student (longer are truncated)", ge=8)


@dataclass
class ClassifierEvalData(DataConfig):
    """DataConfig with SST-2 dev defaults as class defaults (so a partial override keeps them)."""

    source: str = opt("builtin:sst2_dev", "dataset: builtin:NAME, a .json/.jsonl/.tsv/.csv file, or a hub "
                      "dataset 'name' / 'name:config'")
    num_samples: int = opt(872, "examples to use", ge=1)
    max_length: int = opt(96, "tokens per example for the student (longer are truncated)", ge=8)
    shuffle: bool = opt(False, "sample rows at random (seeded) rather than the first N")


@dataclass
class ClassificationConfig:
    train: ClassifierTrainData = opt(factory=ClassifierTrainData, help="text the student learns from: the teacher's "
                            "soft labels, mixed by alpha with the gold labels where rows have them")
    eval: ClassifierEvalData = opt(factory=ClassifierEvalData, help="labelled held-out text for accuracy (never a training split)")
    text_field: str = opt("sentence", "field holding the text")
    label_field: Optional[str] = opt("label", "field holding the gold label (null = none: no gold term, no "
                                     "accuracy)")
    labels: list[str] = opt(factory=lambda: ["0", "1"], min_len=2,
                            help="the label field's values, in label-index order")
    verbalizers: list[str] = opt(factory=lambda: ["negative", "positive"], min_len=2,
                                 help="label index -> word the teacher scores by log-likelihood")
    prompt: str = opt("Review: {text}\nIs the sentiment of this movie review positive or negative? "
                      "Answer with one word.", "user message the teacher answers ({text} = the example); "
                      "write examples into it for a few-shot teacher")
    layers: list[int] = opt(factory=lambda: [0, 1, 2, 3, 4, 5], min_len=1,
                            help="teacher layers the student keeps (copied, in this order)")
    teacher_batch_size: int = opt(16, "examples per teacher scoring forward pass", ge=1)
    latency_examples: int = opt(32, "examples timed one at a time for per-example latency", ge=1)

    def check(self):
        problem = template_problem(self.prompt, allowed=("text",))
        if problem:
            raise Invalid("prompt", problem, self.prompt)


@dataclass
class RankingData(DataConfig):
    source: str = opt("", "dataset: a .json/.jsonl/.tsv/.csv file or a hub dataset 'name' / 'name:config'")
    num_samples: int = opt(2000, "rows to use", ge=1)
    max_length: int = opt(128, "tokens per (context, candidate) text for the student (longer are truncated)",
                          ge=8)


@dataclass
class RankingConfig:
    train: RankingData = opt(factory=RankingData, help="rows the student learns from: the teacher's scores, "
                             "mixed by alpha with the gold index where rows have one")
    eval: RankingData = opt(factory=lambda: RankingData(num_samples=500, shuffle=False),
                            help="labelled held-out rows for accuracy (never a training split)")
    context_field: str = opt("ctx", "field holding the context (query)")
    candidates_field: str = opt("endings", "field holding the list of candidates (same count in every row)")
    label_field: Optional[str] = opt("label", "field holding the right candidate's index (null = none)")
    layers: list[int] = opt(factory=lambda: [0, 1, 2, 3], min_len=1,
                            help="teacher layers the student keeps (copied, in this order)")
    teacher_batch_size: int = opt(32, "(context, candidate) pairs per teacher forward pass", ge=1)
    latency_examples: int = opt(32, "rows timed one at a time for per-row latency", ge=1)


@dataclass
class TrainStudentConfig:
    task: Literal["generative", "classification", "ranking"] = opt(
        "generative", "generative: a causal-LM student on distill-data rows; classification: a classifier "
        "student on the teacher's soft labels (see classification.*); ranking: a candidate scorer on the "
        "teacher's candidate scores (see ranking.*)")
    teacher: ModelConfig = opt(factory=ModelConfig, help="teacher for online KD and layer-initialised students")
    student: str = opt("", "student HF id/path; empty = built from the teacher by keeping every k-th layer")
    keep_every: int = opt(2, "k: keep teacher layers 0, k, 2k, ... for a built student (DistilBERT-style init)",
                          ge=1)
    alpha: float = opt(0.5, "weight of the KD term: L = α·T²·KL + (1−α)·CE; generative: CE on the teacher's "
                       "text (α = 0: sequence distillation); classification: CE on gold labels (α = 1: soft labels "
                       "only)", ge=0.0, le=1.0)
    temperature: float = opt(2.0, "softmax temperature T of the KD term", gt=0.0)
    kd_source: Literal["online", "stored"] = opt("online", "teacher logits from a live teacher or the top-k "
                                                 "log-probs stored by distill-data (save_logits: true)")
    kd_tail: Literal["bucket", "renormalize"] = opt("bucket", "stored top-k: the tail mass as one extra outcome, "
                                                    "or renormalise over the top-k and drop it")
    max_length: int = opt(384, "tokens per training sequence (longer rows are truncated)", ge=8)
    steps: int = opt(50, "optimizer steps", ge=1)
    batch_size: int = opt(4, "sequences per micro-batch, all processes together: under torchrun each of W "
                          "processes takes batch_size / W of them (a multiple of W)", ge=1)
    grad_accum: int = opt(1, "micro-batches per optimizer step", ge=1)
    parallel: Literal["ddp", "fsdp"] = opt("ddp", "under torchrun: ddp keeps a whole student on every process; "
                                           "fsdp (FSDP2) shards its weights, gradients and optimizer state")
    lr: float = opt(1e-4, "peak learning rate (AdamW)", gt=0.0)
    min_lr_ratio: float = opt(0.1, "cosine decays the learning rate to lr * min_lr_ratio", ge=0.0, le=1.0)
    weight_decay: float = opt(0.0, "AdamW weight decay", ge=0.0)
    warmup_steps: int = opt(5, "linear warm-up steps before cosine decay", ge=0)
    max_grad_norm: float = opt(1.0, "gradient clipping norm", gt=0.0)
    bf16: bool = opt(True, "bfloat16 autocast on CUDA (CPU always runs float32)")
    eval_every: int = opt(25, "held-out evaluation every N steps (and at the end)", ge=1)
    save_every: int = opt(25, "checkpoint every N steps into the work dir (a rerun resumes from the last)", ge=1)
    eval_fraction: float = opt(0.1, "fraction of rows held out", gt=0.0, lt=1.0)
    classification: ClassificationConfig = opt(factory=ClassificationConfig, help="task: classification")
    ranking: RankingConfig = opt(factory=RankingConfig, help="task: ranking")
    seed: int = opt(0, "seed")


# --------------------------------------------------------------------------------------------------------------
# export

@dataclass
class GGUFExportConfig:
    type: Literal["q8_0", "q4_0", "q4_1"] = opt("q8_0", "GGUF tensor type of the Linear weights (blocks of 32): "
                                               "q8_0 int8, q4_0 int4 symmetric, q4_1 int4 with an offset")


@dataclass
class ExportConfig:
    model: ModelConfig = opt(factory=ModelConfig, help="dense model exported when no --input artifact is given "
                             "(format: gguf only; compressed-tensors needs a quantize artifact)")
    format: Literal["compressed-tensors", "gguf"] = opt("compressed-tensors", "compressed-tensors: a Hugging Face "
                                                        "model directory that transformers, vLLM and SGLang load; "
                                                        "gguf: one .gguf file for llama.cpp")
    gguf: GGUFExportConfig = opt(factory=GGUFExportConfig, help="format: gguf")


STAGE_CONFIGS = {
    "distill-data": DistillDataConfig,
    "train-student": TrainStudentConfig,
    "calibrate": CalibrateConfig,
    "quantize": QuantizeConfig,
    "evaluate": EvaluateConfig,
    "export": ExportConfig,
}
