from llmcompress.models import embedded_model_dir
from llmcompress.resources import activation_bytes, weights_bytes


def test_weight_estimate_counts_parameters_from_headers(smollm, smollm_path):
    model, _ = smollm
    # tied embeddings are stored once in the file, as they are held once in memory
    n_params = sum(p.numel() for p in model.parameters())
    assert weights_bytes(smollm_path, 4) == n_params * 4
    assert activation_bytes(smollm_path, 2, 128) > activation_bytes(smollm_path, 1, 128) > 0


def test_run_that_cannot_fit_is_refused_before_work(llmc, tmp_path):
    embedded_model_dir()
    r = llmc("calibrate", "--output", str(tmp_path / "cal"), cwd=tmp_path, env={"LLMC_MAX_MEMORY_GB": "0.2"})
    assert r.returncode == 2, r.stderr
    assert "needs about" in r.stderr and "GiB" in r.stderr and "0.20 GiB is available" in r.stderr
    assert not (tmp_path / "cal").exists()
