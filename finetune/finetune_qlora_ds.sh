#!/usr/bin/env bash
# Q-LoRA (4-bit nf4 base, or a GPTQ int4 checkpoint) with DeepSpeed ZeRO-2.
#
#   bash finetune/finetune_qlora_ds.sh [-m MODEL] [-d DATA] [-o OUTPUT_DIR] [finetune.py flags...]
#
# With no model: the tiny offline demo model and data/example.json. See finetune/common.sh.
set -euo pipefail
LAUNCHER_NAME=finetune_qlora_ds.sh
LAUNCHER_HELP="Q-LoRA (4-bit nf4 base, or a GPTQ int4 checkpoint) with DeepSpeed ZeRO-2."
METHOD_ARGS=(
    --use_lora True
    --q_lora True
    --learning_rate 2e-4
    --deepspeed ds_config_zero2.json
)
# shellcheck source=finetune/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
launch "$@"
