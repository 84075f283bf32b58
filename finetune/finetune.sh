#!/usr/bin/env bash
# General launcher, as in the Qwen2 docs: full by default; add --use_lora True, --q_lora True, --deepspeed CFG.
#
#   bash finetune/finetune.sh -m MODEL -d DATA [--deepspeed ds_config_zero3.json] [--use_lora True] [--q_lora True]
#
# With no model: the tiny offline demo model and data/example.json. See finetune/common.sh.
set -euo pipefail
LAUNCHER_NAME=finetune.sh
LAUNCHER_HELP="Fine-tuning with the flags you give: full by default, --use_lora True for LoRA, --q_lora True for Q-LoRA, --deepspeed CFG for ZeRO."
METHOD_ARGS=(
    --learning_rate 1e-5
)
# shellcheck source=finetune/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
launch "$@"
