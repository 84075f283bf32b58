# shellcheck shell=bash
# Shared part of the finetune/*.sh launchers. Sourced, not run: a launcher sets LAUNCHER_NAME,
# LAUNCHER_HELP and the array METHOD_ARGS (its defaults), then calls `launch "$@"`.
#
# Options: -m/--model MODEL  -d/--data DATA  -o/--output DIR  --eval-data DATA  -h/--help
# or the variables MODEL, DATA, EVAL_DATA, OUTPUT_DIR. Every other argument passes through to
# finetune.py and overrides the launcher's defaults (the last value of a flag wins).
# Distributed: GPUS_PER_NODE (default: visible GPUs, or 1 process without GPUs), NNODES (1),
# NODE_RANK (0), MASTER_ADDR (localhost), MASTER_PORT (6001).

set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$REPO_DIR/.venv/bin/python" ]]; then PYTHON="$REPO_DIR/.venv/bin/python"; else PYTHON=python3; fi
fi

# Defaults every method shares (the Qwen scripts' values); a launcher adds its own after these.
COMMON_ARGS=(
    --num_train_epochs 5
    --per_device_train_batch_size 1
    --gradient_accumulation_steps 8
    --weight_decay 0.1
    --adam_beta2 0.95
    --warmup_steps 0.01
    --lr_scheduler_type cosine
    --logging_steps 1
    --save_strategy steps
    --save_steps 1000
    --save_total_limit 10
    --model_max_length 2048
    --gradient_checkpointing True
)

usage() {
    cat <<EOF
usage: bash finetune/$LAUNCHER_NAME [-m MODEL] [-d DATA] [-o OUTPUT_DIR] [--eval-data DATA] [finetune.py flags...]

$LAUNCHER_HELP

  -m, --model       model folder or hub name (default: the tiny offline demo model, built if missing)
  -d, --data        training data file(s), comma-separated (default: data/example.json)
  -o, --output      output folder (default: output/<launcher>)
      --eval-data   evaluation data file(s)
  -h, --help        this help

Variables: MODEL DATA EVAL_DATA OUTPUT_DIR GPUS_PER_NODE NNODES NODE_RANK MASTER_ADDR MASTER_PORT PYTHON
Defaults passed to finetune.py (override any of them by passing the flag again):
  ${COMMON_ARGS[*]}
  ${METHOD_ARGS[*]}
EOF
}

die() {
    echo "$LAUNCHER_NAME: error: $*" >&2
    exit 2
}

visible_gpus() {
    "$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0
}

# The precision flag for this model on this machine: fp16 for a GPTQ checkpoint (its kernels compute in fp16),
# else bf16 where the GPU has it; nothing on a CPU (fp32).
precision_flags() {
    "$PYTHON" - "$1" <<'PYEOF' 2>/dev/null || true
import sys
import torch
from tuning.model import is_gptq_checkpoint
if torch.cuda.is_available():
    if is_gptq_checkpoint(sys.argv[1]):
        print("--fp16 True")
    elif torch.cuda.is_bf16_supported():
        print("--bf16 True")
PYEOF
}

check_model() {
    local model="$1"
    if [[ -d "$model" ]]; then
        [[ -f "$model/config.json" || -f "$model/adapter_config.json" ]] || die "$model is a folder without config.json: not a model"
    elif [[ "$model" =~ ^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$ && ! "$model" =~ ^\.{1,2}/ ]]; then
        echo "$LAUNCHER_NAME: $model is not a local folder; treating it as a hub name" >&2
    else
        die "model $model not found: give a model folder or a hub name like Qwen/Qwen2.5-VL-7B-Instruct"
    fi
}

check_data() {
    local item
    IFS=',' read -ra items <<<"$1"
    for item in "${items[@]}"; do
        [[ -e "$item" ]] || die "data file $item not found (pass -d FILE or DATA=FILE)"
    done
}

launch() {
    local extra=()
    while [[ $# -gt 0 ]]; do
        case "$1" in
            -h | --help) usage; exit 0 ;;
            -m | --model) MODEL="${2:?-m needs a value}"; shift 2 ;;
            -d | --data) DATA="${2:?-d needs a value}"; shift 2 ;;
            -o | --output) OUTPUT_DIR="${2:?-o needs a value}"; shift 2 ;;
            --eval-data) EVAL_DATA="${2:?--eval-data needs a value}"; shift 2 ;;
            *) extra+=("$1"); shift ;;
        esac
    done

    cd "$REPO_DIR"
    DATA="${DATA:-data/example.json}"
    OUTPUT_DIR="${OUTPUT_DIR:-output/${LAUNCHER_NAME%.sh}}"
    check_data "$DATA"
    [[ -z "${EVAL_DATA:-}" ]] || check_data "$EVAL_DATA"
    if [[ -z "${MODEL:-}" ]]; then
        MODEL="$("$PYTHON" -c "from tuning.tiny import ensure_tiny; print(ensure_tiny('vl'))" | tail -n 1)"
        echo "$LAUNCHER_NAME: no model given, using the tiny demo model $MODEL" >&2
    fi
    check_model "$MODEL"

    local gpus
    gpus="$(visible_gpus)"
    GPUS_PER_NODE="${GPUS_PER_NODE:-$((gpus > 0 ? gpus : 1))}"
    NNODES="${NNODES:-1}"
    NODE_RANK="${NODE_RANK:-0}"
    MASTER_ADDR="${MASTER_ADDR:-localhost}"
    MASTER_PORT="${MASTER_PORT:-6001}"

    local precision=()
    read -ra precision <<<"$(precision_flags "$MODEL")"

    local args=(
        --model_name_or_path "$MODEL"
        --data_path "$DATA"
        --output_dir "$OUTPUT_DIR"
        "${precision[@]}"
        "${COMMON_ARGS[@]}"
        "${METHOD_ARGS[@]}"
    )
    [[ -z "${EVAL_DATA:-}" ]] || args+=(--eval_data_path "$EVAL_DATA" --eval_strategy steps)
    local cmd=(
        "$PYTHON" -m torch.distributed.run
        --nproc_per_node "$GPUS_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK"
        --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
        finetune.py "${args[@]}" "${extra[@]}"
    )
    echo "+ ${cmd[*]}" >&2
    "${cmd[@]}"
}
