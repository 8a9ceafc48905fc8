"""The `llmc` command line: parse, load the config, call the stage, print, map errors to exit codes.

Exit codes: 0 success, 1 a gate failed (evaluate), 2 bad input (config, artifact, model path, data),
3 runtime failure. Errors are one line; `--debug` shows the traceback.
"""

from __future__ import annotations

import errno
import json
import logging
import sys
import traceback
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .config import STAGE_CONFIGS, load_config
from .errors import GateFailed, LlmcError, UserError
from .progress import RichReporter
from .artifacts import is_artifact
from .stages import STAGES, cache_key, resolve_inputs, run_stage

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="llmcompress: compress an LLM in chainable stages and prove it still works.\n\n"
                       "Stages: distill-data -> train-student -> calibrate -> quantize -> evaluate (alias eval), "
                       "export. "
                       "Each reads a YAML config (all keys optional) and writes an artifact directory that the "
                       "next stage reads. Exit codes: 0 ok, 1 gate failed, 2 bad input, 3 runtime failure.")

err_console = Console(stderr=True)
out_console = Console()


def _version(value: bool):
    if value:
        print(f"llmc {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="print the version and exit")):
    pass


ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config for the stage (default: built-in defaults)",
                         show_default=True)
SetOpt = typer.Option(None, "--set", "-s", help="override one config key, KEY.PATH=VALUE (repeatable)",
                      show_default=True)
QuietOpt = typer.Option(False, "--quiet", "-q", help="no progress bars or tables", show_default=True)
JsonOpt = typer.Option(False, "--json", help="print the stage summary as JSON on stdout (for CI)", show_default=True)
DebugOpt = typer.Option(False, "--debug", help="show tracebacks", show_default=True)


def _input_opt(stage: str):
    prev = STAGES[stage].default_input
    default_txt = f"{STAGES[prev].default_output} if it exists" if prev else "the model in the config"
    return typer.Option(None, "--input", "-i", help=f"input artifact or model directory (default: {default_txt})")


def _output_opt(stage: str):
    return typer.Option(Path(STAGES[stage].default_output), "--output", "-o",
                        help="artifact directory to write (replaced atomically when the stage completes)")


def _print_summary(stage: str, summary: dict, out: Path, quiet: bool, as_json: bool):
    if as_json:
        print(json.dumps({"stage": stage, "output": str(out), "summary": summary}, default=str))
        return
    if quiet:
        return
    for title, rows in (summary.get("tables") or {}).items():
        if not rows:
            continue
        table = Table(title=title)
        # manifest.json sorts keys; a stage may give its column order in summary["table_columns"]
        cols = (summary.get("table_columns") or {}).get(title) or list(rows[0])
        for col in cols:
            table.add_column(str(col))
        for row in rows:
            table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in (row.get(c, "") for c in cols)])
        out_console.print(table)
    table = Table(title=f"{stage} -> {out}", show_header=False)
    table.add_column("key")
    table.add_column("value")
    for k, v in summary.items():
        if k == "tables" or isinstance(v, (dict, list)):
            continue
        table.add_row(k, f"{v:.6g}" if isinstance(v, float) else str(v))
    out_console.print(table)


def _setup_logging(debug: bool, quiet: bool):
    level = logging.DEBUG if debug else (logging.WARNING if quiet else logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not debug:
        import warnings

        warnings.filterwarnings("ignore")
        try:
            import transformers

            transformers.utils.logging.set_verbosity_error()
            transformers.utils.logging.disable_progress_bar()
        except Exception:
            pass


def _say(kind: str, msg: str) -> None:
    """One line on stderr, whatever the message holds (a user's path may carry a newline or '[tag]')."""
    from rich.markup import escape

    one_line = msg.replace("\r", "\\r").replace("\n", "\\n")
    err_console.print(f"[bold red]{kind}:[/] {escape(one_line)}", highlight=False, soft_wrap=True)


def _guard(fn, debug: bool):
    """Run `fn`, turning every failure into one line on stderr and the documented exit code."""
    try:
        return fn()
    except typer.Exit:
        raise
    except GateFailed as e:
        _say("gate failed", str(e))
        raise typer.Exit(1)
    except LlmcError as e:
        if debug:
            traceback.print_exc()
        _say("error" if isinstance(e, UserError) else "failed", str(e))
        raise typer.Exit(e.exit_code)
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]: no artifact was written")
        raise typer.Exit(130)
    except OSError as e:
        if e.errno not in _PATH_ERRNOS or e.filename is None:
            return _failed(e, debug)
        # a path the user named that is missing, of the wrong kind or not theirs to touch: bad input, not a crash
        if debug:
            traceback.print_exc()
        _say("error", f"{e.filename}: {e.strerror or e.__class__.__name__}")
        raise typer.Exit(2)
    except MemoryError:
        if debug:
            traceback.print_exc()
        err_console.print("[bold red]failed:[/] out of memory")
        raise typer.Exit(3)
    except Exception as e:  # a bug or an environment failure: one line, exit 3
        _failed(e, debug)


