"""`llmc run PIPELINE.yaml`: chain stages, each consuming an earlier stage's artifact directory.

A stage is skipped when its artifact exists, verifies, and carries the same cache key (content hash of the
resolved config and the input artifact's manifest) as the run would have; `--force` reruns everything. Because
each artifact is renamed into place only when complete, a pipeline killed at any point (even kill -9) resumes
from the first stage without a complete, up-to-date artifact.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from .config import STAGE_CONFIGS, Invalid, apply_overrides, from_dict, opt, read_yaml, to_dict
from .errors import ConfigError, UserError
from .paths import check_output, component_problem, config_paths, is_within
from .progress import Reporter
from .stages import STAGES, cache_key, resolve_inputs, run_stage, up_to_date

StageName = Literal["distill-data", "train-student", "calibrate", "quantize", "evaluate", "export"]


@dataclass
class PipelineStage:
    stage: StageName = opt("calibrate", "which stage to run")
    name: str = opt("", "unique name; also the artifact directory under output_root, so one plain directory name "
                    "(no '/', not hidden; default: the stage name)")
    config: Optional[str] = opt(None, "stage config YAML, relative to the pipeline file and inside its folder")
    set: dict[str, Any] = opt(factory=dict, help="overrides KEY.PATH: VALUE applied on top of the config")
    input: Optional[str] = opt("previous", "name of an earlier stage whose artifact is the input; 'previous' = "
                               "the stage before; null = none (the model in the config)")


@dataclass
class Pipeline:
    output_root: str = opt("", "where the stage artifacts go (default: runs/<pipeline file stem>)")
    stages: list[PipelineStage] = opt(factory=list, help="the stages, in order", min_len=1)

    def check(self):
        seen = set()
        for i, st in enumerate(self.stages):
            st.name = st.name or st.stage
            problem = component_problem(st.name)
            if problem:
                raise Invalid(f"stages[{i}].name", problem, st.name)
            if st.config is not None and (not st.config.strip() or Path(st.config).is_absolute()
                                          or ".." in Path(st.config).parts):
                raise Invalid(f"stages[{i}].config", "a path relative to the pipeline file, inside its folder",
                              st.config)
            if st.name in seen:
                raise Invalid(f"stages[{i}].name", "a unique stage name", st.name)
            if st.input not in (None, "previous") and st.input not in seen:
                raise Invalid(f"stages[{i}].input", "the name of an earlier stage, 'previous' or null", st.input)
            seen.add(st.name)


def load_pipeline(path: Path) -> Pipeline:
    return from_dict(Pipeline, read_yaml(path), str(path))


def run_pipeline(path: Path, reporter: Optional[Reporter] = None, force: bool = False,
                 overrides: Optional[list[str]] = None) -> dict:
    from .config import load_config, parse_override

    reporter = reporter or Reporter()
    path = Path(path)
    pipe = load_pipeline(path)
    root = Path(pipe.output_root) if pipe.output_root else Path("runs") / path.stem
    names = {st.name for st in pipe.stages}
    per_stage: dict[str, list[str]] = {}
    for text in overrides or []:
        key, _ = parse_override(text)
        head = key.split(".", 1)[0]
        if head not in names or "." not in key:
            raise UserError(f"--set {text!r}: expected STAGE_NAME.key.path=value with a stage name from {path} "
                            f"({', '.join(sorted(names))})")
        per_stage.setdefault(head, []).append(text.split(".", 1)[1])

    # validate every stage's config before any work, so a typo in the last stage fails in a second
    configs, cfg_paths = [], []
    for i, st in enumerate(pipe.stages):
        cfg_path = (path.parent / st.config) if st.config else None
        if cfg_path is not None and not is_within(cfg_path, path.parent):
            raise ConfigError(str(path), f"stages[{i}].config", "a config file inside the pipeline's folder (a "
                              "symlink out of it is refused)", st.config)
        cfg_paths.append(cfg_path)
        sets = [f"{k}={_yaml_scalar(v)}" for k, v in st.set.items()] + per_stage.get(st.name, [])
        try:
            configs.append(load_config(STAGE_CONFIGS[st.stage], cfg_path, sets))
        except ConfigError as e:
            raise ConfigError(f"{path}: stages[{i}] ({st.name}) {e.source}", e.key, e.expected, e.got,
                              has_got=e.has_got) from None

    # every output is checked before any stage runs: writable, replacing nothing of the user's, touching no input
    for i, (st, cfg, cfg_path) in enumerate(zip(pipe.stages, configs, cfg_paths)):
        named = [("the pipeline file", path)] + ([("its config", cfg_path)] if cfg_path else [])
        check_output(root / st.name, named + config_paths(to_dict(cfg)), f"{path}: stages[{i}].name")
        model_key = STAGES[st.stage].model_key
        no_input = st.input is None or (st.input == "previous" and i == 0)
        if model_key and no_input:  # a mistyped model path in the last stage fails before the first runs
            from .models import resolve_model

            resolve_model(getattr(cfg, model_key).name, f"{path}: stages[{i}] {model_key}.name")

    results, outputs, gates_failed = [], {}, []
    prev_name = None
    for i, (st, cfg, cfg_path) in enumerate(zip(pipe.stages, configs, cfg_paths)):
        out = root / st.name
        src = prev_name if st.input == "previous" else st.input
        input_path = outputs.get(src) if src else None
        spec = STAGES[st.stage]
        inputs = resolve_inputs(spec, cfg, input_path, reporter.info) if input_path or spec.default_input is None \
            else resolve_inputs(_no_default(spec), cfg, None, reporter.info)
        key = cache_key(st.stage, cfg, inputs)
        if not force and up_to_date(out, key):
            reporter.info(f"{st.name}: up to date, skipped ({out})")
            status, art = "skipped", None
        else:
            reporter.info(f"{st.name}: running {st.stage} -> {out}")
            art = run_stage(st.stage, cfg, out, inputs, reporter, key, origin=_origin(path, i, st, cfg_path, per_stage))
            status = "ran"
        from .artifacts import read_artifact

        art = art or read_artifact(out, verify_hashes=False)
        summary = art.manifest.get("summary", {})
        gates_failed += [f"{st.name}: {g}" for g in summary.get("gates_failed", [])]
        results.append({"name": st.name, "stage": st.stage, "output": str(out), "status": status,
                        "wall_time_s": art.manifest.get("wall_time_s", 0.0), "summary": summary})
        outputs[st.name] = out
        prev_name = st.name
    return {"pipeline": str(path), "stages": results, "gates_failed": gates_failed}


def _origin(path: Path, i: int, st: PipelineStage, cfg_path: Optional[Path], per_stage: dict[str, list[str]]):
    """Where stage i's key was set: `--set`, the stage's `set:` in the pipeline file, or its config file."""
    cli_keys = {text.split("=", 1)[0].strip() for text in per_stage.get(st.name, [])}

    def origin(key: str) -> str:
        if key in cli_keys:
            return "--set"
        if key in st.set:
            return f"{path}: stages[{i}].set"
        return str(cfg_path) if cfg_path else f"{path}: stages[{i}] (defaults)"

    return origin


def _no_default(spec):
    from dataclasses import replace

    return replace(spec, default_input=None)


def _yaml_scalar(v) -> str:
    import json

    return json.dumps(v)
