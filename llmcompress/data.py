"""Data loading in one place: text files, JSON/JSONL, TSV/CSV, datasets shipped in the package (`builtin:NAME`)
and hub datasets by name (through `datasets`)."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Optional

from .config import BUILTIN_DATA, DataConfig
from .errors import UserError

ASSETS = Path(__file__).parent / "assets"


def resolve_source(source: str) -> Path | str:
    """builtin:NAME -> the shipped file; an existing path -> Path; anything else is a hub dataset name."""
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        if name not in BUILTIN_DATA:
            raise UserError(f"{source}: unknown builtin dataset; choose from {', '.join(sorted(BUILTIN_DATA))}")
        return ASSETS / BUILTIN_DATA[name]
    p = Path(source).expanduser()
    if p.exists():
        if not p.is_file():
            raise UserError(f"{source}: expected a dataset file, got a {'directory' if p.is_dir() else 'special file'}")
        return p
    if source.startswith((".", "/", "~")) or Path(source).suffix in {".txt", ".json", ".jsonl", ".tsv", ".csv"}:
        raise UserError(f"{source}: dataset file not found")
    return source


def _read_file_rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            rows = []
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        raise UserError(f"{path}: line {i + 1}: not valid JSON") from None
            return rows
        if suffix == ".json":
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
            if isinstance(data, dict) and isinstance(data.get("data"), list):
                data = data["data"]
            if not isinstance(data, list):
                raise UserError(f"{path}: expected a JSON list of rows (or {{'data': [...]}})")
            return data
        if suffix in (".tsv", ".csv"):
            with open(path, newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
        if suffix in (".txt", ".md", ".raw", ""):
            return [{"text": line} for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    raise UserError(f"{path}: unsupported dataset file type {suffix!r} (use .txt, .json, .jsonl, .tsv, .csv)")


def _hub_rows(name: str, split: str) -> list[dict]:
    import datasets

    repo, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(repo, config or None, split=split)
    except Exception as e:  # the hub client raises many types; the user needs one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise UserError(f"{name}: could not load hub dataset (split {split!r}): {first}") from None
    return [dict(r) for r in ds]


def load_rows(source: str, split: str = "train") -> list[dict]:
    where = resolve_source(source)
    rows = _read_file_rows(where) if isinstance(where, Path) else _hub_rows(where, split)
    if not rows:
        raise UserError(f"{source}: dataset is empty")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise UserError(f"{source}: row {i + 1}: expected a mapping of field -> value, got "
                            f"{type(row).__name__} {str(row)[:40]!r}")
    return rows


def load_text(source: str, split: str = "test") -> str:
    """A whole corpus as one string (the perplexity protocol joins the split and tokenizes it once)."""
    where = resolve_source(source)
    if isinstance(where, Path) and where.suffix.lower() in (".txt", ".raw", ".md", ""):
        text = where.read_text(encoding="utf-8")
    else:
        text = "\n\n".join(format_row(r, "") for r in load_rows(source, split))
    if not text.strip():
        raise UserError(f"{source}: dataset is empty")
    return text


def format_row(row: dict, template: str) -> str:
    if template:
        try:
            return template.format(**row)
        except KeyError as e:
            raise UserError(f"template: field {e.args[0]!r} not in the data (fields: {', '.join(row)})") from None
        except (IndexError, ValueError, AttributeError, TypeError) as e:  # config validation refuses these first
            raise UserError(f"template: {template!r} cannot format a row ({e.__class__.__name__}: {e})") from None
    if isinstance(row.get("text"), str):
        return row["text"]
    return "\n".join(str(v) for v in row.values() if isinstance(v, str) and v.strip())


def sample_rows(cfg: DataConfig, seed: int = 0, limit: Optional[int] = None) -> list[dict]:
    rows = load_rows(cfg.source, cfg.split)
    n = min(limit or cfg.num_samples, len(rows))
    if cfg.shuffle:
        idx = random.Random(seed).sample(range(len(rows)), n)
    else:
        idx = list(range(n))
    return [rows[i] for i in idx]


def sample_texts(cfg: DataConfig, seed: int = 0) -> list[str]:
    texts = [format_row(r, cfg.template) for r in sample_rows(cfg, seed)]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise UserError(f"{cfg.source}: no non-empty samples after applying the template")
    return texts
