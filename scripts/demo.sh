#!/usr/bin/env bash
# The main job on the embedded tiny models, set-up included: teach the tiny Qwen2 who it is and the
# tiny Qwen2.5-VL to read colours and places from pictures, through the LoRA DeepSpeed launcher, merge,
# and print what the models answer before and after (scripts/main_job.py tells the steps).
#
#   bash scripts/demo.sh            # outputs in output/demo (DEMO_OUTPUT to change)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/main_job.py
