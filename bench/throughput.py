"""Training throughput of four ways to batch chat data, side by side on one model, one data set, one machine.

    python bench/throughput.py                 # ~30M-parameter Qwen2, 512 generated chats, 3 timed steps
    python bench/throughput.py --steps 5 --batch 16
    python bench/throughput.py --smoke         # a tiny model and 2 steps: checks that every mode runs
    python bench/throughput.py --vocab real    # Qwen's 151,936-token vocabulary: ours against TRL, LoRA
    python bench/throughput.py --vocab real --tuning full
    python bench/throughput.py --vocab real --repeats 3  # each mode 3 times: medians, and the spread of the ratios

Modes, each in a fresh process (so peak memory is its own), on the same weights and samples:
  reference  every sample padded to model_max_length, as the Qwen2 finetune.py does (the stock Trainer; kept only here)
  dynamic    the toolkit with --packing False: each batch padded to its longest sample
  packed     the toolkit's default: a batch flattened into one row with per-sample positions (padding-free),
             one sdpa call per sample (tuning/attention.py)
  trl        TRL SFTTrainer with its best packing: best-fit-decreasing packs, padding-free

With --vocab real (the logits are then the memory): ours (the default chunked loss from the hidden states at the
supervised positions, batches of --max_tokens_per_batch), ours with --loss_impl plain, and TRL SFTTrainer at its
best memory setting (padding-free bfd packs of the same tokens per step; its loss is already chunked), peak memory
and real tokens/s with the ratios to TRL, in bench/results/throughput-real-<lora|full>-<device>.md. On a GPU with
liger-kernel installed, also ours and TRL with Liger's kernels (fused linear cross-entropy, SwiGLU, RMSNorm); the
ratios are then to whichever TRL mode peaks lower.

Printed and written to bench/results/throughput-<device>.md and .png: real (non-padding) tokens per second,
the padding fraction, peak memory (RSS on CPU, allocated on GPU), achieved FLOP/s as a fraction of a plain
matmul measured in the same run, and ratios to the reference and to TRL.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if __name__ == "__main__":  # the repository, not bench/: bench/profile.py would shadow the standard library's profile
    sys.path[0] = str(REPO)

MODES = ("reference", "dynamic", "packed", "trl")
REAL_MODES = ("ours", "plain", "trl")  # --vocab real
LIGER_MODES = ("liger", "trl-liger")  # --vocab real on a GPU, with liger-kernel installed: Liger's fused loss
# finetune.py itself, through the recipe's phases (tuning/recipe.py), with the flag each mode names
TOOLKIT_MODES = ("ours", "plain", "liger", "dynamic", "packed")
REAL_NAMES = {
    "ours": "ours (default: chunked loss)",
    "plain": "ours, --loss_impl plain",
    "liger": "ours, --use_liger_kernel True",
    "trl": "TRL SFTTrainer",
    "trl-liger": "TRL SFTTrainer, use_liger_kernel",
}
RESULTS = REPO / "bench" / "results"
MODEL_SIZES = {
    "full": {"hidden_size": 512, "num_layers": 8, "num_heads": 8, "num_kv_heads": 4, "intermediate_size": 1536},
    "smoke": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 128},
    # Qwen2.5-0.5B's shapes (hidden 896, 14 heads, 2 KV heads, intermediate 4864, tied embeddings) and its
    # vocabulary of 151,936, with 2 layers instead of 24 so that it runs on a CPU
    "real": {
        "hidden_size": 896,
        "num_layers": 2,
        "num_heads": 14,
        "num_kv_heads": 2,
        "intermediate_size": 4864,
        "vocab_size": 151936,
    },
}


# -- data ------------------------------------------------------------------------------------------------


def chat_lengths(count: int, seed: int, median: int = 150, low: int = 32, high: int = 1024) -> list[int]:
    """A long-tailed (log-normal) distribution of conversation lengths in tokens, as chat data has."""
    rng = random.Random(seed)
    return [min(high, max(low, round(rng.lognormvariate(math.log(median), 0.9)))) for _ in range(count)]


def write_chats(path: Path, tokenizer, lengths: list[int], seed: int) -> Path:
    """Chats of the given lengths in tokens: a question and an answer (3/4 of it) cut from the corpus."""
    from tuning.tiny import _corpus_text

    corpus = tokenizer(_corpus_text())["input_ids"]
    corpus = corpus * (2 * max(lengths) // len(corpus) + 2)  # a short corpus, repeated: the cost is the same
    rng = random.Random(seed)
    frame = 12  # the ChatML frame of a two-turn chat, in tokens
    records = []
    for i, length in enumerate(lengths):
        body = max(8, length - frame)
        start = rng.randrange(0, len(corpus) - body)
        split = start + body // 4
        records.append(
            {
                "id": f"chat-{i}",
                "messages": [
                    {"role": "user", "content": tokenizer.decode(corpus[start:split]).strip()},
                    {"role": "assistant", "content": tokenizer.decode(corpus[split : start + body]).strip()},
                ],
            }
        )
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


# -- one mode, in its own process ------------------------------------------------------------------------


class FedTokens:
    """Counts what the model is fed, in its forward: real tokens, all positions (padding included) and the
    length of every sample. (Counting in the collator would be off by the batches the loader prefetches.)"""

    def __init__(self, model):
        self.real, self.positions, self.sample_lengths = 0, 0, []
        model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        ids = kwargs["input_ids"]
        self.positions += ids.numel()
        position_ids = kwargs.get("position_ids")
        if position_ids is None:  # padded rows
            lengths = kwargs["attention_mask"].sum(dim=1).tolist()
        else:  # flattened: one row, positions restart at 0 for every sample
            starts = [*(position_ids.view(-1) == 0).nonzero().view(-1).tolist(), ids.shape[-1]]
            lengths = [b - a for a, b in itertools.pairwise(starts)]
        self.real += sum(lengths)
        self.sample_lengths += lengths


class TrainingMemory:
    """The process's resident memory sampled every 5 ms while it trains (on a GPU: its allocated memory): the peak
    above what it held when training began (the libraries and the loaded weights, which every mode holds alike)."""

    def __init__(self):
        import threading

        import psutil
        import torch

        self.process, self.start, self.peak, self.running = psutil.Process(), 0, 0, False
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.cuda = torch.cuda.is_available()

    def begin(self, model):
        import torch

        if self.cuda:
            self.start = torch.cuda.memory_allocated()
            return
        with torch.no_grad():  # the weights are mapped from their file: read them, so that the start holds them
            for parameter in model.parameters():
                parameter.sum()
        self.start = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread.start()

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def end(self) -> int:
        if self.cuda:
            import torch

            return torch.cuda.max_memory_allocated() - self.start
        self.running = False
        self.thread.join()
        return self.peak - self.start


def timed_callback(warmup: int, counter: FedTokens):
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def __init__(self):
            self.start = self.end = None
            self.start_counts = self.end_counts = None

        def on_step_end(self, args, state, control, **kwargs):
            _sync()
            if state.global_step == warmup:
                self.start = time.perf_counter()
                self.start_counts = (counter.real, counter.positions, len(counter.sample_lengths))
            elif state.global_step > warmup:
                self.end = time.perf_counter()
                self.end_counts = (counter.real, counter.positions, len(counter.sample_lengths))

    return Timer()


def allocated_callback(counter: FedTokens):
    """On a CPU, where the peak RSS also holds what the allocator keeps: the peak of the tensors alive during the
    first step (the weights, gradients and optimizer states it touches, its activations, logits and
    temporaries), from the profiler's memory timeline. What the GPU bench reports as allocated."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    class Allocated(TrainerCallback):
        def __init__(self):
            self.profiler, self.peak, self.by_category, self.tokens = None, None, {}, 0

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 0:
                self.tokens = -counter.real
                kinds = {"activities": [ProfilerActivity.CPU], "profile_memory": True, "record_shapes": True}
                self.profiler = profile(**kinds, with_stack=True)
                self.profiler.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1 and self.profiler is not None:
                self.profiler.__exit__(None, None, None)
                self.tokens += counter.real
                with tempfile.TemporaryDirectory() as folder:
                    path = os.path.join(folder, "timeline.json")
                    with warnings.catch_warnings():  # deprecated for CUDA's memory snapshots, the CPU has none
                        warnings.simplefilter("ignore", FutureWarning)
                        self.profiler.export_memory_timeline(path, device="cpu")
                    _, sizes = json.loads(Path(path).read_text())
                at_peak = max(sizes, key=sum)
                self.peak = sum(at_peak)
                # the timeline's columns: an unused one, then the profiler's categories in its plot order
                names = ["parameter", "optimizer state", "input", "temporary", "activation", "gradient"]
                names += ["autograd detail", "unknown"]
                self.by_category = {name: size for name, size in zip(names, at_peak[1:], strict=True) if size}

    return Allocated()


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def common_arguments(settings: dict, out: str, batch: int) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    return {
        "output_dir": out,
        "per_device_train_batch_size": batch,
        "max_steps": settings["warmup"] + settings["steps"],
        "learning_rate": 1e-5,
        "lr_scheduler_type": "constant",
        "save_strategy": "no",
        "report_to": [],
        "logging_steps": 10_000,
        "disable_tqdm": True,
        "seed": settings["seed"],
        "bf16": cuda,
        "use_cpu": not cuda,
        # --vocab real: on, the default of both toolkits (our launchers, TRL's SFTConfig) and their lowest memory
        "gradient_checkpointing": settings.get("checkpointing", False),
        "gradient_checkpointing_kwargs": {"use_reentrant": False},
        "dataloader_num_workers": 0,
    }


