import json

from llmcompress import __version__


def test_version(llmc):
    r = llmc("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"llmc {__version__}"


def test_help_lists_every_command_and_option_defaults(llmc):
    r = llmc("--help")
    for cmd in ("distill-data", "train-student", "calibrate", "quantize", "evaluate", "eval", "export", "run"):
        assert cmd in r.stdout
    r = llmc("quantize", "--help")
    assert r.returncode == 0
    for opt in ("--config", "--set", "--input", "--output", "--quiet", "--json", "--debug"):
        assert opt in r.stdout
    assert "runs/quantize" in r.stdout and "weights.group_size = 128" in r.stdout


def test_bad_config_exits_2_with_one_line(llmc, tmp_path):
    cfg = tmp_path / "q.yaml"
    cfg.write_text("weights:\n  bits: 3\n")
    r = llmc("quantize", "--config", str(cfg), "--output", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and str(cfg) in lines[0] and "weights.bits" in lines[0]
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_bad_set_exits_2(llmc, tmp_path):
    r = llmc("calibrate", "--set", "batch_size=0", "--output", str(tmp_path / "o"), cwd=tmp_path)
    assert r.returncode == 2 and "--set: batch_size" in r.stderr


def test_missing_config_file_exits_2(llmc, tmp_path):
    r = llmc("evaluate", "--config", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert r.returncode == 2 and "config file not found" in r.stderr


def test_missing_model_exits_2(llmc, tmp_path):
    r = llmc("calibrate", "--set", "model.name=./nowhere", "--json", "--output", str(tmp_path / "o"),
             cwd=tmp_path)
    assert r.returncode == 2 and "./nowhere: model.name: model path does not exist" in r.stderr
    assert r.stdout.strip() == "" or json.loads(r.stdout)
