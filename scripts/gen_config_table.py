"""Regenerate the README's config-key table from the schemas (the schemas are the one source of truth).

    python scripts/gen_config_table.py          # rewrite README.md between the markers
    python scripts/gen_config_table.py --check  # exit 1 if README.md is stale (a test runs this)
"""

import sys
from pathlib import Path

from llmcompress.config import STAGE_CONFIGS, schema_rows
from llmcompress.pipeline import Pipeline, PipelineStage

BEGIN, END = "<!-- config-table:begin -->", "<!-- config-table:end -->"
README = Path(__file__).resolve().parents[1] / "README.md"


def table() -> str:
    out = []
    sections = list(STAGE_CONFIGS.items()) + [("run (pipeline file)", Pipeline),
                                               ("run: each entry of stages", PipelineStage)]
    for stage, cls in sections:
        out.append(f"\n**{stage}**\n\n| key | type | default | meaning |\n| --- | --- | --- | --- |")
        for key, tp, default, help_ in schema_rows(cls):
            cell = lambda s: s.replace("|", "\\|").replace("\n", " ")
            out.append(f"| `{key}` | {cell(tp)} | `{cell(default)}` | {cell(help_)} |")
    return "\n".join(out) + "\n"


def render(text: str) -> str:
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{README}: markers {BEGIN} / {END} missing")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return head + BEGIN + "\n" + table() + END + tail


if __name__ == "__main__":
    current = README.read_text()
    new = render(current)
    if "--check" in sys.argv:
        if new != current:
            print("README.md config table is stale: run python scripts/gen_config_table.py")
            sys.exit(1)
    else:
        README.write_text(new)
