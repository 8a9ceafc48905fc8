"""`llmc distill-data` -> `llmc train-student` -> `llmc evaluate` through the real CLI, on a tiny teacher (the
real tokenizer and chat template, 4 layers of width 32) so the chain runs in seconds."""

import json

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # see conftest: small ops on a shared CPU


def test_distill_train_evaluate_chain(llmc, workdir, tiny_teacher):
    (workdir / "dd.yaml").write_text(
        f"teacher: {{name: {tiny_teacher}}}\n"
        "prompts: {source: 'builtin:gsm8k_train', template: '{question}', num_samples: 6}\n"
        "styles: {cot: 1, structured: 0, plain: 1}\n"
        "check_answers: false\nmax_new_tokens: 8\nbatch_size: 3\nsave_logits: true\nlogits_top_k: 4\n")
    p = llmc("distill-data", "-c", "dd.yaml", "--json", cwd=workdir, env=ONE_THREAD)
    assert p.returncode == 0, p.stderr
    dd = json.loads(p.stdout)["summary"]
    assert dd["generated"] == 6 and dd["rows"] == dd["kept"] > 0

    p = llmc("train-student", "--json", "--set", f"teacher.name={tiny_teacher}", "--set", "steps=2",
             "--set", "batch_size=2", "--set", "kd_source=stored", "--set", "max_length=128",
             cwd=workdir, env=ONE_THREAD)  # no -i: reads runs/distill-data, the default input
    assert p.returncode == 0, p.stderr
    ts = json.loads(p.stdout)["summary"]
    assert ts["steps"] == 2
    assert ts["student_layers"] == 2 and ts["eval_kl"] is not None
    assert (workdir / "runs" / "train-student" / "config.json").is_file()

    p = llmc("evaluate", "-i", "runs/train-student", "--ppl", "--json", "--set", "ppl.max_tokens=64",
             "--set", "ppl.seq_len=32", cwd=workdir, env=ONE_THREAD)
    assert p.returncode == 0, p.stderr
    ev = json.loads(p.stdout)["summary"]
    assert ev["ppl"] > 1.0 and ev["tokens_scored"] > 0
