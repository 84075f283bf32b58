"""DPO training throughput and peak memory: ours against TRL 1.16's DPOTrainer, side by side in one run.

    python bench/preference.py                 # the real-vocabulary bench model, generated pairs, 3 timed steps
    python bench/preference.py --repeats 3     # each mode 3 times: medians, and the spread of the ratios
    python bench/preference.py --pairs_per_step 8 --steps 5
    python bench/preference.py --smoke         # the tiny model, a few pairs, 2 steps: checks that every mode runs

Modes, each in a fresh process (so peak memory is its own), on the same weights and the same pairs, DPO (sigmoid,
beta 0.1) with LoRA r=16 on every linear layer, the reference the model with its adapter switched off, gradient
checkpointing on, fp32 on a CPU and bf16 on a GPU:
  ours    finetune.py --stage dpo, its default: both answers of every pair of a step packed into one padding-free
          row, one forward; the log-probabilities from the hidden states at the answer tokens through the chunked
          head (tuning/preference.py), never the full logits
  padded  the same with --packing False: each step's sequences padded to its longest
  trl     TRL DPOTrainer (precompute_ref_log_probs off, the reference through peft_config's adapter switched off,
          max_length that cuts nothing); TRL 1.16 disables padding_free for DPO, so it pads

Every mode trains the same pairs in every step: the same number of pairs per optimizer step
(--pairs_per_step: our --per_device_train_batch_size and TRL's), taken in the file's order (both trainers'
train_sampling_strategy sequential). --max_tokens_per_batch is not used: TRL's DPOTrainer has no token budget, and a
budget would give ours other pairs, and another number of them, in a step.

Printed and written to bench/results/preference-<cpu|gpu>.md (and .json): per mode the real tokens/s (the
non-padding tokens of the prompts and both answers the policy's forward reads; the reference's forward reads them
again and counts in the time only), peak memory (RSS on a CPU, allocated on a GPU), the memory taken by training,
the ratios ours/TRL and ours/padded, and whether ours meets the goal of at least 1.3x TRL's real tokens/s at most
0.8x its peak memory (said, not asserted).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import random
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if __name__ == "__main__":  # the repository, not bench/: bench/profile.py would shadow the standard library's profile
    sys.path[0] = str(REPO)


def bench_module(name: str):
    """A script of bench/ as a module (bench/ is no package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).resolve().parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


throughput = bench_module("throughput")  # its model, memory, timing and table helpers

MODES = ("ours", "padded", "trl")
NAMES = {
    "ours": "ours (default: packed, chunked log-probs)",
    "padded": "ours, --packing False",
    "trl": "TRL DPOTrainer",
}
RESULTS = REPO / "bench" / "results"
LORA = throughput.LORA  # r 16, alpha 32, dropout 0: every linear layer of the language model
BETA = 0.1
GOAL_RATE, GOAL_MEMORY = 1.3, 0.8  # the issue's: ours >= 1.3x TRL's real tokens/s at <= 0.8x its peak memory


# -- data ------------------------------------------------------------------------------------------------


def lognormal_length(rng: random.Random, median: int, low: int, high: int, sigma: float = 0.9) -> int:
    """A length in tokens from a long-tailed (log-normal) distribution, as chat data has."""
    return min(high, max(low, round(rng.lognormvariate(math.log(median), sigma))))


