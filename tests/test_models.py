import json

import pytest
import torch

from llmcompress.config import ModelConfig
from llmcompress.errors import UserError
from llmcompress.models import embedded_model_dir, is_quantized_dir, load_model, resolve_model


def test_embedded_default_is_cached_dense_safetensors(smollm_path):
    assert (smollm_path / "model.safetensors").is_file() and (smollm_path / "config.json").is_file()
    cfg = json.loads((smollm_path / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_hidden_layers"] == 30 and cfg["hidden_size"] == 576
    assert resolve_model("smollm2-135m") == embedded_model_dir() == smollm_path
    assert not is_quantized_dir(smollm_path)


def test_embedded_default_generates_sensible_text(smollm):
    model, tok = smollm
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in text


def test_embedded_default_loss_is_that_of_a_real_lm(smollm):
    model, tok = smollm
    ids = tok("The quick brown fox jumps over the lazy dog. " * 4, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert loss < 3.0  # a random 49k-vocab model would sit near ln(49152) = 10.8


@pytest.mark.parametrize("name,msg", [
    ("./no/such/dir", "does not exist"),
    ("/tmp/definitely-missing-model.gguf", "does not exist"),
    ("not a valid id!", "does not exist"),
])
def test_bad_model_paths_are_one_line_user_errors(name, msg):
    with pytest.raises(UserError, match=msg):
        load_model(ModelConfig(name=name))


def test_directory_without_config_is_not_a_model(tmp_path):
    with pytest.raises(UserError, match="not a model directory"):
        resolve_model(str(tmp_path))


def test_hub_ids_resolve_to_strings():
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
