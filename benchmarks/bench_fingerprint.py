"""Cost of binding a calibration artifact to its model's weights (models.weights_fingerprint): one uncached
sha256 pass over the model's safetensors, against the cached lookup every later stage pays.

    python benchmarks/bench_fingerprint.py [MODEL_DIR]   (default: the embedded SmolLM2-135M)
"""

import sys
import tempfile
import time
from pathlib import Path


def main():
    import os

    from llmcompress.models import embedded_model_dir

    model = Path(sys.argv[1]) if len(sys.argv) > 1 else embedded_model_dir()
    size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    with tempfile.TemporaryDirectory() as cache:
        os.environ["LLMC_CACHE"] = cache  # an empty hash cache: the first call reads every byte
        from llmcompress.models import weights_fingerprint

        t = time.perf_counter()
        weights_fingerprint(model)
        cold = time.perf_counter() - t
        t = time.perf_counter()
        weights_fingerprint(model)
        warm = time.perf_counter() - t
    print(f"{model}: {size / 2**20:.0f} MiB of safetensors; fingerprint uncached {cold:.2f} s "
          f"({size / 2**20 / cold:.0f} MiB/s), cached {warm * 1000:.1f} ms ({cold / warm:.0f}x)")


if __name__ == "__main__":
    main()
