"""qwen-tuning: fine-tune Qwen-family and other Hugging Face chat and vision-language models."""

from tuning.runtime import quiet_libraries

quiet_libraries()