def lora(model, settings: dict):
    """The toolkit's LoRA (every linear layer of the language model) on TRL's model, when the bench tunes with LoRA."""
    if settings.get("tuning") != "lora":
        return model
    from tuning.model import LoraOptions, attach_lora

    options = LoraOptions(**LORA)
    return attach_lora(model, options, [], quantized=False, checkpointing=settings.get("checkpointing", False))


LORA = {"r": 16, "alpha": 32, "dropout": 0.0}


def toolkit_argv(mode: str, settings: dict, out: str) -> list[str]:
    """finetune.py's arguments for a toolkit mode: the run a user would start, on the bench's model and chats."""
    import torch

    cuda = torch.cuda.is_available()
    real = settings.get("vocab") == "real"
    argv = ["--model_name_or_path", settings["model"], "--data_path", settings["data"], "--output_dir", out]
    argv += [
        "--model_max_length",
        str(settings["max_length"]),
        "--max_steps",
        str(settings["warmup"] + settings["steps"]),
    ]
    argv += ["--per_device_train_batch_size", "1" if real else str(settings["batch"])]
    argv += ["--learning_rate", "1e-5", "--lr_scheduler_type", "constant", "--save_strategy", "no"]
    argv += [
        "--report_to",
        "none",
        "--logging_steps",
        "10000",
        "--disable_tqdm",
        "True",
        "--seed",
        str(settings["seed"]),
    ]
    argv += ["--bf16", str(cuda), "--dataloader_num_workers", "0"]
    # --vocab real: on, the default of both toolkits (our launchers, TRL's SFTConfig) and their lowest memory
    argv += ["--gradient_checkpointing", str(settings.get("checkpointing", False))]
    if settings.get("tuning") == "lora":
        argv += ["--use_lora", "True", "--lora_r", str(LORA["r"]), "--lora_alpha", str(LORA["alpha"])]
        argv += ["--lora_dropout", str(LORA["dropout"])]
    if real:
        argv += ["--max_tokens_per_batch", str(settings["tokens_per_step"])]
    argv += {
        "dynamic": ["--packing", "False"],
        "plain": ["--loss_impl", "plain"],
        "liger": ["--use_liger_kernel", "True"],
    }.get(mode, [])
    return argv


