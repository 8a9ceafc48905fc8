"""The `llmc export` stage: a quantize artifact in, a deployable model out.

  format: compressed-tensors   the artifact directory is itself a Hugging Face model directory (config.json with
                               a compressed-tensors quantization_config, model.safetensors, tokenizer): codes and
                               scales copied, never re-rounded (compressed_tensors.py)
  format: gguf                 one file model-<type>.gguf (gguf.py); a dense model is accepted too

Whatever the format cannot hold is refused by `check` before any work, with the key and the nearest layout that
would work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from llmcompress.config import ExportConfig
from llmcompress.errors import UserError
from llmcompress.progress import Reporter


def _source(cfg: ExportConfig, inputs) -> Path:
    """The directory to export: the input artifact, else (gguf only) the dense model of the config."""
    if inputs.artifact is not None:
        return Path(inputs.artifact.path)
    from llmcompress.models import resolve_model

    src = resolve_model((inputs.model or cfg.model).name)
    if not isinstance(src, Path) or not src.is_dir():
        raise UserError(f"model.name: export needs a local model directory, got {src!s}")
    return src


def _is_llmc_checkpoint(src: Path) -> bool:
    import json

    from llmcompress.models import QUANT_METHOD

    try:
        qc = json.loads((src / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, json.JSONDecodeError):
        return False
    return qc.get("quant_method") == QUANT_METHOD


def check(cfg: ExportConfig, inputs) -> None:
    """Refuse, before any work, what the format cannot hold (one line: key, and the nearest working layout)."""
    src = _source(cfg, inputs)
    if cfg.format == "compressed-tensors":
        if not _is_llmc_checkpoint(src):
            raise UserError(f"{src}: format compressed-tensors needs a quantize artifact (run `llmc quantize` and "
                            f"export its output; a dense model has nothing to compress)")
        from .compressed_tensors import problem

        why = problem(src)
    else:
        from .gguf import gguf_problem

        why = gguf_problem(src, cfg.gguf.type)
    if why:
        raise UserError(f"{src}: {why}")


def run(cfg: ExportConfig, out_dir: Path, inputs, reporter: Optional[Reporter] = None) -> dict:
    src = _source(cfg, inputs)
    out_dir = Path(out_dir)
    if cfg.format == "compressed-tensors":
        from .compressed_tensors import write

        return {"source": str(src), **write(src, out_dir)}
    from .gguf import write_gguf

    name = f"model-{cfg.gguf.type}.gguf"
    summary = write_gguf(src, out_dir / name, cfg.gguf.type)
    return {"source": str(src), "format": "gguf", "gguf_file": name, **(summary or {})}
