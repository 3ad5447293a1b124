#!/usr/bin/env bash
# Time to first token, interleaved rounds: internvl-chat's `bench` (1 and 7 tiles), llama.cpp's
# llama-mtmd-cli (../shared/peers/llamacpp/bench.sh sections (b) and (c)) and the Python
# reference (scripts/reference-ttft.py, set up by scripts/reference-setup.sh). Results go to OUT.
set -u
M=${MODEL:-/tmp/bench-1b}      # the random InternVL2_5-1B (examples/random_checkpoint.rs)
G=${GGUF:-/tmp/bench-1b-gguf}  # from ../shared/peers/llamacpp/convert.sh
OUT=${OUT:-/tmp/ttft}
ROUNDS=${ROUNDS:-2}
RUNS=${RUNS:-2}
PY=${PY:-$HOME/.cache/internvl-peers/reference/venv/bin/python}
SHARED=${SHARED:-$(cd "$(dirname "$0")/../.." && pwd)/shared}
mkdir -p "$OUT"
for round in $(seq "$ROUNDS"); do
  echo "== round $round $(date +%T) $(uptime | sed 's/.*load/load/')"
  target/release/internvl-chat bench --model "$M" --tiles 1,6 --runs "$RUNS" --json \
    > "$OUT/ours$round.json" 2> "$OUT/ours$round.err"
  echo "ours: $(grep -o '"ttft_s":[0-9.]*' "$OUT/ours$round.json" | tr '\n' ' ')"
  REPS=1 SKIP="bench followup" "$SHARED/peers/llamacpp/bench.sh" "$G" "$OUT/llama$round" \
    > "$OUT/llama$round.log" 2>&1
  echo "llama.cpp (run, ttft_s):"
  sed 's/.*"tag": *"\([^"]*\)".*"ttft_s": *\([0-9.]*\).*/  \1 \2/' "$OUT/llama$round/mtmd.jsonl"
  # (the reference loads the checkpoint staged by reference-setup.sh, MODEL there)
  "$PY" scripts/reference-ttft.py --runs "$RUNS" --max-num 1 6 --decode-tokens 0 \
    > "$OUT/ref$round.log" 2>&1
  echo "reference: $(grep ttft_median "$OUT/ref$round.log" | grep -o '"tiles": [0-9]*\|"ttft_s": [0-9.]*' | tr '\n' ' ')"
done
