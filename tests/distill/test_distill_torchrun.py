"""distill-data and train-student under torchrun: two CPU processes on gloo give what one process gives."""

import json

import pytest
from _shared import torchrun
from safetensors.torch import load_file

from llmcompress.artifacts import read_artifact
from llmcompress.config import DistillDataConfig, TrainStudentConfig, from_dict
from llmcompress.errors import UserError
from llmcompress.progress import Reporter
from llmcompress.stages import StageInputs, run_stage


def _rows(path):
    return [json.loads(line) for f in sorted((path / "data").glob("*.jsonl")) for line in f.read_text().splitlines()]


def test_distill_data_two_ranks_write_the_rows_of_one(tiny_teacher, workdir):
    # sampled, 5 batches (an odd count: rank 1 idles in the last round), stored logits: all must merge exactly
    settings = {"teacher.name": str(tiny_teacher), "styles.plain": 1.0, "styles.cot": 1.0, "check_answers": False,
                "prompts.source": "builtin:gsm8k_train", "prompts.template": "{question}",
                "prompts.num_samples": 9, "max_new_tokens": 8, "min_new_tokens": 8, "batch_size": 2,
                "do_sample": True, "save_logits": True, "logits_top_k": 4, "shard_rows": 4}
    nested: dict = {}
    for key, value in settings.items():
        *parents, leaf = key.split(".")
        node = nested
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = value
    cfg = from_dict(DistillDataConfig, nested)
    one = run_stage("distill-data", cfg, workdir / "one", StageInputs(model=cfg.teacher), Reporter())
    (workdir / "dd.yaml").write_text(json.dumps(nested))  # JSON is YAML
    _, outs = torchrun("distill-data", "-c", "dd.yaml", "-o", str(workdir / "two"), cwd=workdir)
    assert sorted(o.get("rank", 0) for o in outs) == [0, 1]
    assert sorted(o.get("batches_generated", 0) for o in outs) == [0, 2]  # rank 0 summarises; rank 1 made 2 of 5
    two = workdir / "two"
    assert one.manifest["summary"]["batches"] == 5
    assert _rows(two) == _rows(one.path) and len(_rows(two)) == 9
    for f in sorted((one.path / "logprobs").glob("*.safetensors")):
        a, b = load_file(str(f)), load_file(str(two / "logprobs" / f.name))
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    # nothing but the artifact: rank 1 wrote no files, the work dir is gone
    assert sorted(p.name for p in workdir.iterdir()) == ["dd.yaml", "one", "two"]


@pytest.fixture(scope="module")
def ts_data(tiny_teacher, tmp_path_factory):
    cfg = from_dict(DistillDataConfig, {
        "teacher": {"name": str(tiny_teacher)}, "styles": {"plain": 1.0}, "check_answers": False,
        "prompts": {"source": "builtin:gsm8k_train", "template": "{question}", "num_samples": 16},
        "max_new_tokens": 12, "min_new_tokens": 4, "batch_size": 16, "do_sample": True})
    return run_stage("distill-data", cfg, tmp_path_factory.mktemp("ts") / "dd", StageInputs(model=cfg.teacher))


TRAIN = {"steps": 6, "batch_size": 4, "grad_accum": 2, "lr": 3e-3, "warmup_steps": 1, "eval_every": 3,
         "save_every": 2, "max_length": 96, "eval_fraction": 0.2, "alpha": 0.5, "temperature": 2.0}


@pytest.fixture(scope="module")
def one_rank(tiny_teacher, ts_data, tmp_path_factory):
    """The reference: one process, uninterrupted (`parallel` does nothing in one process)."""
    return _one_rank(tiny_teacher, ts_data, tmp_path_factory.mktemp("ts1") / "one")


def _one_rank(tiny_teacher, data, out, reporter=None, **kw):
    cfg = from_dict(TrainStudentConfig, {"teacher": {"name": str(tiny_teacher)}, **TRAIN, **kw})
    return run_stage("train-student", cfg, out, StageInputs(artifact=data, model=cfg.teacher), reporter or Reporter())


def _two_ranks(tiny_teacher, data, out, cwd, **kw):
    sets = [a for k, v in {**TRAIN, **kw}.items() for a in ("--set", f"{k}={v}")]
    return torchrun("train-student", "-i", str(data.path), "-o", str(out), "--set", f"teacher.name={tiny_teacher}",
                    *sets, cwd=cwd)[1]


def _curve(path):
    return [json.loads(line) for line in (path / "train_log.jsonl").read_text().splitlines()]


def _close(a, b, key):
    return [x[key] for x in a] == pytest.approx([y[key] for y in b], rel=1e-5, abs=1e-6)


def test_ddp_two_ranks_follow_the_loss_curve_of_one(tiny_teacher, ts_data, one_rank, workdir):
    one = one_rank
    outs = _two_ranks(tiny_teacher, ts_data, workdir / "two", workdir)
    assert [o["world_size"] for o in outs] == [2, 2] and {o["parallel"] for o in outs} == {"ddp"}
    assert outs[0]["param_fingerprint"] == outs[1]["param_fingerprint"]  # the replicas stayed in sync
    curve = _curve(workdir / "two")
    for key in ("loss", "kd", "ce", "grad_norm"):
        assert _close(curve, _curve(one.path), key), key
    assert outs[0]["param_fingerprint"] == pytest.approx(one.manifest["summary"]["param_fingerprint"], rel=1e-6)
    assert not list(workdir.glob(".two.work-*"))  # the driver removed rank 0's work dir (checkpoints)


def test_fsdp_resumes_a_one_rank_checkpoint_on_two_ranks(tiny_teacher, ts_data, one_rank, workdir):
    """One process is killed after step 5 (checkpoint of step 4); two FSDP processes resume it and finish with
    the curve and weights of one uninterrupted process: full-state checkpoints cross world sizes and modes."""
    whole = one_rank

    class Kill(Reporter):
        def update(self, **kw):
            self.n = getattr(self, "n", 0) + 1
            if self.n == 5:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _one_rank(tiny_teacher, ts_data, workdir / "two", Kill(), parallel="fsdp")
    assert list(workdir.glob(".two.work-*/checkpoint.pt"))
    outs = _two_ranks(tiny_teacher, ts_data, workdir / "two", workdir, parallel="fsdp")
    assert [o["resumed_from_step"] for o in outs] == [4, 4] and {o["parallel"] for o in outs} == {"fsdp"}
    assert _close(_curve(workdir / "two"), _curve(whole.path), "loss")
    assert outs[0]["param_fingerprint"] == pytest.approx(whole.manifest["summary"]["param_fingerprint"], rel=1e-6)
    assert read_artifact(workdir / "two").manifest["summary"]["eval_ce"] == pytest.approx(
        whole.manifest["summary"]["eval_ce"], rel=1e-5)


def test_batch_size_must_split_over_the_ranks(tiny_teacher, ts_data, workdir, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # refused before any process group is joined
    with pytest.raises(UserError, match="batch_size: 3 sequences cannot be split evenly over 2 processes"):
        _one_rank(tiny_teacher, ts_data, workdir / "x", batch_size=3)
    assert not (workdir / "x").exists()