def toolkit_trainer(mode: str, settings: dict, out: str):
    """(trainer, its model) through the recipe's phases, exactly as finetune.py composes them."""
    from finetune import parse_arguments
    from tuning import recipe
    from tuning.callbacks import LossPlotCallback

    args = parse_arguments(toolkit_argv(mode, settings, out))
    recipe.start(args)
    data = recipe.read_data(args)
    processing = recipe.prepare_processing(args, data)
    datasets = recipe.build_datasets(args, data, processing)
    model = recipe.build_model(args, processing)
    trainer = recipe.build_trainer(args, processing, datasets, model, None)
    trainer.remove_callback(LossPlotCallback)  # matplotlib, imported at the end to draw it, would count in the peak
    return trainer, model


def stock_trainer(mode: str, settings: dict, out: str):
    """(trainer, its model) for the comparisons: TRL's SFTTrainer, and the Qwen2 script's padding to the maximum."""
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from tuning.data.collate import PaddingCollator
    from tuning.data.dataset import build_dataset
    from tuning.data.encode import Encoder
    from tuning.data.processing import load_processing
    from tuning.model import set_use_cache

    tokenizer, _, family = load_processing(settings["model"])
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(settings["model"], dtype=dtype, attn_implementation="sdpa")
    set_use_cache(model, False)
    if torch.cuda.is_available():
        model.to("cuda")
    batch = settings["batch"]
    if mode == "reference":  # the Qwen2 reference behaviour (kept only here): every sample padded to model_max_length
        encoder = Encoder(tokenizer, None, family=family, max_length=settings["max_length"])
        dataset, _ = build_dataset([settings["data"]], encoder, show_progress=False)
        return Trainer(
            model=model,
            args=TrainingArguments(**common_arguments(settings, out, batch), remove_unused_columns=False),
            train_dataset=dataset,
            data_collator=PaddingCollator(tokenizer.pad_token_id, pad_to_multiple_of=settings["max_length"]),
        ), model
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    real = settings.get("vocab") == "real"
    records = [json.loads(line) for line in Path(settings["data"]).read_text().splitlines()]
    pairs = [{"prompt": r["messages"][:1], "completion": r["messages"][1:]} for r in records]
    pack = settings["tokens_per_step"] if real else settings["max_length"]
    # packs of up to `pack` tokens: as many packs per step as give the other modes' tokens per step
    batch = 1 if real else max(1, round(batch * settings["mean_length"] / settings["max_length"]))
    config = SFTConfig(
        **common_arguments(settings, out, batch),
        max_length=pack,
        packing=True,
        packing_strategy="bfd",
        padding_free=True,
        dataset_num_proc=1,
        use_liger_kernel=mode == "trl-liger",
    )
    model = lora(model, settings)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(pairs), processing_class=tokenizer)
    return trainer, model