def pair_lengths(count: int, seed: int, prompt_median: int, answer_median: int, high: int) -> list[tuple[int, ...]]:
    """(prompt, chosen, rejected) lengths in tokens of each pair, each long-tailed, chosen and rejected drawn apart
    (never the same length); pair by pair, so that the first pairs are the same however many are drawn."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        prompt = lognormal_length(rng, prompt_median, 8, high // 2)
        chosen, rejected = (lognormal_length(rng, answer_median, 4, high // 2) for _ in range(2))
        pairs.append((prompt, chosen, rejected + 1 if rejected == chosen else rejected))
    return pairs


def write_pairs(path: Path, tokenizer, lengths: list[tuple[int, ...]], seed: int) -> dict:
    """Preference pairs in TRL's conversational format, a prompt and two answers of the given lengths in tokens cut
    from the tiny corpus; the lengths of their texts in tokens, as re-tokenized (the answers' stay different)."""
    from tuning.tiny import _corpus_text

    corpus = tokenizer(_corpus_text())["input_ids"]
    longest = max(max(pair) for pair in lengths) + 8
    corpus = corpus * (2 * longest // len(corpus) + 2)  # a short corpus, repeated: the cost is the same
    rng = random.Random(seed)

    def text(length: int) -> str:
        start = rng.randrange(0, len(corpus) - length)
        return tokenizer.decode(corpus[start : start + length]).strip()

    def size(content: str) -> int:
        return len(tokenizer(content)["input_ids"])

    records, measured = [], {"prompt": [], "chosen": [], "rejected": []}
    for prompt_length, chosen_length, rejected_length in lengths:
        prompt, chosen, rejected = text(prompt_length), text(chosen_length), text(rejected_length)
        while size(rejected) == size(chosen):  # re-tokenized to the same length: one more token
            rejected_length += 1
            rejected = text(rejected_length)
        records.append(
            {
                "prompt": [{"role": "user", "content": prompt}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        )
        for key, content in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
            measured[key].append(size(content))
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return measured


def describe_lengths(values: list[int]) -> str:
    values = sorted(values)
    p90 = values[min(len(values) - 1, round(0.9 * (len(values) - 1)))]
    return f"{values[0]}-{values[-1]}, median {statistics.median(values):.0f}, p90 {p90}"


# -- one mode, in its own process ------------------------------------------------------------------------


class PolicyTokens(throughput.FedTokens):
    """What the policy's forward is fed (throughput.FedTokens), counted only in forwards that keep gradients: the
    reference's forward (under no_grad, the adapter switched off) reads the same tokens again, a cost of the step
    and no tokens of its own."""

    def _count(self, module, args, kwargs):
        import torch

        if torch.is_grad_enabled():
            super()._count(module, args, kwargs)


def our_argv(mode: str, settings: dict, out: str) -> list[str]:
    """finetune.py's arguments for ours: the run a user would start, on the bench's model and pairs."""
    cuda = settings["cuda"]
    argv = ["--stage", "dpo", "--pref_loss", "sigmoid", "--pref_beta", str(BETA)]
    argv += ["--model_name_or_path", settings["model"], "--data_path", settings["data"], "--output_dir", out]
    argv += ["--dataset_cache_dir", "none", "--model_max_length", str(settings["max_length"])]
    argv += ["--max_steps", str(settings["warmup"] + settings["steps"])]
    # the same pairs per step as TRL's, in the file's order
    argv += ["--per_device_train_batch_size", str(settings["pairs_per_step"])]
    argv += ["--train_sampling_strategy", "sequential"]
    argv += ["--learning_rate", "1e-5", "--lr_scheduler_type", "constant", "--save_strategy", "no"]
    argv += ["--report_to", "none", "--logging_steps", "10000", "--disable_tqdm", "True"]
    argv += ["--seed", str(settings["seed"])]
    argv += ["--bf16", str(cuda), "--dataloader_num_workers", "0", "--gradient_checkpointing", "True"]
    argv += ["--use_lora", "True", "--lora_r", str(LORA["r"]), "--lora_alpha", str(LORA["alpha"])]
    argv += ["--lora_dropout", str(LORA["dropout"])]
    if mode == "padded":
        argv += ["--packing", "False"]
    return argv


def our_trainer(mode: str, settings: dict, out: str):
    """Our trainer through the recipe's phases, exactly as finetune.py composes them."""
    from finetune import parse_arguments
    from tuning import recipe
    from tuning.callbacks import LossPlotCallback

    args = parse_arguments(our_argv(mode, settings, out))
    resume = recipe.start(args)
    data = recipe.read_data(args)
    processing = recipe.prepare_processing(args, data)
    datasets = recipe.build_datasets(args, data, processing)
    model = recipe.build_model(args, processing)
    trainer = recipe.build_trainer(args, processing, datasets, model, resume)
    trainer.remove_callback(LossPlotCallback)  # matplotlib, imported at the end to draw it, would count in the peak
    return trainer


def trl_trainer(settings: dict, out: str):
    """TRL's DPOTrainer on the same model and pairs, LoRA through its peft_config (the reference: the adapter
    switched off), the same pairs per step in the same order."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    cuda = settings["cuda"]
    tokenizer = AutoTokenizer.from_pretrained(settings["model"])
    dtype = torch.bfloat16 if cuda else torch.float32
    model = AutoModelForCausalLM.from_pretrained(settings["model"], dtype=dtype, attn_implementation="sdpa")
    if cuda:
        model.to("cuda")
    common = throughput.common_arguments({**settings, "checkpointing": True}, out, settings["pairs_per_step"])
    config = DPOConfig(
        **common,
        train_sampling_strategy="sequential",
        max_length=settings["max_length"],  # longer than any pair's prompt and answer: nothing is cut
        precompute_ref_log_probs=False,
        padding_free=False,  # TRL 1.16 disables it for DPO (it warns and pads)
        loss_type=["sigmoid"],
        beta=BETA,
        dataset_num_proc=1,
    )
    peft_config = LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    records = [json.loads(line) for line in Path(settings["data"]).read_text().splitlines()]
    return DPOTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(records),
        processing_class=tokenizer,
        peft_config=peft_config,
    )


def run_mode(mode: str, settings: dict) -> dict:
    import torch

    from tuning import recipe
    from tuning.runtime import map_large_blocks_apart, peak_resident_bytes

    out = tempfile.mkdtemp(prefix=f"bench-dpo-{mode}-")
    ours = mode != "trl"
    trainer = our_trainer(mode, settings, out) if ours else trl_trainer(settings, out)
    model = trainer.model
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    if not ours and not torch.cuda.is_available():
        map_large_blocks_apart()  # the host allocator's setting our trainer makes on a CPU (its lower peak RSS)
    counter = PolicyTokens(model)
    timer = throughput.timed_callback(settings["warmup"], counter)
    trainer.add_callback(timer)
    memory = throughput.TrainingMemory()
    memory.begin(model)
    if ours:  # the recipe's run phase, as finetune.py: the host allocator's setting, train mode, Trainer.train
        recipe.run(trainer, None, [])
    else:
        trainer.train()
    training_memory = memory.end()
    start_memory = memory.start

    start, end = timer.start_counts, timer.end_counts
    lengths = counter.sample_lengths[start[2] : end[2]]
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else peak_resident_bytes()
    return {
        "mode": mode,
        "seconds": timer.end - timer.start,
        "real_tokens": end[0] - start[0],
        "positions": end[1] - start[1],
        "sequences": len(lengths),
        "pairs": len(lengths) // 2,  # every pair: its chosen and its rejected sequence
        "pairs_trained": len(counter.sample_lengths) // 2,  # warm-up steps included
        "longest_sequence": max(lengths),
        "peak_memory_bytes": peak,
        "training_memory_bytes": training_memory,
        "start_memory_bytes": start_memory,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "pairs_per_step": trainer.args.per_device_train_batch_size,
    }


# -- the comparison --------------------------------------------------------------------------------------


MEASURES = ("seconds", "peak_memory_bytes", "training_memory_bytes", "start_memory_bytes")


def summarize(runs: list[dict]) -> dict:
    """One mode's runs: the first run's record with every measure replaced by its median, and the runs."""
    return {**runs[0], **{key: statistics.median(r[key] for r in runs) for key in MEASURES}, "runs": runs}


rate = throughput.rate  # real (not padding) tokens per second of one measured run


def median_ratio(result: dict, reference: dict, measure) -> float:
    """The median over the runs made side by side of measure(result) / measure(reference)."""
    pairs = zip(throughput.runs_of(result), throughput.runs_of(reference), strict=True)
    return statistics.median(measure(run) / measure(ref) for run, ref in pairs)


def goal_lines(results: dict) -> list[str]:
    """Whether ours meets the issue's goal against TRL, on the measured medians of the ratios."""
    ours, trl = results["ours"], results["trl"]
    speed = median_ratio(ours, trl, rate)
    peak = median_ratio(ours, trl, throughput.mebibytes("peak_memory_bytes"))
    training = median_ratio(ours, trl, throughput.mebibytes("training_memory_bytes"))

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    met = speed >= GOAL_RATE and peak <= GOAL_MEMORY
    return [
        f"Goal: ours at least {GOAL_RATE}x TRL's real tokens/s at most {GOAL_MEMORY}x its peak memory. Measured: "
        f"{speed:.2f}x the real tokens/s ({verdict(speed >= GOAL_RATE)}), {peak:.2f}x the peak memory "
        f"({verdict(peak <= GOAL_MEMORY)}); the goal is {verdict(met)}. (The memory taken by training: "
        f"{training:.2f}x, {verdict(training <= GOAL_MEMORY)} on that measure.)"
    ]


def table(results: dict, settings: dict) -> str:
    trl, padded = results["trl"], results["padded"]
    peak, training = throughput.mebibytes("peak_memory_bytes"), throughput.mebibytes("training_memory_bytes")
    start = throughput.mebibytes("start_memory_bytes")
    ours = results["ours"]
    lines = [
        f"Model: {settings['model_caption']}; LoRA r={LORA['r']} (alpha {LORA['alpha']}) on every linear layer; "
        f"{'bf16' if settings['cuda'] else 'fp32'}; gradient checkpointing on; DPO (sigmoid, beta {BETA}), the "
        "reference the model with its adapter switched off. Data: "
        + (f"the first {settings['trained_pairs']} of " if settings["trained_pairs"] < settings["pairs"] else "")
        + f"{settings['pairs']} generated pairs (prompt, chosen, rejected; "
        "long-tailed, log-normal lengths), in tokens: prompts "
        f"{settings['lengths']['prompt']}; chosen {settings['lengths']['chosen']}; rejected "
        f"{settings['lengths']['rejected']} (chosen and rejected of different lengths). Steps: "
        f"{settings['pairs_per_step']} pairs per optimizer step in every mode (ours: "
        "--per_device_train_batch_size, TRL: per_device_train_batch_size), taken in the file's order "
        "(train_sampling_strategy sequential), so every mode trains the very same pairs in every step "
        f"(--max_tokens_per_batch is not used: TRL's DPOTrainer has no token budget); {settings['steps']} timed "
        f"step{'s' if settings['steps'] != 1 else ''} after {settings['warmup']} warm-up. "
        f"Device: {settings['device']}. "
        + throughput.repeats_caption(settings)
        + "Real tokens: the non-padding tokens of the prompts and both answers in the policy's forward (each pair "
        "reads its prompt twice, once with each answer; the reference's forward reads them again, which counts in "
        "the time, not in the tokens); padding: the share of the positions fed that are padding. "
        + (
            "Peak memory: the GPU memory allocated at the peak, weights included; memory at start: allocated "
            "when training began; memory taken by training: the peak above it."
            if settings["cuda"]
            else "Peak memory: the process's peak RSS, libraries and weights included; memory at start: the RSS "
            "when training began, with the libraries loaded and the weights read (TRL's process holds more "
            "libraries); memory taken by training: the peak RSS while training above it. TRL runs with the host "
            "allocator setting our trainer makes on a CPU (tuning/runtime.py). On a CPU (no Triton) TRL's fused "
            "head projects every position, prompts and padding included, not only the answer tokens (on a GPU "
            "only the answer tokens)."
        ),
        "",
        "| mode | pairs per step | real tokens per step | padding | seconds per step | real tokens/s "
        "| peak memory | memory at start | memory taken by training | tokens/s vs TRL | peak vs TRL "
        "| training memory vs TRL |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    steps = settings["steps"]
    for mode in MODES:
        r = results[mode]
        padding = 1 - r["real_tokens"] / r["positions"]
        lines.append(
            f"| {NAMES[mode]} | {r['pairs'] / steps:g} | {r['real_tokens'] / steps:,.0f} | {padding:.0%} "
            f"| {r['seconds'] / steps:.3g} | {throughput.range_cell(r, rate)} "
            f"| {throughput.range_cell(r, peak, ' MiB')} | {throughput.range_cell(r, start, ' MiB')} "
            f"| {throughput.range_cell(r, training, ' MiB')} | {throughput.ratio_cell(r, trl, rate)} "
            f"| {throughput.ratio_cell(r, trl, peak)} | {throughput.ratio_cell(r, trl, training)} |"
        )
    lines += [
        "",
        "| ratio | real tokens/s | peak memory | memory taken by training |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, other in (("ours / TRL", trl), ("ours / padded", padded)):
        lines.append(
            f"| {name} | {throughput.ratio_cell(ours, other, rate)} | {throughput.ratio_cell(ours, other, peak)} "
            f"| {throughput.ratio_cell(ours, other, training)} |"
        )
    return "\n".join([*lines, "", *goal_lines(results)]) + "\n"


def prepare(args) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tuning.data.processing import load_processing
    from tuning.tiny import ensure_tiny

    if args.smoke:
        model = ensure_tiny("text")
    else:  # throughput.py's --vocab real model: Qwen2.5-0.5B's shapes and vocabulary, 2 layers
        size = throughput.MODEL_SIZES["real"]
        model = ensure_tiny("text", out=REPO / "models" / "bench-qwen2-real", initializer_range=0.02, **size)
    tokenizer, _, _ = load_processing(str(model))
    lengths = pair_lengths(args.pairs, args.seed, args.prompt_median, args.answer_median, args.max_length - 64)
    data = Path(tempfile.mkdtemp(prefix="bench-pairs-")) / "pairs.jsonl"
    measured = write_pairs(data, tokenizer, lengths, args.seed)
    trained = (args.warmup + args.steps) * args.pairs_per_step  # in the file's order: the first pairs train
    config = AutoConfig.from_pretrained(model)
    with torch.device("meta"):
        parameters = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    caption = (
        f"the tiny Qwen2 (models/tiny-qwen2, {parameters / 1e6:.2f}M parameters, vocabulary {config.vocab_size:,})"
        if args.smoke
        else f"Qwen2.5-0.5B shapes with {config.num_hidden_layers} layers instead of 24 (models/bench-qwen2-real: "
        f"{parameters / 1e6:.0f}M parameters, random weights), vocabulary {config.vocab_size:,}; the smallest "
        "real-vocabulary bench model of throughput.py (--vocab real), as all 24 layers train too slowly on a CPU"
    )
    return {
        "model": str(model),
        "model_caption": caption,
        "data": str(data),
        "pairs": args.pairs,
        "trained_pairs": trained,
        "lengths": {key: describe_lengths(values[:trained]) for key, values in measured.items()},
        "pairs_per_step": args.pairs_per_step,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "seed": args.seed,
        "max_length": args.max_length,
        "parameters": parameters,
        "cuda": torch.cuda.is_available(),
        "device": throughput.device_name(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs_per_step", type=int, default=2, help="pairs per optimizer step, in every mode")
    parser.add_argument("--steps", type=int, default=2, help="timed optimizer steps per mode")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--pairs", type=int, help="generated pairs (the first ones train); default: as many as train")
    parser.add_argument("--prompt_median", type=int, default=32, help="median prompt length in tokens")
    parser.add_argument("--answer_median", type=int, default=64, help="median answer length in tokens")
    parser.add_argument("--max_length", type=int, default=4096, help="our model_max_length, TRL's max_length")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each mode, in turn: medians and ranges")
    parser.add_argument("--smoke", action="store_true", help="the tiny model, 4 pairs, 2 steps: does every mode run?")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the table goes")
    throughput.add_child_arguments(parser, MODES)
    args = parser.parse_args(argv)

    if throughput.answered_as_child(args, run_mode):
        return 0
    if args.smoke:
        args.pairs_per_step, args.steps, args.warmup, args.max_length = 2, 1, 1, 512
        args.prompt_median, args.answer_median = 24, 32
    needed = (args.warmup + args.steps) * args.pairs_per_step
    args.pairs = args.pairs or needed
    if args.pairs < needed:
        parser.error(f"--pairs {args.pairs}: the steps take {needed} pairs")
    settings = prepare(args)
    runs = throughput.runs_in_turn(MODES, args.repeats, settings, __file__)
    results = {mode: summarize(runs[mode]) for mode in MODES}
    text = table(results, settings)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"preference-{'smoke' if args.smoke else 'gpu' if settings['cuda'] else 'cpu'}"
    command = "python bench/preference.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (args.out / f"{stem}.md").write_text(f"# DPO training throughput\n\n`{command.strip()}`\n\n{text}")
    (args.out / f"{stem}.json").write_text(json.dumps({"settings": settings, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
