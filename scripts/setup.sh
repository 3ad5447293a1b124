#!/usr/bin/env bash
# One-time (idempotent) set-up of everything the build needs on a fresh Debian machine:
#   - Debian packages for ffmpeg-next (libav*-dev, pkg-config, clang/libclang-dev)
#   - a project-local virtualenv (.venv) with torch==2.13.0 from PyPI, whose libtorch tch links against
#   - the official `openai` Python client in .venv, which the server tests drive `serve` with
#   - cargo-fuzz, for the bounded fuzzing of the test command
# Every step is skipped when already done, so the run and test commands can call it each time.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

log() { printf '[setup] %s\n' "$*" >&2; }

# --- system packages --------------------------------------------------------------------------
apt_pkgs=(pkg-config clang libclang-dev libavcodec-dev libavformat-dev libavutil-dev libswscale-dev
          libswresample-dev libavfilter-dev libavdevice-dev tmux)
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing Debian packages: ${missing[*]}"
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- libtorch through PyPI's torch ------------------------------------------------------------
venv="$root/.venv"
torch_version=2.13.0
if ! "$venv/bin/python" -c "import torch,sys; sys.exit(0 if torch.__version__.split('+')[0]=='$torch_version' else 1)" 2>/dev/null; then
  log "creating $venv with torch==$torch_version (libtorch for tch)"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "torch==$torch_version"
fi

# --- the official OpenAI client, for the tests of `serve` -------------------------------------
openai_version=1.109.1
if ! "$venv/bin/python" -c "import openai,sys; sys.exit(0 if openai.__version__=='$openai_version' else 1)" 2>/dev/null; then
  log "installing openai==$openai_version into $venv (client for the serve tests)"
  "$venv/bin/pip" install -q --disable-pip-version-check "openai==$openai_version"
fi

# --- cargo-fuzz (scripts/fuzz.sh, run by ./dev test) --------------------------------------------
fuzz_version=0.13.2
if ! cargo fuzz --version 2>/dev/null | grep -qx "cargo-fuzz $fuzz_version"; then
  log "installing cargo-fuzz $fuzz_version"
  cargo install --quiet --locked --version "$fuzz_version" cargo-fuzz
fi
