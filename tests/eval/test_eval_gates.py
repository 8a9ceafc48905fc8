"""Gates: every miss is one line naming the gate and by how much; measurements a gate needs are required."""

from __future__ import annotations

import pytest

from llmcompress.config import EvaluateConfig, GatesConfig, load_config
from llmcompress.errors import UserError
from llmcompress.eval.gates import check_gates, require_measurements


def _result(ppl=None, tasks=None, decode=None, size=None):
    return {"ppl": {"ppl": ppl} if ppl is not None else None, "tasks": tasks or {}, "size_mb": size,
            "speed": {"decode": {b: {"decode_tok_s": v} for b, v in (decode or {}).items()}} if decode else None}


def test_ppl_gates():
    base, cand = _result(ppl=10.0), _result(ppl=11.0)
    assert check_gates(GatesConfig(max_ppl_increase_pct=10.5, max_ppl=11.0), cand, base) == []
    lines = check_gates(GatesConfig(max_ppl_increase_pct=4.0, max_ppl=10.5), cand, base)
    assert len(lines) == 2
    assert lines[0].startswith("max_ppl:") and "over by 0.5" in lines[0]
    assert lines[1].startswith("max_ppl_increase_pct:") and "rose 10.00%" in lines[1] and "over by 6.00 points" \
        in lines[1]


def test_task_retention_checks_every_accuracy_metric_not_stderr_or_perplexity():
    base = _result(tasks={"arc": {"acc": 0.50, "acc_stderr": 0.02, "acc_norm": 0.40},
                          "lambada": {"acc": 0.30, "perplexity": 20.0}})
    cand = _result(tasks={"arc": {"acc": 0.49, "acc_stderr": 0.5, "acc_norm": 0.30},
                          "lambada": {"acc": 0.30, "perplexity": 90.0}})
    lines = check_gates(GatesConfig(min_task_retention_pct=95.0), cand, base)
    assert lines == ["min_task_retention_pct: arc acc_norm kept 75.0% of baseline (0.4 -> 0.3), limit 95% "
                     "(short by 20.0 points)"]


def test_speed_and_size_gates():
    base = _result(decode={"1": 100.0, "8": 400.0}, size=500.0)
    cand = _result(decode={"1": 150.0, "8": 420.0}, size=140.0)
    assert check_gates(GatesConfig(min_decode_speedup=1.05, max_size_ratio=0.3), cand, base) == []
    lines = check_gates(GatesConfig(min_decode_speedup=1.2, max_size_ratio=0.25), cand, base)
    assert [line.split(":")[0] for line in lines] == ["min_decode_speedup", "max_size_ratio"]
    assert "batch 8 is 1.05x" in lines[0] and "short by 0.15x" in lines[0]
    assert "0.280x baseline" in lines[1] and "over by 0.030x" in lines[1]


def test_gates_that_cannot_be_measured_fail_before_any_work():
    cfg = load_config(EvaluateConfig, overrides=["gates.max_ppl_increase_pct=5", "gates.min_decode_speedup=2"])
    with pytest.raises(UserError, match=r"need perplexity.*needs speed.*pass --baseline"):
        require_measurements(cfg)
    cfg = load_config(EvaluateConfig, overrides=["gates.max_ppl=50", "ppl.enabled=true"])
    require_measurements(cfg)  # an absolute gate needs no baseline


def test_a_misspelt_shipped_task_fails_before_any_model_is_loaded(tmp_path):
    from llmcompress.config import ModelConfig
    from llmcompress.eval.evaluate import run
    from llmcompress.progress import Reporter
    from llmcompress.stages import StageInputs

    cfg = load_config(EvaluateConfig, overrides=["tasks.names=[llmc_arc_easy, llmc_arc_eazy]"])
    # a model name that does not exist: reaching the loader would raise a different error
    inputs = StageInputs(model=ModelConfig(name="/nonexistent/model"))
    with pytest.raises(UserError, match=r"unknown llmc_arc_eazy; shipped local tasks: llmc_arc_challenge, "
                                        r"llmc_arc_easy"):
        run(cfg, tmp_path, inputs, Reporter())