def run_mode(mode: str, settings: dict) -> dict:
    import torch

    from tuning import recipe
    from tuning.runtime import map_large_blocks_apart, peak_resident_bytes

    out = tempfile.mkdtemp(prefix=f"bench-{mode}-")
    toolkit = mode in TOOLKIT_MODES
    trainer, model = toolkit_trainer(mode, settings, out) if toolkit else stock_trainer(mode, settings, out)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    if mode.startswith("trl") and settings.get("vocab") == "real" and not torch.cuda.is_available():
        map_large_blocks_apart()  # TRL's best memory: the host allocator's setting our trainer makes on a CPU

    def train():
        if toolkit:  # the recipe's run phase, as finetune.py: the host allocator's setting, train mode, Trainer.train
            recipe.run(trainer, None, [])
        else:
            trainer.train()

    counter = FedTokens(model)
    if settings.get("profile"):  # a process of its own: the profiler's records would count in the peak RSS
        allocated = allocated_callback(counter)
        trainer.add_callback(allocated)
        train()
        return {
            "tensor_peak_bytes": allocated.peak,
            "tensor_peak_by_category": allocated.by_category,
            "profiled_tokens": allocated.tokens,
        }
    timer = timed_callback(settings["warmup"], counter)
    trainer.add_callback(timer)
    memory = TrainingMemory()
    memory.begin(model)
    train()
    training_memory = memory.end()

    seconds = timer.end - timer.start
    real = timer.end_counts[0] - timer.start_counts[0]
    positions = timer.end_counts[1] - timer.start_counts[1]
    lengths = counter.sample_lengths[timer.start_counts[2] : timer.end_counts[2]]
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = peak_resident_bytes()
    return {
        "mode": mode,
        "seconds": seconds,
        "real_tokens": real,
        "positions": positions,
        "samples": len(lengths),
        "useful_flops": useful_flops(model.config, lengths),
        "peak_memory_bytes": peak,
        "training_memory_bytes": training_memory,
        "tensor_peak_bytes": peak,  # on a CPU, replaced by the profiled run's
        "batch": trainer.args.per_device_train_batch_size,
    }


