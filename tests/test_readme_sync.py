import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_readme_config_table_matches_schemas():
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "gen_config_table.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_top_level_layout_is_exactly_the_documented_one():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    if not tracked:  # not a git checkout (e.g. an sdist): nothing to check
        return
    top = {p.split("/")[0] for p in tracked}
    assert top <= {"pyproject.toml", "llmcompress", "configs", "tests", "scripts", "benchmarks", "docs", "README.md",
                   ".ci", ".gitignore"}, top
