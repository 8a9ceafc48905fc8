"""`llmc evaluate --ppl` under torchrun: two CPU processes on gloo split the windows and report one process's
numbers exactly."""

from _shared import one_thread, torchrun  # noqa: F401  (one_thread: autouse; the ranks run one thread too)

from llmcompress.config import EvaluateConfig, from_dict
from llmcompress.progress import Reporter
from llmcompress.stages import StageInputs, run_stage

PPL = {"enabled": True, "max_tokens": 300, "seq_len": 64, "batch_size": 1}
KEYS = ("ppl", "word_ppl", "bits_per_byte", "tokens_scored")


def test_ppl_two_ranks_equal_one(workdir):
    cfg = from_dict(EvaluateConfig, {"ppl": PPL})
    one = run_stage("evaluate", cfg, workdir / "one", StageInputs(model=cfg.model), Reporter()).manifest["summary"]
    sets = [a for k, v in PPL.items() for a in ("--set", f"ppl.{k}={str(v).lower()}")]
    _, outs = torchrun("evaluate", *sets, "-o", "two", cwd=workdir)
    assert len(outs) == 2
    for two in outs:  # 5 windows dealt 3 / 2; every rank reduces to one process's numbers, bit for bit
        assert {k: two[k] for k in KEYS} == {k: one[k] for k in KEYS}
    assert one["tokens_scored"] == 4 * 63 + 43  # each window's first token is not scored