def useful_flops(config, lengths: list[int]) -> float:
    """Training FLOPs on the real tokens (PaLM's estimate): 6 N per token for the weights, plus causal
    attention, 6 L d s per token of a sequence of length s. Padding and attention across packed samples are
    not useful work and are not counted."""
    d, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    kv = d * config.num_key_value_heads // config.num_attention_heads
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * config.intermediate_size
    weights = layers * per_layer + d * vocab  # the output projection; the input embedding is a lookup
    return sum(6 * weights * n + 6 * layers * d * n * n for n in lengths)


def matmul_flops_per_second(size: int = 2048, seconds: float = 2.0) -> float:
    """What this machine does on a plain square matmul in the training dtype: the roofline the modes get
    compared with."""
    import torch

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    _sync()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
        _sync()
    return 2 * size**3 * count / (time.perf_counter() - start)


# -- the comparison --------------------------------------------------------------------------------------


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def rate(result: dict) -> float:
    """Real (not padding) tokens per second of one measured mode."""
    return result["real_tokens"] / result["seconds"]


MEASURES = ("seconds", "peak_memory_bytes", "training_memory_bytes", "tensor_peak_bytes")


def summarize(runs: list[dict]) -> dict:
    """One mode's runs (the same samples, each in a fresh process): the first run's record with every measure
    replaced by its median over the runs, and the runs themselves, for the spread."""
    return {**runs[0], **{key: statistics.median(r[key] for r in runs) for key in MEASURES}, "runs": runs}


def runs_of(result: dict) -> list[dict]:
    return result.get("runs", [result])


def median_and_range(values: list[float], number: str, unit: str) -> str:
    """The median with its unit, and with more than one value the lowest and highest: "0.50x (0.49-0.51)"."""
    values = sorted(values)
    text = f"{statistics.median(values):{number}}{unit}"
    return text if len(values) == 1 else f"{text} ({values[0]:{number}}-{values[-1]:{number}})"


def ratio_cell(result: dict, reference: dict, measure) -> str:
    """measure(result) / measure(reference), as "0.50x"; over repeated runs the median of the ratios of the
    runs made side by side (run i of each mode in round i), and their range."""
    if result is reference:
        return "1.00x"
    pairs = zip(runs_of(result), runs_of(reference), strict=True)
    return median_and_range([measure(run) / measure(ref) for run, ref in pairs], ".2f", "x")


def range_cell(result: dict, measure, unit: str = "") -> str:
    """measure(result), the median over repeated runs, with the range of the runs."""
    return median_and_range([measure(run) for run in runs_of(result)], ",.0f", unit)


