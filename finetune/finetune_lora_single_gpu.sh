#!/usr/bin/env bash
# LoRA fine-tuning in one process, no DeepSpeed.
#
#   bash finetune/finetune_lora_single_gpu.sh [-m MODEL] [-d DATA] [-o OUTPUT_DIR] [finetune.py flags...]
#
# With no model: the tiny offline demo model and data/example.json. See finetune/common.sh.
set -euo pipefail
LAUNCHER_NAME=finetune_lora_single_gpu.sh
GPUS_PER_NODE=1
LAUNCHER_HELP="LoRA fine-tuning in one process, no DeepSpeed."
METHOD_ARGS=(
    --use_lora True
    --learning_rate 2e-4
)
# shellcheck source=finetune/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
launch "$@"
