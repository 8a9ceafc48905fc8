"""Regenerate the config reference from the schemas (the schemas are the one source of truth): every key with its
type, default and meaning in docs/config.md, and a compact map of the keys with their defaults (one row per group
of keys) in README.md, each between the markers.

    python scripts/gen_config_table.py          # rewrite both files between the markers
    python scripts/gen_config_table.py --check  # exit 1 if either is stale (a test runs this)
"""

import sys
from pathlib import Path

from llmcompress.config import STAGE_CONFIGS, schema_rows
from llmcompress.pipeline import Pipeline, PipelineStage

BEGIN, END = "<!-- config-table:begin -->", "<!-- config-table:end -->"
ROOT = Path(__file__).resolve().parents[1]
README, REFERENCE = ROOT / "README.md", ROOT / "docs" / "config.md"
SECTIONS = list(STAGE_CONFIGS.items()) + [("run (pipeline file)", Pipeline),
                                          ("run: each entry of stages", PipelineStage)]


def _cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def full_table() -> str:
    """Every key: type, default, meaning."""
    out = []
    for stage, cls in SECTIONS:
        out.append(f"\n**{stage}**\n\n| key | type | default | meaning |\n| --- | --- | --- | --- |")
        for key, tp, default, help_ in schema_rows(cls):
            out.append(f"| `{key}` | {_cell(tp)} | `{_cell(default)}` | {_cell(help_)} |")
    return "\n".join(out) + "\n"


def compact_table() -> str:
    """One table, one row per stage and group of keys (the part before the first dot), each key with its
    default."""
    out = ["\n| stage | keys | defaults |\n| --- | --- | --- |"]
    for stage, cls in SECTIONS:
        groups: dict[str, list[str]] = {}
        for key, _, default, _ in schema_rows(cls):
            group = key.split(".")[0] if "." in key else ""
            leaf = key[len(group) + 1:] if group else key
            # YAML spellings, as a config file would write them
            value = {"None": "null", "True": "true", "False": "false"}.get(default, default)
            if value[:1] == value[-1:] == "'" and len(value) > 2:
                value = value[1:-1]
            groups.setdefault(group, []).append(f"{leaf}: `{_cell(value)}`")
        for group, items in groups.items():
            out.append(f"| {stage} | {f'`{group}.*`' if group else 'top level'} | {' · '.join(items)} |")
    return "\n".join(out) + "\n"


def render(text: str, table: str, path: Path) -> str:
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path}: markers {BEGIN} / {END} missing")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return head + BEGIN + "\n" + table + END + tail


if __name__ == "__main__":
    stale = []
    for path, table in ((README, compact_table()), (REFERENCE, full_table())):
        current = path.read_text()
        new = render(current, table, path)
        if new != current:
            stale.append(path)
            if "--check" not in sys.argv:
                path.write_text(new)
    if "--check" in sys.argv and stale:
        print(f"{', '.join(str(p.relative_to(ROOT)) for p in stale)}: config reference is stale: run "
              f"python scripts/gen_config_table.py")
        sys.exit(1)
