#!/usr/bin/env bash
# CPU decode at batch 1 through `llmc eval --speed` (128-token context, 16 greedy steps, median of 3), the peers
# back to back in each of ROUNDS rounds, `uptime` before each: fp32, bf16 (model.dtype=bfloat16), and the W4A16
# checkpoints named in W4 (lm_head in fp32, the default exclude) and W4_HEAD (lm_head quantized too:
# quantize with --set 'exclude=["*embed*"]'). The machine is shared, so ratios are taken within a round.
#   W4=q_w4a16 W4_HEAD=q_w4a16_head OUT=/tmp/ab bash benchmarks/cpu_decode_ab.sh
set -uo pipefail
export OMP_NUM_THREADS=${THREADS:-1}
OUT=${OUT:-runs/cpu_decode_ab}
mkdir -p "$OUT"
S="--speed --set speed.prompt_lengths=[16] --set speed.batch_sizes=[1] --set speed.new_tokens=${NEW:-16}"
for round in $(seq "${ROUNDS:-3}"); do
  for v in ${VARIANTS:-fp32 bf16 w4a16 w4a16_head}; do
    case $v in
      fp32) A="";; bf16) A="--set model.dtype=bfloat16";; w4a16) A="-i $W4";; w4a16_head) A="-i $W4_HEAD";;
    esac
    echo "round $round $v $(uptime)"
    nice -n 10 llmc eval -q $A $S -o "$OUT/${round}_$v" > /dev/null 2> "$OUT/${round}_$v.err"
    python -c "import json; m=json.load(open('$OUT/${round}_$v/results.json'))['models'][-1]; \
print('round $round $v', m['label'], round(m['speed']['decode']['1']['decode_tok_s'], 2), 'tok/s')"
  done
done