def _failed(e: Exception, debug: bool):
    if isinstance(e.__context__, KeyboardInterrupt) or isinstance(e.__cause__, KeyboardInterrupt):
        # Ctrl-C/SIGTERM that landed inside an import surfaces as ImportError: still an interruption
        err_console.print("[bold red]interrupted[/]: no artifact was written")
        raise typer.Exit(130)
    if debug:
        traceback.print_exc()
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if len(msg) > 300:  # some library errors put a whole dump on one line
        msg = msg[:300] + " ..."
    _say("failed", f"{e.__class__.__name__}: {msg} (rerun with --debug for the traceback)")
    raise typer.Exit(3)


_PATH_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.EROFS,
                errno.ENAMETOOLONG, errno.ELOOP, errno.EEXIST, errno.ENOTEMPTY}


def execute(stage: str, config: Optional[Path], overrides: List[str], input_path: Optional[Path], output: Path,
            quiet: bool, as_json: bool, debug: bool, tweak=None, flags: Optional[dict] = None) -> dict:
    """Shared body of every stage command (also used by `llmc run`). `flags` maps option name -> (key, value) for
    CLI options that set a config key: they are validated as overrides, and an error names the option."""
    _setup_logging(debug, quiet or as_json)

    def body():
        from .config import parse_override, to_dict
        from .paths import check_output, check_writable, config_paths

        _install_signal_handlers()
        flag_sets = [f"{key}={json.dumps(value)}" for key, value in (flags or {}).values()]
        cfg = load_config(STAGE_CONFIGS[stage], config, (overrides or []) + flag_sets,
                          flags={key: opt for opt, (key, _) in (flags or {}).items()})
        if tweak is not None:
            cfg = tweak(cfg)
        check_writable(output, "--output")  # before an input artifact is read and hashed
        reporter = RichReporter(err_console, quiet=quiet or as_json)
        said: list[str] = []  # shown once the output is known good, so a refusal stays one line
        inputs = resolve_inputs(STAGES[stage], cfg, input_path, said.append)
        named = [("--config", config)] if config else []
        for what, art in (("--input", inputs.artifact), ("calibration", inputs.calibration)):
            if art is not None:
                named.append((what, art.path))
        if inputs.model is not None:
            from .models import resolve_model

            model_key = f"{STAGES[stage].model_key}.name" if input_path is None else "--input"
            resolve_model(inputs.model.name, model_key)  # a mistyped path fails here, not after a hub timeout
            named.append(("the model", Path(inputs.model.name)))
        for key, name in [("baseline", getattr(cfg, "baseline", None))] + [
                (f"compare[{i}]", c) for i, c in enumerate(getattr(cfg, "compare", []))]:
            if name and not is_artifact(Path(name).expanduser()):
                from .models import resolve_model

                resolve_model(name, key)
        check_output(output, named + config_paths(to_dict(cfg)), "--output")
        set_keys = {parse_override(o)[0] for o in overrides or []}

        def origin(key: str) -> str:
            return "--set" if key in set_keys else str(config) if config else "<defaults>"

        def announce():  # the last refusals (memory, calibration binding) come before these lines
            for line in said:
                reporter.info(line)

        art = run_stage(stage, cfg, output, inputs, reporter, cache_key(stage, cfg, inputs), origin=origin,
                        announce=announce)
        summary = art.manifest.get("summary", {})
        _print_summary(stage, summary, art.path, quiet, as_json)
        if summary.get("gates_failed"):
            raise GateFailed("; ".join(summary["gates_failed"]))
        return summary

    return _guard(body, debug)


def _install_signal_handlers():
    """SIGINT and SIGTERM unwind through the artifact writer, which removes its temporary dir; they also mark the
    run interrupted, so a KeyboardInterrupt swallowed on the way (inside a finalizer) cannot let the stage
    replace the previous artifact."""
    import signal

    from .artifacts import note_interrupt

    def _raise(signum, frame):
        note_interrupt()
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, _raise)
        signal.signal(signal.SIGINT, _raise)
    except ValueError:  # not the main thread (library use)
        pass


def _epilog(stage: str) -> str:
    from .config import schema_rows

    rows = schema_rows(STAGE_CONFIGS[stage])
    return "Config keys (YAML or --set KEY=VALUE), with defaults:\n\n" + "\n\n".join(
        f"  {k} = {d}  ({h})" for k, _, d, h in rows)


@app.command("distill-data", epilog=_epilog("distill-data"))
def distill_data(config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
                 output: Path = _output_opt("distill-data"), quiet: bool = QuietOpt, as_json: bool = JsonOpt,
                 debug: bool = DebugOpt):
    """Generate SFT data with a teacher LLM (answers, chain-of-thought, <analysis>/<final> traces, multi-turn)."""
    execute("distill-data", config, set_, None, output, quiet, as_json, debug)


@app.command("train-student", epilog=_epilog("train-student"))
def train_student(config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
                  input_path: Optional[Path] = _input_opt("train-student"),
                  output: Path = _output_opt("train-student"), quiet: bool = QuietOpt, as_json: bool = JsonOpt,
                  debug: bool = DebugOpt):
    """Train a smaller student on teacher data: L = alpha*T^2*KL(teacher||student) + (1-alpha)*CE."""
    execute("train-student", config, set_, input_path, output, quiet, as_json, debug)


