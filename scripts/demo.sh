#!/usr/bin/env bash
# The main job on the embedded tiny model: set up, LoRA fine-tune the tiny Qwen2.5-VL on data/
# with DeepSpeed ZeRO-2, merge the adapter, and ask the merged model about a picture.
#
#   bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
PY=.venv/bin/python

step() { printf '\n== %s\n+ %s\n' "$1" "${*:2}" >&2; "${@:2}"; }

step "LoRA fine-tuning (DeepSpeed ZeRO-2)" bash finetune/finetune_lora_ds.sh -o output/demo-lora --overwrite_output_dir True
step "merging the adapter" "$PY" merge_lora.py --adapter output/demo-lora --output output/demo-merged --overwrite
step "asking the merged model" "$PY" -m tuning.chat output/demo-merged --image data/images/dog.png \
    --prompt "图中的狗是什么品种？" --max_new_tokens 16
printf '\nDone: adapter in output/demo-lora (loss curve output/demo-lora/loss.png), merged model in output/demo-merged.\n' >&2
