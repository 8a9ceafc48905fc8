"""`llmc eval` end to end through the real CLI: a missed gate exits 1 after writing the artifact, a pass exits 0,
an earlier evaluate artifact serves as the baseline, and the report files are written."""

from __future__ import annotations

import json

# tiny but real measurements: two 64-token windows of WikiText-2, one prefill length, two decode batch sizes
QUICK = ["--ppl", "--speed", "--set", "ppl.max_tokens=160", "--set", "ppl.seq_len=64",
         "--set", "speed.prompt_lengths=[16]", "--set", "speed.batch_sizes=[1,2]", "--set", "speed.new_tokens=2",
         "--set", "speed.decode_context=8", "--set", "speed.warmup=0", "--set", "speed.repeats=1"]
ENV = {"OMP_NUM_THREADS": "1"}  # the CI box's 2 cores are shared; see test_eval_perplexity


def test_gate_miss_exits_1_pass_exits_0_and_reports_are_written(llmc, workdir):
    miss = llmc("eval", *QUICK, "--set", "gates.max_ppl=1.5", "-o", "first", cwd=workdir, env=ENV)
    assert miss.returncode == 1, miss.stderr
    assert "gate failed" in miss.stderr and "max_ppl: perplexity" in miss.stderr and "over by" in miss.stderr
    first = json.loads((workdir / "first" / "results.json").read_text())
    assert first["gates"]["passed"] is False and first["gates"]["failed"][0].startswith("max_ppl:")
    (cand,) = first["models"]
    assert cand["ppl"]["tokens_scored"] == 63 + 63 + 31 and cand["ppl"]["protocol"]["num_windows"] == 3
    assert set(cand["speed"]["decode"]) == {"1", "2"} and cand["speed"]["decode"]["2"]["decode_tok_s"] > 0
    assert cand["bits_per_weight"] == 32.0 and cand["size_mb"] > 400  # fp32 SmolLM2-135M on disk

    # the first run as the baseline: its stored results are reused, the same model measures the same
    ok = llmc("eval", *QUICK, "--baseline", "first", "--set", "gates.max_ppl_increase_pct=0.001",
              "--set", "gates.max_size_ratio=1.0", "-o", "second", cwd=workdir, env=ENV)
    assert ok.returncode == 0, ok.stderr
    assert "(baseline)" in ok.stdout and "(candidate)" in ok.stdout and "+0.00%" in ok.stdout
    out = workdir / "second"
    second = json.loads((out / "results.json").read_text())
    base, cand = second["models"]
    assert base["reused_from"] == "first" and base["ppl"]["ppl"] == cand["ppl"]["ppl"]
    assert second["gates"]["passed"] is True
    report = (out / "report.md").read_text()
    assert "| perplexity (token) |" in report and "all passed" in report
    for png in ("ppl_vs_bits_per_weight.png", "latency_vs_batch.png", "ttft_vs_prompt_length.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert png in report
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"results.json", "report.md", "latency_vs_batch.png"} <= set(manifest["files"])

    # a relative gate missed against that baseline
    small = llmc("eval", *QUICK, "--baseline", "first", "--set", "gates.max_size_ratio=0.5", "-o", "third",
                 cwd=workdir, env=ENV)
    assert small.returncode == 1
    assert "max_size_ratio: checkpoint is 1.000x baseline" in small.stderr and "over by 0.500x" in small.stderr


def test_a_baseline_measured_with_other_settings_is_refused(llmc, workdir):
    (workdir / "old").mkdir()
    r = llmc("eval", "--ppl", "--set", "ppl.max_tokens=64", "--set", "ppl.seq_len=32", "-o", "old", cwd=workdir,
             env=ENV)
    assert r.returncode == 0, r.stderr
    r = llmc("eval", "--ppl", "--set", "ppl.max_tokens=64", "--set", "ppl.seq_len=16", "--baseline", "old",
             "-o", "new", cwd=workdir, env=ENV)
    assert r.returncode == 2
    assert "ppl.seq_len=32" in r.stderr and "this run 16" in r.stderr
