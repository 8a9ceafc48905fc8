import json

import pytest

from llmcompress.config import DataConfig
from llmcompress.data import load_rows, load_text, resolve_source, sample_texts
from llmcompress.errors import UserError


def test_builtin_and_file_data(tmp_path):
    assert resolve_source("builtin:wikitext2_test").is_file()
    assert load_text("builtin:wikitext2_test").startswith(" \n = Robert Boulter =") or \
        "Robert Boulter" in load_text("builtin:wikitext2_test")[:100]
    rows = load_rows("builtin:gsm8k_train")
    assert len(rows) == 400 and "####" in rows[0]["answer"]
    texts = sample_texts(DataConfig(source="builtin:alpaca_en_demo", template="{instruction}", num_samples=5))
    assert len(texts) == 5 and all(isinstance(t, str) and t for t in texts)
    assert texts == sample_texts(DataConfig(source="builtin:alpaca_en_demo", template="{instruction}",
                                            num_samples=5))
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert [r["text"] for r in load_rows(str(p))] == ["a", "b"]
    tsv = load_rows("builtin:sst2_dev")
    assert set(tsv[0]) == {"sentence", "label"}


def test_bad_data_is_a_user_error(tmp_path):
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match="empty"):
        load_rows(str(empty))
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"a": 1}\nnot json\n')
    with pytest.raises(UserError, match="line 2"):
        load_rows(str(bad))
    with pytest.raises(UserError, match="unknown builtin"):
        load_rows("builtin:nope")
    with pytest.raises(UserError, match="not found"):
        load_rows("./missing.jsonl")
    with pytest.raises(UserError, match="field 'nope'"):
        sample_texts(DataConfig(source="builtin:gsm8k_train", template="{nope}", num_samples=2))
