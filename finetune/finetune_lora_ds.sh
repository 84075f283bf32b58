#!/usr/bin/env bash
# LoRA fine-tuning with DeepSpeed ZeRO-2 on every local GPU (or one CPU process).
#
#   bash finetune/finetune_lora_ds.sh [-m MODEL] [-d DATA] [-o OUTPUT_DIR] [finetune.py flags...]
#
# With no model: the tiny offline demo model and data/example.json. See finetune/common.sh.
set -euo pipefail
LAUNCHER_NAME=finetune_lora_ds.sh
LAUNCHER_HELP="LoRA fine-tuning with DeepSpeed ZeRO-2 on every local GPU (or one CPU process)."
METHOD_ARGS=(
    --use_lora True
    --learning_rate 2e-4
    --deepspeed ds_config_zero2.json
)
# shellcheck source=finetune/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
launch "$@"
