"""Multimodal web chat for any model the toolkit trains (gradio).

python web_demo_mm.py                                  # the tiny demo model, on http://127.0.0.1:8000
python web_demo_mm.py -c output/merged --server-port 7860
python web_demo_mm.py -c Qwen/Qwen2.5-VL-7B-Instruct --adapter output/finetune_lora_ds
"""

from tuning.demo import main

if __name__ == "__main__":
    main()
