"""Property: any YAML-shaped value thrown at any stage schema yields a valid config or a one-line ConfigError /
UserError naming the key: never a traceback of another type."""

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmcompress.config import STAGE_CONFIGS, load_config, schema_rows
from llmcompress.errors import UserError
from llmcompress.pipeline import load_pipeline

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=8)


def key_paths(cls):
    return [row[0] for row in schema_rows(cls)]


@st.composite
def configs(draw, cls):
    paths = key_paths(cls)
    data = {}
    for _ in range(draw(st.integers(0, 4))):
        path = draw(st.sampled_from(paths + ["bogus", "model.bogus"]))
        node = data
        parts = path.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {}) if isinstance(node.get(p, {}), dict) else node
        node[parts[-1]] = draw(values)
    return data


@pytest.mark.parametrize("stage", sorted(STAGE_CONFIGS))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_configs_never_crash(stage, data, tmp_path):
    cls = STAGE_CONFIGS[stage]
    raw = data.draw(configs(cls))
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(raw, allow_unicode=True))
    try:
        cfg = load_config(cls, p)
    except UserError as e:
        msg = str(e)
        assert "\n" not in msg and str(p) in msg
        return
    assert isinstance(cfg, cls)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=values)
def test_random_pipelines_never_crash(raw, tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump({"stages": raw}, allow_unicode=True))
    try:
        load_pipeline(p)
    except UserError as e:
        assert "\n" not in str(e)