def mebibytes(key: str):
    return lambda result: result[key] / 2**20


def real_modes(cuda: bool) -> tuple[str, ...]:
    """The --vocab real modes: Liger's too on a GPU where liger-kernel is installed (its kernels need one)."""
    import importlib.util

    liger = cuda and importlib.util.find_spec("liger_kernel") is not None
    return REAL_MODES + (LIGER_MODES if liger else ())


def real_table(results: dict, settings: dict) -> str:
    """--vocab real: the toolkit (chunked loss, the stock loss, Liger's) against TRL at its best memory setting."""
    best_trl = min((m for m in results if m.startswith("trl")), key=lambda m: results[m]["peak_memory_bytes"])
    trl = results[best_trl]

    lines = [
        f"Model: Qwen2.5-0.5B shapes with 2 layers ({settings['parameters'] / 1e6:.0f}M parameters, random weights), "
        f"vocabulary 151,936, {settings['tuning']}, {'bf16' if settings['cuda'] else 'fp32'}; data: "
        f"{settings['samples']} generated chats, {settings['length_summary']}; gradient checkpointing "
        f"{'on' if settings['checkpointing'] else 'off'}; {settings['tokens_per_step']} tokens "
        f"per step (ours: --max_tokens_per_batch; TRL: one padding-free bfd pack); {settings['steps']} timed steps "
        f"after {settings['warmup']} warm-up. Device: {settings['device']}. "
        + repeats_caption(settings)
        + (
            "Peak memory: the GPU memory allocated at the peak, weights included; memory taken by training: that "
            "peak above the allocated memory when training began"
            if settings["cuda"]
            else "Peak memory: the process's peak RSS, libraries and weights included; memory taken by training: "
            "the peak RSS while training above the RSS when it began, with the libraries loaded and the weights read"
        )
        + f"; ratios to {REAL_NAMES[best_trl]}, TRL's lower peak"
        + ("" if settings["cuda"] else "; Liger's kernels run only on a GPU: not measured here")
        + (
            "."
            if settings["cuda"]
            else "; peak tensor memory: the peak of the tensors alive in the first step (weights, gradients, "
            "optimizer states, activations, logits; not what the allocator keeps, as a GPU's allocated memory), "
            f"profiled in a process of its own ({results['ours']['profiled_tokens']:,} tokens in ours, "
            f"{trl['profiled_tokens']:,} in TRL's)."
        ),
        "",
        "| mode | real tokens/s | peak memory | memory taken by training | peak tensor memory | tokens/s vs TRL "
        "| peak vs TRL | training memory vs TRL | tensor memory vs TRL |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    peak, training = mebibytes("peak_memory_bytes"), mebibytes("training_memory_bytes")
    for mode in results:
        r = results[mode]
        tensors = r["tensor_peak_bytes"]  # on a CPU, profiled once
        lines.append(
            f"| {REAL_NAMES[mode]} | {range_cell(r, rate)} | {range_cell(r, peak, ' MiB')} "
            f"| {range_cell(r, training, ' MiB')} | {tensors / 2**20:,.0f} MiB | {ratio_cell(r, trl, rate)} "
            f"| {ratio_cell(r, trl, peak)} | {ratio_cell(r, trl, training)} "
            f"| {tensors / trl['tensor_peak_bytes']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def repeats_caption(settings: dict) -> str:
    repeats = settings.get("repeats", 1)
    if repeats == 1:
        return ""
    return (
        f"Each mode run {repeats} times, each time in a fresh process, the modes in turn: medians, with the "
        "range of the runs in parentheses; a ratio is the median of the ratios of the runs made side by side. "
    )


def table(results: dict, matmul: float, settings: dict) -> str:
    ref, trl = results["reference"], results["trl"]

    lines = [
        f"Model: Qwen2 {settings['parameters'] / 1e6:.1f}M parameters (random weights), "
        "sdpa (packed: a call per sample), "
        f"{'bf16' if settings['cuda'] else 'fp32'}; data: {settings['samples']} generated chats, "
        f"{settings['length_summary']}; model_max_length {settings['max_length']}; "
        f"{settings['batch']} samples per step (TRL: {trl['batch']} packs of up to {settings['max_length']}); "
        f"{settings['steps']} timed steps after {settings['warmup']} warm-up. Device: {settings['device']}. "
        + repeats_caption(settings)
        + f"Plain matmul: {matmul / 1e9:.1f} GFLOP/s.",
        "",
        "| mode | real tokens/s | padding | peak memory | FLOP/s vs matmul | vs reference | vs TRL |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for mode in MODES:
        r = results[mode]
        padding = 1 - r["real_tokens"] / r["positions"]
        memory = r["peak_memory_bytes"] / 2**20
        achieved = r["useful_flops"] / r["seconds"] / matmul
        lines.append(
            f"| {mode} | {rate(r):,.0f} | {padding:.0%} | {memory:,.0f} MiB | {achieved:.1%} "
            f"| {rate(r) / rate(ref):.2f}x | {rate(r) / rate(trl):.2f}x |"
        )
    return "\n".join(lines) + "\n"


def chart(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [results[m]["real_tokens"] / results[m]["seconds"] for m in MODES]
    fig, ax = plt.subplots(figsize=(6.5, 3.6), dpi=110)
    bars = ax.bar(MODES, rates, color=["#999999", "#6baed6", "#2171b5", "#fd8d3c"])
    for bar, value in zip(bars, rates, strict=True):
        ax.annotate(f"{value / rates[0]:.1f}x", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom")
    ax.set_ylabel("real tokens / s")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def prepare(args) -> dict:
    import torch
    from transformers import AutoConfig

    from tuning.data.processing import load_processing
    from tuning.tiny import ensure_tiny

    size = "smoke" if args.smoke else "real" if args.vocab == "real" else "full"
    model = ensure_tiny(
        "text", out=REPO / "models" / f"bench-qwen2-{size}", initializer_range=0.02, **MODEL_SIZES[size]
    )
    tokenizer, _, family = load_processing(str(model))
    median = 200 if args.vocab == "real" else 150
    lengths = chat_lengths(args.samples, args.seed, median=median, high=args.max_length - 16)  # room to re-tokenize
    data = write_chats(Path(tempfile.mkdtemp(prefix="bench-data-")) / "chats.jsonl", tokenizer, lengths, args.seed)
    from tuning.data.dataset import build_dataset
    from tuning.data.encode import Encoder

    _, report = build_dataset(
        [str(data)], Encoder(tokenizer, family=family, max_length=args.max_length), show_progress=False
    )
    stats = report.percentiles()
    config = AutoConfig.from_pretrained(model)
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        parameters = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    return {
        "model": str(model),
        "data": str(data),
        "batch": args.batch,
        "steps": args.steps,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "seed": args.seed,
        "max_length": args.max_length,
        "samples": report.usable,
        "mean_length": report.tokens / report.usable,
        "length_summary": f"{stats['min']}-{stats['max']} tokens, median {stats['p50']}, p90 {stats['p90']}",
        "parameters": parameters,
        "cuda": torch.cuda.is_available(),
        "device": device_name(),
        "vocab": args.vocab,
        "tuning": args.tuning,
        "tokens_per_step": args.tokens_per_step,
        "checkpointing": args.vocab == "real" and args.gradient_checkpointing == "true",
    }


def add_child_arguments(parser: argparse.ArgumentParser, modes) -> None:
    """The hidden flags by which a bench runs one of its modes in a process of its own (run_in_child)."""
    parser.add_argument("--child", choices=modes, help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)


def answered_as_child(args, run_mode) -> bool:
    """In a child process: run its mode and write the result where the parent reads it."""
    if not args.child:
        return False
    Path(args.result).write_text(json.dumps(run_mode(args.child, json.loads(args.settings))))
    return True


def runs_in_turn(modes, repeats: int, settings: dict, script: str = __file__) -> dict[str, list[dict]]:
    """Every mode `repeats` times, each run a fresh process; in turn, so that a slow spell hits every mode."""
    runs = {mode: [] for mode in modes}
    for _, mode in itertools.product(range(repeats), modes):
        runs[mode].append(run_in_child(mode, settings, script))
        print(f"{mode}: {rate(runs[mode][-1]):,.0f} real tokens/s", file=sys.stderr)
    return runs


def run_in_child(mode: str, settings: dict, script: str = __file__) -> dict:
    """One mode in a fresh process of `script` (this bench, or another built on its helpers): its own peak memory."""
    with tempfile.NamedTemporaryFile("r", suffix=".json") as result:
        command = [sys.executable, script, "--child", mode, "--settings", json.dumps(settings), "--result", result.name]
        env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        subprocess.run(command, check=True, env=env, cwd=REPO)
        return json.loads(Path(result.name).read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="samples per optimizer step")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per mode")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--samples", type=int, default=512, help="generated chats")
    parser.add_argument("--max_length", type=int, default=1024, help="model_max_length")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each mode, in turn: medians and ranges")
    parser.add_argument("--smoke", action="store_true", help="a tiny model and 2 short steps: does every mode run?")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the table and chart go")
    parser.add_argument(
        "--vocab",
        choices=["small", "real"],
        default="small",
        help="real: Qwen2.5-0.5B shapes (2 layers) on the 151,936-token vocabulary, ours against TRL",
    )
    parser.add_argument("--tuning", choices=["lora", "full"], default="lora", help="with --vocab real")
    parser.add_argument("--tokens_per_step", type=int, default=2048, help="with --vocab real")
    parser.add_argument(
        "--gradient_checkpointing",
        choices=["true", "false"],
        default="true",
        help="with --vocab real: on is the default of both toolkits (and TRL's lowest-memory setting)",
    )
    add_child_arguments(parser, sorted({*MODES, *REAL_MODES, *LIGER_MODES}))
    args = parser.parse_args(argv)

    if answered_as_child(args, run_mode):
        return 0
    if args.smoke:
        args.batch, args.steps, args.samples, args.max_length = 4, 1, 32, 256
        args.tokens_per_step = min(args.tokens_per_step, 512)
    elif args.vocab == "real" and args.max_length == 1024:
        args.max_length = 4096  # a long tail: some chats over 2,000 tokens
    settings = prepare(args)
    matmul = matmul_flops_per_second()
    modes = real_modes(settings["cuda"]) if args.vocab == "real" else MODES
    runs = runs_in_turn(modes, args.repeats, settings)
    results = {mode: summarize(runs[mode]) for mode in modes}
    if args.vocab == "real" and not settings["cuda"]:  # the tensor memory of one step, profiled apart
        for mode in modes:
            results[mode].update(run_in_child(mode, {**settings, "profile": True, "warmup": 1, "steps": 0}))
    text = real_table(results, settings) if args.vocab == "real" else table(results, matmul, settings)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    device = "gpu" if settings["cuda"] else "cpu"
    kind = (
        f"real-{args.tuning}-{'' if settings['checkpointing'] else 'no-checkpointing-'}" if args.vocab == "real" else ""
    )
    stem = f"throughput-{kind}{'smoke' if args.smoke else device}"
    command = "python bench/throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (args.out / f"{stem}.md").write_text(f"# Training throughput\n\n`{command.strip()}`\n\n{text}")
    if args.vocab != "real":
        chart(results, args.out / f"{stem}.png", f"real tokens/s, {settings['device']}")
    (args.out / f"{stem}.json").write_text(
        json.dumps({"settings": settings, "matmul": matmul, "results": results}, indent=1)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
