#!/usr/bin/env bash
# One-time (idempotent) set-up of the Python reference that scripts/reference-ttft.py times:
# OpenGVLab/InternVL's `InternVLChatModel.chat` (transformers 4.47.1, CPU) on the BENCH.md checkpoint.
#
#   REFERENCE     cache dir, default ~/.cache/internvl-peers/reference (nothing is written in the repo)
#   TORCH_VENV    venv whose torch is reused, default the project's .venv (torch 2.13.0, no re-download)
#   INTERNVL_SRC  a checkout of github.com/OpenGVLab/InternVL; default: the files are taken with
#                 `git show` from the git dir INTERNVL_GIT (default /work/.mirror/OpenGVLab+InternVL/repo)
#                 at INTERNVL_REV (default HEAD)
#   MODEL         the checkpoint, default /tmp/bench-1b (read only: only symlinked)
#
# Result:
#   $REFERENCE/venv     transformers==4.47.1 + what the remote code imports, from PyPI; torch comes from
#                       TORCH_VENV through a .pth file (appended to sys.path, so nothing here shadows it)
#   $REFERENCE/model    staging folder: symlinks to MODEL's files + the InternVL .py files, so that
#                       AutoModel.from_pretrained($REFERENCE/model, trust_remote_code=True) loads the
#                       checkpoint with the reference's code, as the InternVL2_5-1B model card does.
#
# The InternVL files are NOT part of this repo. They are written flat next to config.json the way
# the Hugging Face checkpoints ship them, which needs these import edits in the cache copies only
# (the GitHub tree imports them as the `internvl` package):
#   modeling_internvl_chat.py     `from internvl.conversation import` -> `from .conversation import`;
#                                 the imports of InternLM2ForCausalLM, Phi3ForCausalLM (internvl.model.*)
#                                 and peft's LoraConfig/get_peft_model are removed: they are used only
#                                 for InternLM2/Phi3 decoders and LoRA, which this Qwen2, LoRA-free
#                                 config (use_*_lora = 0) never reaches; the HF-shipped
#                                 InternVL2_5-1B files have none of them either.
#   configuration_internvl_chat.py  the InternLM2Config / Phi3Config imports are removed (same reason).
# Everything else (the model, chat(), generate(), the conversation template) is byte for byte GitHub's.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
log() { printf '[reference-setup] %s\n' "$*" >&2; }

REFERENCE=${REFERENCE:-$HOME/.cache/internvl-peers/reference}
TORCH_VENV=${TORCH_VENV:-$root/.venv}
INTERNVL_GIT=${INTERNVL_GIT:-/work/.mirror/OpenGVLab+InternVL/repo}
INTERNVL_REV=${INTERNVL_REV:-HEAD}
MODEL=${MODEL:-/tmp/bench-1b}
transformers_version=4.47.1
torch_version=2.13.0

[ -x "$TORCH_VENV/bin/python" ] || { log "TORCH_VENV=$TORCH_VENV has no bin/python (run scripts/setup.sh first)"; exit 1; }
[ -f "$MODEL/config.json" ] || { log "MODEL=$MODEL has no config.json"; exit 1; }
mkdir -p "$REFERENCE"

# --- the venv -----------------------------------------------------------------------------------
venv="$REFERENCE/venv"
py="$venv/bin/python"
if [ ! -x "$py" ]; then
  log "creating $venv"
  "$TORCH_VENV/bin/python" -m venv "$venv"
fi
torch_site=$("$TORCH_VENV/bin/python" -W ignore -c 'import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))')
site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$torch_site" > "$site/zz-torch-from-project.pth"
"$py" -W ignore - "$torch_version" "$torch_site" <<'EOF'
import os, sys, torch
want, where = sys.argv[1], sys.argv[2]
got = torch.__version__.split('+')[0]
if got != want or not os.path.realpath(torch.__file__).startswith(os.path.realpath(where)):
    sys.exit(f"torch {torch.__version__} from {torch.__file__}: expected {want} from {where}")
EOF

# transformers pinned as BENCH.md says; torch pinned by a constraint so pip keeps the project's build
# and picks the torchvision made for it. accelerate: the card's low_cpu_mem_usage=True needs it.
# einops + timm: modeling_intern_vit.py; pillow: the card's load_image.
pkgs=("transformers==$transformers_version" einops timm torchvision accelerate pillow)
if ! "$py" -c "import transformers, einops, timm, torchvision, accelerate, PIL, sys; sys.exit(0 if transformers.__version__ == '$transformers_version' else 1)" 2>/dev/null; then
  log "installing ${pkgs[*]} (torch==$torch_version kept from $TORCH_VENV)"
  constraints="$REFERENCE/constraints.txt"
  echo "torch==$torch_version" > "$constraints"
  "$py" -m pip install -q --disable-pip-version-check -c "$constraints" "${pkgs[@]}"
