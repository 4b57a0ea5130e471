#!/bin/bash
# The declared SmolLM2 MBPP run (README, "SmolLM2-135M-Instruct on MBPP"): base, none, mtp, sfr one
# invocation each on the same --out, then all four, which reuses every store, for the report.
# MBPP=path/to/mbpp.jsonl (see `python reproduce_mbpp.py download`); run from anywhere.
cd "$(dirname "$0")/.." || exit 2
MBPP=${MBPP:-data/mbpp.jsonl}
COMMON="--mbpp $MBPP --model $(python sfr_hf.py smollm2) --lora --chat on --problems 20 --n 5 --temperatures 0.8 --max_new_tokens 192 --gen_batch 10 --steps 24 --set batch_size=4 --set lr_warmup=3 --set block_size=512 --val_problems 8 --seed 0 --threads 1 --workers 1 --no_progress --out out/mbpp-smollm2-chat"
for m in base none mtp sfr; do
  echo "=== $m $(date -u)"; python reproduce_mbpp.py run $COMMON --methods $m --report out/mbpp-smollm2-chat/report-$m || exit 1
done
echo "=== all $(date -u)"; python reproduce_mbpp.py run $COMMON --methods base,none,mtp,sfr --report results/mbpp-smollm2-chat
echo "=== done $(date -u)"
