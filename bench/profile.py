"""The Qwen-VL profile table redone: peak memory and seconds per optimizer step for LoRA, LoRA with new-token rows
trained, and Q-LoRA, at 384, 512, 1024 and 2048 tokens per sample; batch 1, gradient accumulation 8, one image
per sample. Every run is finetune.py itself, in a fresh process, on generated data.

    python bench/profile.py                  # this machine, a small Qwen2.5-VL config (CPU or GPU)
    python bench/profile.py --size 3b        # the Qwen2.5-VL-3B shape with random weights (a GPU: ~8 GB on disk)
    python bench/profile.py --size 7b        # the Qwen2.5-VL-7B shape
    python bench/profile.py --smoke          # 384 tokens only, 1 step: does every method run?

Random weights cost the same time and memory as trained ones, so nothing is downloaded. The tokenizer and
processor are the tiny model's (a 2k vocabulary); the 3b/7b embedding matrices keep Qwen's real row counts.
Writes bench/results/profile-<size>-<device>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if __name__ == "__main__":  # the repository, not bench/: bench/profile.py would shadow the standard library's profile
    sys.path[0] = str(REPO)

LENGTHS = (384, 512, 1024, 2048)
METHODS = {
    "LoRA": ["--use_lora", "True"],
    "LoRA + new-token rows": ["--use_lora", "True", "--grounding_format", "qwen-vl"],
    "Q-LoRA": ["--use_lora", "True", "--q_lora", "True"],
}
SMALL = {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 768}
# The published Qwen2.5-VL shapes (config.json of Qwen/Qwen2.5-VL-3B-Instruct and -7B-Instruct).
REAL_SHAPES = {
    "3b": {
        "text": {
            "hidden_size": 2048,
            "num_hidden_layers": 36,
            "num_attention_heads": 16,
            "num_key_value_heads": 2,
            "intermediate_size": 11008,
            "vocab_size": 151936,
        },
        "tie_word_embeddings": True,
    },
    "7b": {
        "text": {
            "hidden_size": 3584,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "intermediate_size": 18944,
            "vocab_size": 152064,
        },
        "tie_word_embeddings": False,
    },
}
REAL_VISION = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
}


def real_shape_config(size: str, tiny_config):
    """The tiny VL model's config (its token ids) with the text and vision shapes of the real model."""
    shape = REAL_SHAPES[size]
    config = tiny_config.__class__.from_dict(tiny_config.to_dict())
    for key, value in shape["text"].items():
        setattr(config.text_config, key, value)
    config.text_config.layer_types = ["full_attention"] * shape["text"]["num_hidden_layers"]
    head_dim = shape["text"]["hidden_size"] // shape["text"]["num_attention_heads"]
    config.text_config.rope_parameters = {**config.text_config.rope_parameters, "mrope_section": [16, 24, 24]}
    assert head_dim == 128  # the mrope sections above are Qwen's, for 128-wide heads
    for key, value in REAL_VISION.items():
        setattr(config.vision_config, key, value)
    config.vision_config.out_hidden_size = shape["text"]["hidden_size"]
    config.tie_word_embeddings = shape["tie_word_embeddings"]
    return config


def build_model(size: str) -> Path:
    from tuning.tiny import ensure_tiny

    if size == "small":
        return ensure_tiny("vl", out=REPO / "models" / "bench-qwen2.5-vl-small", initializer_range=0.02, **SMALL)
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    tiny = ensure_tiny("vl")
    folder = REPO / "models" / f"bench-qwen2.5-vl-{size}"
    if (folder / "config.json").is_file():
        return folder
    config = real_shape_config(size, AutoConfig.from_pretrained(tiny))
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    for name in os.listdir(tiny):
        if not name.startswith(("model", "config", "generation")):
            shutil.copy(tiny / name, folder / name)
    return folder