@app.command("calibrate", epilog=_epilog("calibrate"))
def calibrate(config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
              input_path: Optional[Path] = _input_opt("calibrate"), output: Path = _output_opt("calibrate"),
              quiet: bool = QuietOpt, as_json: bool = JsonOpt, debug: bool = DebugOpt):
    """Run calibration samples through the model; record per-layer ranges, percentiles and histograms."""
    execute("calibrate", config, set_, input_path, output, quiet, as_json, debug)


@app.command("quantize", epilog=_epilog("quantize"))
def quantize(config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
             input_path: Optional[Path] = _input_opt("quantize"), output: Path = _output_opt("quantize"),
             quiet: bool = QuietOpt, as_json: bool = JsonOpt, debug: bool = DebugOpt):
    """Quantize weights / activations / KV cache (INT8, INT4, FP8; RTN, GPTQ, AWQ, SmoothQuant)."""
    execute("quantize", config, set_, input_path, output, quiet, as_json, debug)


PplOpt = typer.Option(False, "--ppl", help="measure perplexity (sets ppl.enabled)")
TasksOpt = typer.Option(None, "--tasks", help="comma-separated lm-eval tasks (sets tasks.names)")
SpeedOpt = typer.Option(False, "--speed", help="measure speed, memory and latency (sets speed.enabled)")
BaselineOpt = typer.Option(None, "--baseline", help="model or artifact to compare with (sets baseline)")
LimitOpt = typer.Option(None, "--limit", help="examples per task (sets tasks.limit)")


@app.command("evaluate", epilog=_epilog("evaluate"))
def evaluate(config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
             input_path: Optional[Path] = _input_opt("evaluate"), output: Path = _output_opt("evaluate"),
             ppl: bool = PplOpt, tasks: Optional[str] = TasksOpt, speed: bool = SpeedOpt,
             baseline: Optional[str] = BaselineOpt, limit: Optional[int] = LimitOpt, quiet: bool = QuietOpt,
             as_json: bool = JsonOpt, debug: bool = DebugOpt):
    """Perplexity, lm-eval accuracy, speed/memory/latency; compare with a baseline; exit 1 on a missed gate."""
    flags = {}  # validated like --set, so `--limit -1` is refused as `--set tasks.limit=-1` is
    if ppl:
        flags["--ppl"] = ("ppl.enabled", True)
    if speed:
        flags["--speed"] = ("speed.enabled", True)
    if tasks is not None:
        flags["--tasks"] = ("tasks.names", [t.strip() for t in tasks.split(",") if t.strip()])
    if limit is not None:
        flags["--limit"] = ("tasks.limit", limit)
    if baseline is not None:
        flags["--baseline"] = ("baseline", baseline)

    def tweak(cfg):
        if not (cfg.ppl.enabled or cfg.speed.enabled or cfg.tasks.names):
            cfg.ppl.enabled = True  # a bare `llmc eval` measures perplexity rather than nothing
        return cfg

    execute("evaluate", config, set_, input_path, output, quiet, as_json, debug, tweak=tweak, flags=flags)


# `eval` is the same command under a second name (one function, so options and behaviour cannot drift apart)
app.command("eval", epilog=_epilog("evaluate"), help="Alias of `evaluate`.")(evaluate)


@app.command("export", epilog=_epilog("export"))
def export(config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
           input_path: Optional[Path] = _input_opt("export"), output: Path = _output_opt("export"),
           quiet: bool = QuietOpt, as_json: bool = JsonOpt, debug: bool = DebugOpt):
    """Write a quantize artifact as compressed-tensors (transformers, vLLM, SGLang) or GGUF (llama.cpp)."""
    execute("export", config, set_, input_path, output, quiet, as_json, debug)


@app.command("run")
def run(pipeline: Path = typer.Argument(..., help="pipeline YAML naming the stages to chain"),
        set_: Optional[List[str]] = SetOpt,
        force: bool = typer.Option(False, "--force", help="rerun every stage even if up to date"),
        quiet: bool = QuietOpt, as_json: bool = JsonOpt, debug: bool = DebugOpt):
    """Chain stages from one file; a stage whose config and inputs are unchanged since its last run is skipped."""
    from .pipeline import run_pipeline

    _setup_logging(debug, quiet or as_json)

    def body():
        _install_signal_handlers()
        reporter = RichReporter(err_console, quiet=quiet or as_json)
        results = run_pipeline(pipeline, reporter, force=force, overrides=set_ or [])
        if as_json:
            print(json.dumps(results, default=str))
        elif not quiet:
            table = Table(title=f"pipeline {pipeline}")
            for col in ("stage", "output", "status", "wall_time_s"):
                table.add_column(col)
            for r in results["stages"]:
                table.add_row(r["name"], r["output"], r["status"], f"{r.get('wall_time_s', 0):.1f}")
            out_console.print(table)
        if results.get("gates_failed"):
            raise GateFailed("; ".join(results["gates_failed"]))
        return results

    _guard(body, debug)


if __name__ == "__main__":
    app()
