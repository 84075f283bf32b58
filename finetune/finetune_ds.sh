#!/usr/bin/env bash
# Full-parameter fine-tuning with DeepSpeed ZeRO-3; the vision tower stays frozen (--fix_vit).
#
#   bash finetune/finetune_ds.sh [-m MODEL] [-d DATA] [-o OUTPUT_DIR] [finetune.py flags...]
#
# With no model: the tiny offline demo model and data/example.json. See finetune/common.sh.
set -euo pipefail
LAUNCHER_NAME=finetune_ds.sh
LAUNCHER_HELP="Full-parameter fine-tuning with DeepSpeed ZeRO-3; the vision tower stays frozen (--fix_vit)."
METHOD_ARGS=(
    --learning_rate 1e-5
    --fix_vit True
    --deepspeed ds_config_zero3.json
)
# shellcheck source=finetune/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
launch "$@"