def write_samples(folder: Path, tokenizer, length: int, count: int = 16) -> Path:
    """Samples of `length` tokens: one picture, a question, and a grounded answer padded out with text."""
    from PIL import Image

    from tuning.tiny import _corpus_text

    corpus = tokenizer(_corpus_text())["input_ids"]
    corpus = corpus * (2 * length // len(corpus) + 2)
    rng = random.Random(length)
    Image.new("RGB", (224, 224), "teal").save(folder / "picture.png")
    image_and_frame = 64 + 40  # 64 merged patches at most for the tiny processor's picture size, plus the chat
    samples = []
    for i in range(count):
        start = rng.randrange(0, len(corpus) - length)
        filler = tokenizer.decode(corpus[start : start + max(8, length - image_and_frame)]).strip()
        answer = f"<ref>the square</ref><box>(100,200),(300,400)</box> {filler}"
        question = "Picture 1: <img>picture.png</img>\nWhere is the square?"
        samples.append(
            {
                "id": f"s{i}",
                "conversations": [{"from": "user", "value": question}, {"from": "assistant", "value": answer}],
            }
        )
    path = folder / f"samples-{length}.json"
    path.write_text(json.dumps(samples))
    return path


def run_child(settings: dict) -> dict:
    import torch
    from transformers import TrainerCallback

    from finetune import train
    from tuning.runtime import peak_resident_bytes

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if state.global_step == 1:
                self.start = time.perf_counter()
            self.end = time.perf_counter()

    cuda = torch.cuda.is_available()
    timer = Timer()
    argv = [
        "--model_name_or_path",
        settings["model"],
        "--data_path",
        settings["data"],
        "--output_dir",
        tempfile.mkdtemp(prefix="profile-"),
        "--per_device_train_batch_size",
        "1",
        "--gradient_accumulation_steps",
        "8",
        "--max_steps",
        str(1 + settings["steps"]),
        "--model_max_length",
        str(settings["length"] + 64),
        "--save_strategy",
        "no",
        "--disable_tqdm",
        "True",
        "--gradient_checkpointing",
        "True",
        "--lora_r",
        "64",
        "--bf16",
        str(cuda),
        *settings["flags"],
    ]
    train(argv, callbacks=(timer,))
    peak = torch.cuda.max_memory_allocated() if cuda else peak_resident_bytes()
    return {"seconds_per_step": (timer.end - timer.start) / settings["steps"], "peak_memory_bytes": peak}


def measure(method: str, length: int, model: Path, data: Path, steps: int) -> dict | str:
    with tempfile.NamedTemporaryFile("r", suffix=".json") as result:
        settings = {"model": str(model), "data": str(data), "length": length, "steps": steps, "flags": METHODS[method]}
        command = [sys.executable, __file__, "--child", json.dumps(settings), "--result", result.name]
        env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        run = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
        if run.returncode != 0:
            last = [line for line in run.stderr.splitlines() if line.strip()][-1:]
            return f"failed: {last[0][:80] if last else run.returncode}"
        return json.loads(Path(result.name).read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["small", *REAL_SHAPES], default="small")
    parser.add_argument("--steps", type=int, default=1, help="timed optimizer steps (after one untimed)")
    parser.add_argument("--smoke", action="store_true", help="384 tokens only: does every method run?")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        Path(args.result).write_text(json.dumps(run_child(json.loads(args.child))))
        return 0

    import torch

    from tuning.data.processing import load_processing

    model = build_model(args.size)
    tokenizer, _, _ = load_processing(str(model))
    lengths = LENGTHS[:1] if args.smoke else LENGTHS
    work = Path(tempfile.mkdtemp(prefix="profile-data-"))
    data = {n: write_samples(work, tokenizer, n) for n in lengths}
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    header = "| method | " + " | ".join(f"{n} tokens" for n in lengths) + " |"
    lines = [
        f"Qwen2.5-VL ({args.size}, random weights), batch 1, gradient accumulation 8, one picture per sample, "
        f"gradient checkpointing, LoRA r 64, {'bf16' if torch.cuda.is_available() else 'fp32'}; "
        f"peak memory / seconds per optimizer step. Device: {device}.",
        "",
        header,
        "| --- |" + " ---: |" * len(lengths),
    ]
    for method in METHODS:
        cells = []
        for n in lengths:
            r = measure(method, n, model, data[n], args.steps)
            cell = (
                r if isinstance(r, str) else f"{r['peak_memory_bytes'] / 2**30:.2f} GiB / {r['seconds_per_step']:.1f} s"
            )
            print(f"{method}, {n} tokens: {cell}", file=sys.stderr)
            cells.append(cell)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"profile-{args.size}-{'smoke' if args.smoke else ('gpu' if torch.cuda.is_available() else 'cpu')}"
    command = "python bench/profile.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (args.out / f"{stem}.md").write_text(f"# Profile\n\n`{command.strip()}`\n\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
