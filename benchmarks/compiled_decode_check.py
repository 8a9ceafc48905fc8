"""The compiled decode step through torch.ops.llmc, off the GPU: torch.compile of StaticDecoder's step on a small
W4A16 or W8A8 Llama served by the CPU kernels (the CUDA ops take the same Python path, with their fake kernels).
Prints whether the greedy tokens equal the eager reference's and dynamo's graph-break counter. Minutes on 2 cores,
hence a script and not a test.

    python benchmarks/compiled_decode_check.py w4      # or w8
"""

import sys
import time

import torch
import torch._dynamo
from transformers import LlamaConfig, LlamaForCausalLM
from llmcompress.config import QuantizeConfig, load_config
from llmcompress.quant.quantize import quantize_model
from llmcompress.runtime import StaticDecoder, eager_greedy
from llmcompress.kernels import ops
print("backend", ops.backend("cpu"))
SCH = {"w4": ["weights.format=int4", "weights.granularity=group", "weights.group_size=128", "activations.format=none"],
       "w8": ["weights.format=int8", "weights.granularity=channel", "activations.format=int8", "activations.dynamic=True"]}
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2)
m = LlamaForCausalLM(cfg).eval()
quantize_model(m, load_config(QuantizeConfig, None, SCH[sys.argv[1]]))
ids = torch.randint(0, 512, (2, 9))
ref = eager_greedy(m, ids, 10)

t = time.time()
d = StaticDecoder(m, 2, 32, compile=True)
out = d.generate(ids, 10)
print(sys.argv[1], "compile+gen", time.time() - t, "equal", torch.equal(out, ref))
print(torch._dynamo.utils.counters["graph_break"])
