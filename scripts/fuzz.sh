#!/usr/bin/env bash
# Fuzzes the JSONL request parser, the prompt expander, the image loader, serve's HTTP request
# head parser and its OpenAI message parser (fuzz/), each for a bounded time:
# ./scripts/fuzz.sh [SECONDS per target, default 60]. Runs start from the committed corpus
# (fuzz/corpus/<target>); inputs found on the way go to a scratch folder, so the corpus
# stays as committed. A crash fails the run and leaves its input in fuzz/artifacts/<target>/.
# Needs cargo-fuzz (scripts/setup.sh installs it) and the environment ./dev sets for libtorch.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
secs=${1:-60}
# cargo-fuzz passes -Z flags: allowed on the stable toolchain with RUSTC_BOOTSTRAP
export RUSTC_BOOTSTRAP=1
# no sanitizer: the code under test is safe Rust (plus libjpeg-turbo, which is not
# instrumented anyway); libFuzzer still catches panics, hangs and memory blow-ups
flags=(--sanitizer none)
cargo fuzz build "${flags[@]}"
for target in jsonl_request prompt_expander image_loader http_request openai_request; do
  scratch=$(mktemp -d)
  trap 'rm -rf "$scratch"' EXIT
  echo "fuzzing $target for ${secs}s" >&2
  cargo fuzz run "${flags[@]}" "$target" "$scratch" "fuzz/corpus/$target" -- \
    -max_total_time="$secs" -timeout=30 -rss_limit_mb=2048 -print_final_stats=1
  rm -rf "$scratch"
done