fi
"$py" - <<'EOF'
import warnings, torch, torchvision
from torchvision import transforms as T
from PIL import Image
# the ops the card's build_transform runs must work with this torch
x = T.Compose([T.Resize((448, 448), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
               T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])(Image.new('RGB', (640, 480)))
assert x.shape == (3, 448, 448), x.shape
print(f"[reference-setup] torch {torch.__version__} ({torch.__file__}), torchvision {torchvision.__version__}")
EOF

# --- the reference's code -------------------------------------------------------------------------
src="$REFERENCE/internvl-src"
files=(internvl_chat/internvl/model/internvl_chat/modeling_internvl_chat.py
       internvl_chat/internvl/model/internvl_chat/modeling_intern_vit.py
       internvl_chat/internvl/model/internvl_chat/configuration_internvl_chat.py
       internvl_chat/internvl/model/internvl_chat/configuration_intern_vit.py
       internvl_chat/internvl/conversation.py)
rm -rf "$src.tmp"
mkdir -p "$src.tmp"
if [ -n "${INTERNVL_SRC:-}" ]; then
  for f in "${files[@]}"; do
    [ -f "$INTERNVL_SRC/$f" ] || { log "INTERNVL_SRC=$INTERNVL_SRC has no $f"; exit 1; }
    cp "$INTERNVL_SRC/$f" "$src.tmp/$(basename "$f")"
  done
  origin="$INTERNVL_SRC"
else
  [ -d "$INTERNVL_GIT" ] || { log "no INTERNVL_SRC and no git dir INTERNVL_GIT=$INTERNVL_GIT"; exit 1; }
  commit=$(git --git-dir="$INTERNVL_GIT" rev-parse "$INTERNVL_REV^{commit}")
  for f in "${files[@]}"; do
    git --git-dir="$INTERNVL_GIT" show "$commit:$f" > "$src.tmp/$(basename "$f")"
  done
  origin="OpenGVLab/InternVL@$commit"
fi
echo "$origin" > "$src.tmp/ORIGIN"

# The import edits described at the top; each must match exactly once so a changed upstream file
# fails here instead of silently loading something else.
edit() {  # file, python regex, replacement
  "$py" - "$src.tmp/$1" "$2" "$3" <<'EOF'
import re, sys
path, pattern, repl = sys.argv[1:4]
text = open(path).read()
new, n = re.subn(pattern, repl, text, flags=re.M)
if n != 1:
    sys.exit(f"{path}: expected one match of {pattern!r}, found {n}")
open(path, 'w').write(new)
EOF
}
edit modeling_internvl_chat.py '^from internvl\.conversation import get_conv_template$' 'from .conversation import get_conv_template'
edit modeling_internvl_chat.py '^from internvl\.model\.internlm2\.modeling_internlm2 import InternLM2ForCausalLM\n' ''
edit modeling_internvl_chat.py '^from internvl\.model\.phi3\.modeling_phi3 import Phi3ForCausalLM\n' ''
edit modeling_internvl_chat.py '^from peft import LoraConfig, get_peft_model\n' ''
edit configuration_internvl_chat.py '^from internvl\.model\.internlm2\.configuration_internlm2 import InternLM2Config\n' ''
edit configuration_internvl_chat.py '^from internvl\.model\.phi3\.configuration_phi3 import Phi3Config\n' ''
if grep -n 'internvl\.' "$src.tmp"/*.py; then log "imports of the internvl package remain (above)"; exit 1; fi
rm -rf "$src"
mv "$src.tmp" "$src"

# --- the staging model folder ---------------------------------------------------------------------
stage="$REFERENCE/model"
rm -rf "$stage"
mkdir -p "$stage"
for f in "$MODEL"/*; do
  case "$(basename "$f")" in *.py) continue ;; esac
  ln -s "$(cd "$(dirname "$f")" && pwd)/$(basename "$f")" "$stage/$(basename "$f")"
done
cp "$src"/*.py "$stage/"

# auto_map and architectures must name what the copied files define.
"$py" - "$stage" <<'EOF'
import ast, json, os, sys
stage = sys.argv[1]
cfg = json.load(open(os.path.join(stage, 'config.json')))
def classes(module):
    tree = ast.parse(open(os.path.join(stage, module + '.py')).read())
    return {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
for key, ref in cfg.get('auto_map', {}).items():
    module, cls = ref.split('.')
    if cls not in classes(module):
        sys.exit(f"config.json auto_map.{key} = {ref}: {module}.py defines no {cls}")
assert cfg['architectures'] == ['InternVLChatModel'], cfg['architectures']
assert cfg['llm_config']['architectures'] == ['Qwen2ForCausalLM'], cfg['llm_config']['architectures']
assert not cfg.get('use_backbone_lora') and not cfg.get('use_llm_lora')
print(f"[reference-setup] auto_map ok: {sorted(cfg['auto_map'].values())}")
EOF
log "ready: $stage ($(cat "$src/ORIGIN")); run: $py $root/scripts/reference-ttft.py"
