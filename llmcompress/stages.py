"""The six stages, how each finds its input, and the one driver that runs a stage into an artifact.

A stage is `run(cfg, out_dir, inputs, reporter) -> summary dict`: it writes files into `out_dir` (a temporary
directory), knows nothing of the terminal, and raises UserError for bad input. `run_stage` wraps it with the
artifact writer (manifest, hashes, atomic rename) and the cache key that `llmc run` uses to skip work.
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

from .artifacts import Artifact, ArtifactWriter, clean_stale, is_artifact, read_artifact, sha256_json
from .config import STAGE_CONFIGS, ModelConfig, from_dict, to_dict
from .errors import ArtifactError, UserError
from .progress import Reporter
from .resources import activation_bytes, check_fits, peak_rss_bytes, weights_bytes


@dataclass(frozen=True)
class StageSpec:
    name: str
    entry: str  # "module:function"
    default_output: str
    default_input: Optional[str]  # stage whose default output feeds this one when --input is omitted
    accepts: tuple[str, ...]  # artifact stages accepted as --input
    model_key: Optional[str]  # the config field naming the model this stage loads ("model", "teacher")
    check: Optional[str] = None  # "module:function" (cfg, inputs) -> None that refuses bad input before any work

    @property
    def fn(self) -> Callable:
        mod, func = self.entry.split(":")
        return getattr(importlib.import_module(mod), func)


STAGES = {
    "distill-data": StageSpec("distill-data", "llmcompress.distill.generate:run", "runs/distill-data",
                              None, (), "teacher"),
    "train-student": StageSpec("train-student", "llmcompress.distill.train:run", "runs/train-student",
                               "distill-data", ("distill-data",), "teacher"),
    "calibrate": StageSpec("calibrate", "llmcompress.quant.calibrate:run", "runs/calibrate",
                           None, ("train-student",), "model"),
    "quantize": StageSpec("quantize", "llmcompress.quant.quantize:run", "runs/quantize",
                          "calibrate", ("calibrate", "train-student"), "model"),
    "evaluate": StageSpec("evaluate", "llmcompress.eval.evaluate:run", "runs/evaluate",
                          "quantize", ("quantize", "train-student", "export"), "model"),
    "export": StageSpec("export", "llmcompress.export.stage:run", "runs/export",
                        "quantize", ("quantize", "train-student"), "model", "llmcompress.export.stage:check"),
}


@dataclass
class StageInputs:
    """What a stage consumes: the input artifact (if any), the model to load, and the calibration artifact.
    `work_dir` is a stable scratch directory keyed by the cache key (shards, checkpoints): it survives a failed
    or killed run so a rerun with the same config resumes from it, and is removed once the artifact is complete."""

    artifact: Optional[Artifact] = None
    model: Optional[ModelConfig] = None
    calibration: Optional[Artifact] = None
    work_dir: Optional[Path] = None


def model_of_artifact(art: Artifact, fallback: ModelConfig) -> ModelConfig:
    """The model an artifact stands for: a model-holding artifact is itself a model directory; a calibration
    artifact names the model it measured."""
    if art.stage in ("train-student", "quantize"):
        return replace(fallback, name=str(art.path))
    if art.stage == "export":  # a compressed-tensors model directory, or one .gguf file
        gguf_file = art.manifest.get("summary", {}).get("gguf_file")
        return replace(fallback, name=str(art.path / gguf_file) if gguf_file else str(art.path))
    if art.stage == "calibrate":  # meta.model is the model it ran on (an --input model dir is not in config)
        key = "meta.model" if isinstance(art.meta.get("model"), dict) else "config.model"
        recorded = art.meta["model"] if key == "meta.model" else art.manifest.get("config", {}).get("model")
        return from_dict(ModelConfig, recorded, f"{art.path}/manifest.json", key)
    raise ArtifactError(f"{art.path}: a {art.stage} artifact holds no model")


def resolve_inputs(spec: StageSpec, cfg, input_path: Optional[Path], say: Callable[[str], None]) -> StageInputs:
    """Find the stage's input: the explicit --input, else the previous stage's default output if it exists,
    else the model named in the config. Says in one line which it took."""
    model_cfg = getattr(cfg, spec.model_key) if spec.model_key else None
    if input_path is None and spec.default_input:
        default = Path(STAGES[spec.default_input].default_output)
        if is_artifact(default):
            input_path = default
            say(f"{spec.name}: no --input given; reading the {spec.default_input} artifact at {default}")
        elif spec.default_input == "distill-data" and getattr(cfg, "task", "generative") == "generative":
            raise UserError(f"{spec.name}: no --input given and no {spec.default_input} artifact at {default}; "
                            f"run `llmc {spec.default_input}` first or pass --input")
    if input_path is None:
        if model_cfg is not None:
            say(f"{spec.name}: no input artifact; using model {model_cfg.name!r} from the config")
        return StageInputs(model=model_cfg)
    input_path = Path(input_path)
    hub = str(input_path).startswith("hub:")
    if not hub and not input_path.exists() and not input_path.is_symlink():
        raise ArtifactError(f"{input_path}: --input: no such artifact or model directory (for a hub model write "
                            f"hub:ORG/NAME)")
    if not is_artifact(input_path):
        if spec.model_key is None or spec.name == "train-student":
            raise ArtifactError(f"{input_path}: --input: not an llmc artifact (manifest.json missing)")
        # a plain model directory (or hub id) as the input of a model-consuming stage
        from .models import resolve_model

        resolve_model(str(input_path), "--input")  # not a model: one line now, not a loader error later
        return StageInputs(model=replace(model_cfg, name=str(input_path)))
    art = read_artifact(input_path, spec.accepts or None)
    inputs = StageInputs(artifact=art)
    if spec.model_key is not None and art.stage != "distill-data":
        inputs.model = model_of_artifact(art, model_cfg)
    elif spec.model_key is not None:
        inputs.model = model_cfg
    if art.stage == "calibrate":
        inputs.calibration = art
    return inputs


def cache_key(stage: str, cfg, inputs: StageInputs) -> str:
    """Content hash of the resolved config and the input manifests: equal keys mean the same work."""
    return sha256_json({
        "stage": stage,
        "config": to_dict(cfg),
        "input": inputs.artifact.manifest_sha256 if inputs.artifact else None,
        "model": to_dict(inputs.model) if inputs.model else None,
    })


def up_to_date(out: Path, key: str) -> bool:
    if not is_artifact(out):
        return False
    try:
        art = read_artifact(out)
    except ArtifactError:
        return False
    return art.manifest.get("cache_key") == key


def run_stage(name: str, cfg, out: Path, inputs: StageInputs, reporter: Optional[Reporter] = None,
              key: Optional[str] = None, origin: Optional[Callable[[str], str]] = None,
              announce: Optional[Callable[[], None]] = None) -> Artifact:
    """`origin(key)` names where a config key was set (the config file or `--set`), for the refusals that blame
    a key after validation (the memory check); `announce()` is called once every check has passed, before work."""
    spec = STAGES[name]
    reporter = reporter or Reporter()
    out = Path(out)
    clean_stale(out)
    key = key or cache_key(name, cfg, inputs)
    estimate, fingerprint = None, None
    if inputs.model is not None:
        from .models import resolve_model, weights_fingerprint

        source = resolve_model(inputs.model.name)  # a missing model is bad input: refuse before any work
        estimate = memory_estimate(name, cfg, inputs.model, source)
        if estimate is not None:
            keys = memory_keys(name, cfg)
            where = origin(keys[0][0]) if origin else "<config>"
            check_fits(estimate, f"{where}: {', '.join(f'{k}={v}' for k, v in keys)}: {name} on "
                                 f"{inputs.model.name}")
        if name == "calibrate" or inputs.calibration is not None:
            fingerprint = weights_fingerprint(source)
        if inputs.calibration is not None:
            check_calibration_model(inputs.calibration, inputs.model.name, fingerprint)
    if spec.check:
        mod, func = spec.check.split(":")
        getattr(importlib.import_module(mod), func)(cfg, inputs)
    if announce is not None:
        announce()
    fn = spec.fn
    inputs = replace(inputs, work_dir=out.parent / f".{out.name}.work-{key[:16]}")
    if int(os.environ.get("RANK", "0")) != 0:
        # under torchrun every rank runs the stage; only rank 0 writes the artifact and removes the work dir
        with tempfile.TemporaryDirectory() as scratch:
            summary = fn(cfg, Path(scratch), inputs, reporter) or {}
        return Artifact(out, {"stage": name, "summary": summary})
    inputs_list = [a for a in (inputs.artifact,) if a is not None]
    with ArtifactWriter(out, name, to_dict(cfg), inputs=inputs_list, cache_key=key) as writer:
        summary = fn(cfg, writer.dir, inputs, reporter) or {}
        writer.summary = summary
        if inputs.model is not None:
            writer.meta["model"] = to_dict(inputs.model)
        if name == "calibrate":  # a hub model is in the local cache only once the stage has loaded it
            writer.meta["model_weights_sha256"] = fingerprint or weights_fingerprint(source)
        writer.meta["peak_rss_mb"] = round(peak_rss_bytes() / 2**20, 1)
        if estimate is not None:
            writer.meta["memory_estimate_mb"] = round(estimate / 2**20, 1)
    for stale in out.parent.glob(f".{out.name}.work-*"):  # this run's, and those of older configs
        shutil.rmtree(stale, ignore_errors=True)
    return read_artifact(out, verify_hashes=False)


def memory_estimate(stage: str, cfg, model_cfg: ModelConfig, source) -> Optional[int]:
    """Bytes a stage needs at peak (see resources.py), or None when the model is not a local directory."""
    from .models import resolve_device, resolve_dtype

    if not isinstance(source, Path) or not source.is_dir():
        return None
    width = resolve_dtype(model_cfg.dtype, resolve_device(model_cfg.device)).itemsize
    weights = weights_bytes(source, width)
    if weights is None:
        return None
    (_, batch), (_, seq) = memory_keys(stage, cfg)
    factor = 3.0 if stage == "train-student" else 1.2  # training: weights + grads + Adam moments, for a student
    return int(weights * factor + activation_bytes(source, batch, seq))


def memory_keys(stage: str, cfg) -> list[tuple[str, int]]:
    """The (key, value) pairs that size a stage's activations: its batch size and sequence length."""
    if stage == "evaluate":
        return [("ppl.batch_size", cfg.ppl.batch_size), ("ppl.seq_len", cfg.ppl.seq_len)]
    section = "data" if hasattr(cfg, "data") else "prompts" if hasattr(cfg, "prompts") else None
    seq = (f"{section}.max_length", getattr(cfg, section).max_length) if section else \
        ("max_length", getattr(cfg, "max_length", 512))
    return [("batch_size", getattr(cfg, "batch_size", 1)), seq]


def check_calibration_model(calibration: Artifact, model_name: str, fingerprint: Optional[str]) -> None:
    """A calibration artifact is bound to the weights it measured by their fingerprint (models.weights_fingerprint),
    not by the model's name: statistics of other weights are refused before any work."""
    recorded = calibration.meta.get("model_weights_sha256")
    where = f"{calibration.path / 'manifest.json'}: meta.model_weights_sha256"
    if recorded is None:
        raise ArtifactError(f"{where}: missing; the artifact does not say which weights it measured (rerun "
                            f"`llmc calibrate`)")
    if fingerprint is None:
        raise ArtifactError(f"{where}: cannot check {model_name}: it is not a local model or in the local hub cache")
    if recorded != fingerprint:
        raise ArtifactError(f"{where}: the calibration was measured on other weights than those of {model_name} "
                            f"now; rerun `llmc calibrate` on this model")


def stage_config_class(name: str):
    return STAGE_CONFIGS[name]
