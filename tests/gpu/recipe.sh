#!/usr/bin/env bash
# Issue 8's GPU measurements on CM-Off, in stages that each write to $OUT as they finish:
#   1. routing on the whole-text-fine-tuned served model (studies/routing_policies.py
#      --through-fit --unfreeze-text-layers all), 5 folds x 1 seed;
#   2. the recipe grid: task frozen, task / task+ITC+ITM with the whole text encoder
#      fine-tuned, and the loss-weight sweep (frozen encoders), 5 folds x 1 seed;
#   3. a second seed of each, routing first, as the budget allows.
# A stage cut by the budget leaves resumable runs: all of them come back in runs.tgz.
#
#   bash tests/gpu/recipe.sh [BUDGET_SECONDS]
#
# Dry run here first, as the GPU image sees the project (not installed, no weight wheels):
#   PYTHON=tests/gpu/bare/python DEVICE=cpu OUT=/tmp/dry bash tests/gpu/recipe.sh 300
#
# The device call carries what tests.gpu.assets --recipe packed: var/gpu-pack-data (first
# call, with run_all.sh) and var/gpu-pack-text (this call; the 64 MiB tree limit keeps them apart).
# The second call must follow the first within the machine's 30 s warm window, or the data is gone.
# To resume a cut grid, unpack the last runs.tgz here and carry var/A-gpu and
# var/bench/routing/runs-fit-text-all as well (a few hundred KB): done runs are not redone.
set -uo pipefail
cd "$(dirname "$0")/../.."
BUDGET=${1:-420}
DEVICE=${DEVICE:-cuda}
OUT_DIR="${OUT:-var/bench/gpu}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/recipe.log"
start=$SECONDS
left() { echo $((BUDGET - (SECONDS - start) - $1)); }

for need in var/gpu-pack-data/cm-off-meme-sample/sample_data.csv var/gpu-pack-text/minilm/model.fp16.safetensors; do
  [ -f "$need" ] || { echo "$need is missing: pack with 'python -m tests.gpu.assets --recipe' and carry it" >&2; exit 3; }
done
# MiniLM as float32 tensors again (packed as float16 to fit a call).
rm -rf var/gpu-models/minilm && mkdir -p var/gpu-models && cp -r var/gpu-pack-text/minilm var/gpu-models/minilm
source tests/gpu/env.sh
"$PY" - <<'PY' || exit 4
from safetensors.torch import load_file, save_file
d = "var/gpu-models/minilm/"
save_file({k: v.float() if v.is_floating_point() else v for k, v in load_file(d + "model.fp16.safetensors").items()},
          d + "model.safetensors")
PY
rm var/gpu-models/minilm/model.fp16.safetensors

# The data under the path it has on the development machine, so the routing runs' config.json
# (which records each post's image path) lets them be re-scored there.
DATA=/work/shared/data/cm-off-meme-sample
if [ ! -f "$DATA/sample_data.csv" ]; then
  mkdir -p "$(dirname "$DATA")" 2>/dev/null && ln -sfn "$PWD/var/gpu-pack-data/cm-off-meme-sample" "$DATA" \
    || DATA="$PWD/var/gpu-pack-data/cm-off-meme-sample"
fi
export MODSTREAM_CM_OFF_MEME="$DATA"

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
  echo "data $DATA, budget ${BUDGET}s, device $DEVICE"
} 2>&1 | tee "$LOG"

routing() {  # $1 seeds, $2 seconds
  echo "== routing, whole text encoder fine-tuned, through fit, seeds $1 ($2 s)" | tee -a "$LOG"
  timeout "$2" "$PY" studies/routing_policies.py --through-fit --unfreeze-text-layers all --device "$DEVICE" \
    --seeds "$1" --boot 500 --out "$OUT_DIR/routing_text_all_seeds$1.json" 2>&1 | tee -a "$LOG"
  echo "routing seeds $1 rc=${PIPESTATUS[0]} at $((SECONDS - start)) s" | tee -a "$LOG"
}

grid() {  # $1 seeds, $2 seconds; resumes var/A-gpu (seeds are not part of a grid's identity)
  echo "== recipe grid, seeds $1 ($2 s)" | tee -a "$LOG"
  timeout "$2" "$PY" -m modstream.cli -v ablate --preset cm-off-meme --folds 5 --seeds "$1" \
    --unfreeze-text-layers all --aux-weights 0.05,0.1,0.2,0.3 \
    --only task --only "task (text encoder fine-tuned)" --only "task+itc+itm (text encoder fine-tuned)" \
    --only "task+itc+itm (aux 0.05)" --only "task+itc+itm (aux 0.1)" \
    --only "task+itc+itm (aux 0.2)" --only "task+itc+itm (aux 0.3)" \
    --jobs 1 --quiet --device "$DEVICE" --out var/A-gpu 2>&1 | tee -a "$LOG"
  echo "grid seeds $1 rc=${PIPESTATUS[0]} at $((SECONDS - start)) s" | tee -a "$LOG"
}

# Most wanted first: every stage gets what is left minus a reserve for the ones after it.
routing 1 "$(left 260)"
grid 1 "$(left 100)"
[ "$(left 60)" -gt 30 ] && routing 2 "$(left 60)"
[ "$(left 15)" -gt 30 ] && grid 2 "$(left 15)"
tar czf "$OUT_DIR/runs.tgz" var/A-gpu var/bench/routing/runs-fit-text-all 2>>"$LOG"
echo "done at $((SECONDS - start)) s" | tee -a "$LOG"
