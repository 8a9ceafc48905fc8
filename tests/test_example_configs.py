from pathlib import Path

import pytest

from llmcompress.config import STAGE_CONFIGS, load_config
from llmcompress.pipeline import load_pipeline

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def stage_of(path: Path) -> str:
    return next(s for s in sorted(STAGE_CONFIGS, key=len, reverse=True) if path.name.startswith(s))


@pytest.mark.parametrize("path", sorted(p for p in CONFIGS.glob("*.yaml") if not p.name.startswith("pipeline")),
                         ids=lambda p: p.name)
def test_every_example_config_validates(path):
    load_config(STAGE_CONFIGS[stage_of(path)], path)


def test_every_stage_has_an_example_and_the_pipeline_validates():
    names = {stage_of(p) for p in CONFIGS.glob("*.yaml") if not p.name.startswith("pipeline")}
    assert names == set(STAGE_CONFIGS)
    pipe = load_pipeline(CONFIGS / "pipeline.yaml")
    for st in pipe.stages:
        if st.config:
            load_config(STAGE_CONFIGS[st.stage], CONFIGS / st.config)
