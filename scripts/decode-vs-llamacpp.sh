#!/usr/bin/env bash
# Decode speed, interleaved, 2 threads, 64 tokens: internvl-chat (bf16 native/libtorch, 8-bit and
# 4-bit with the head quantized, sampled, forced AVX2) and llama.cpp's llama-bench, with its
# default load mode (the GGUF memory-mapped) and with `--load-mode none` (weights read into its
# own buffers, as our decoder's are: `Weights::own`).
set -u
PD=${PD:-target/release/examples/profile_decode}
LB=${LB:-$HOME/.cache/internvl-peers/llamacpp/build/bin/llama-bench}
G=${GGUF:-/tmp/bench-1b-gguf}  # from ../shared/peers/llamacpp/convert.sh
M=${MODEL:-/tmp/bench-1b}  # the random InternVL2_5-1B (examples/random_checkpoint.rs)
ours() { echo "ours $*: $(env $1 $PD $M 64 2 $2 1 $3 2>&1 | grep -o 'decode [0-9.]* steps/s.*')"; }
theirs() { echo "llama $*: $($LB -m $G/text-$1.gguf -t 2 -p 0 -n 64 -r 1 ${2:+-lm $2} -o csv 2>/dev/null | tail -1 | awk -F, '{print $(NF-1)}')"; }
for round in 1 2 3; do
  echo "== round $round $(uptime | sed 's/.*load/load/')"
  ours INTERNVL_NATIVE=1 bf16 greedy
  theirs bf16
  theirs bf16 none
  ours INTERNVL_NATIVE=1 int8-head greedy
  theirs q8_0
  theirs q8_0 none
  ours INTERNVL_NATIVE=1 q4-head greedy
  theirs q4_0
  theirs q4_0 none
  ours INTERNVL_NATIVE=1 int8 greedy
  ours INTERNVL_NATIVE=0 bf16 greedy
  ours INTERNVL_NATIVE=1 bf16 sampled
  ours "INTERNVL_NATIVE=1 INTERNVL_KERNEL=avx2" bf16 greedy
  ours "INTERNVL_NATIVE=1 INTERNVL_KERNEL=avx2" int8-head greedy
  ours "INTERNVL_NATIVE=1 INTERNVL_KERNEL=avx2" q4-head greedy
done
