"""Merge a LoRA / Q-LoRA adapter into its base model: one folder that loads anywhere, no PEFT needed.

python merge_lora.py --adapter output/finetune_lora_ds --output output/merged [--base MODEL] [--dtype bf16]
"""

import sys

from tuning.merge import main

if __name__ == "__main__":
    sys.exit(main())
