"""Where one prefill's GPU time goes: torch.profiler kernel totals of a random-weight Llama (scripts/e2e_speed.py's
models and schemes), three warm-up forwards, then one profiled.

    python scripts/lab/prefill_profile.py --schemes bf16,w8a8_dynamic,w4a16_g128 --model 1b --tokens 2048
"""
import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import e2e_speed as E  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--schemes", default="bf16,w8a8_dynamic,w4a16_g128")
    ap.add_argument("--model", default="1b", choices=sorted(E.SHAPES))
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--rows", type=int, default=14, help="table rows (by CUDA time)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    for scheme in args.schemes.split(","):
        model = E.build(args.model, dev, torch.bfloat16)
        if E.SCHEMES[scheme]:
            E.quantize(model, E.SCHEMES[scheme])
        ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), device=dev)
        with torch.no_grad():
            for _ in range(3):
                model(ids, use_cache=False, logits_to_keep=1)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
                model(ids, use_cache=False, logits_to_keep=1)
                torch.cuda.synchronize()
        print(f"===== {scheme}")
        print(p.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
