"""Fine-tune a Qwen-family (or other Hugging Face) chat or vision-language model: full, LoRA or Q-LoRA.

    python finetune.py --model_name_or_path Qwen/Qwen2.5-VL-7B-Instruct --data_path my.json \
        --output_dir output/my-run --use_lora True --bf16 True
    python finetune.py run.yaml           # the same arguments from a YAML or JSON file

With no --model_name_or_path, the tiny offline demo model (models/tiny-qwen2.5-vl) is built and used.
The flags of the official Qwen scripts keep their names; every transformers.TrainingArguments flag works.
The run's phases live in tuning/recipe.py; train() below calls them in order.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
import transformers

from tuning import recipe
from tuning.arguments import parse_groups
from tuning.data.args import DataArguments
from tuning.loss import LOSS_IMPLEMENTATIONS
from tuning.model import is_gptq_checkpoint
from tuning.preference import PreferenceArguments
from tuning.runtime import is_zero3, leave_distributed
from tuning.trainer import SupervisedTrainer


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A local folder or hub name. Default: the tiny offline demo model (built if missing)."},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow the model's own Python code to run."})
    attn_implementation: str = field(
        default="sdpa",
        metadata={
            "help": "sdpa, eager or flash_attention_2 (if flash-attn is installed). With --packing, sdpa runs each "
            "packed sample in a call of its own, without a mask (tuning/attention.py)."
        },
    )
    fix_vit: bool = field(
        default=True, metadata={"help": "Freeze the vision tower (also under LoRA: it gets no adapters)."}
    )
    tune_projector: bool = field(
        default=True, metadata={"help": "Train the vision-language projector (Qwen's merger) in full."}
    )


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    output_dir: str = field(default="output/run", metadata={"help": "Where checkpoints and the result go."})
    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all weights."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Start over in an --output_dir that already holds checkpoints."}
    )
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "A checkpoint folder, or 'auto' for the newest in --output_dir."}
    )
    remove_unused_columns: bool = field(default=False, metadata={"help": "Kept False: samples carry images."})
    dataloader_num_workers: int | None = field(
        default=None,
        metadata={
            "help": "Processes that read batches and compute their pixel values while the model trains. Default: "
            "on a GPU machine up to 4 per rank (of the cores the node's ranks share); on a CPU 0, as the training "
            "itself takes every core."
        },
    )
    include_num_input_tokens_seen: str = field(
        default="non_padding", metadata={"help": "Count real tokens, for the tokens/s log."}
    )
    logging_steps: float = field(default=1, metadata={"help": "Log every N steps."})
    sample_prompts: list[str] | None = field(
        default=None,
        metadata={
            "help": "Prompts answered every --sample_steps steps into the log and samples.jsonl; "
            "'PATH::question' attaches a picture."
        },
    )
    sample_steps: int = field(default=100, metadata={"help": "How often the sample prompts are answered."})
    vision_lr: float | None = field(
        default=None, metadata={"help": "Learning rate of the vision tower when it trains (default: --learning_rate)."}
    )
    projector_lr: float | None = field(
        default=None, metadata={"help": "Learning rate of the vision-language projector (default: --learning_rate)."}
    )
    loss_impl: str = field(
        default="chunked",
        metadata={
            "help": "chunked: the loss from the hidden states at the supervised positions, a chunk of rows at a "
            "time, never the full logits (exact; the memory of the logits is what runs out on a real vocabulary). "
            "plain: the model's own loss over the full logits. With --use_liger_kernel True Liger's fused loss runs.",
            "choices": list(LOSS_IMPLEMENTATIONS),
        },
    )
    moe_aux_loss_coef: float | None = field(
        default=None,
        metadata={
            "help": "Mixture-of-experts models: the weight of the router's load-balancing loss, which trains with the "
            "model's loss (either --loss_impl). Default: the model config's router_aux_loss_coef; 0 turns it off."
        },
    )
    tiled_mlp: bool | None = field(
        default=None,
        metadata={
            "help": "Run each MLP a tile of tokens at a time in training: its wide intermediate activations never "
            "exist for the whole packed row (exact; the MLP's forward runs once more in the backward). Default: "
            "with --gradient_checkpointing, which already trades that compute for memory. Not under ZeRO-3."
        },
    )
    mlp_tile_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Tokens per MLP tile. Default: as many tiles as the MLP widens its input (6 for Qwen2.5), "
            "so no tile's intermediate outgrows the MLP's input; at least 256 tokens a tile."
        },
    )
    on_nonfinite: str = field(
        default="stop",
        metadata={
            "help": "A NaN or infinite loss or gradient: stop the run with a message, or skip that optimizer step.",
            "choices": ["stop", "skip"],
        },
    )


@dataclass
class LoraArguments:
    lora_r: int = field(default=64, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "What LoRA adapts, by the last part of the name: linear layers (q_proj v_proj), fused MoE "
            "expert parameters (gate_up_proj down_proj, or experts for all), routers (gate / router, never by "
            "default). Default (or all-linear, which may be combined with router names): every linear layer and "
            "expert parameter of the language model."
        },
    )
    lora_expert_r: int | None = field(
        default=None,
        metadata={
            "help": "LoRA rank of each MoE expert (default: --lora_r). Every expert gets its own pair, so E experts "
            "train E times the LoRA of one dense MLP: Qwen3-30B-A3B at r 64 trains 2.5 B parameters in its experts."
        },
    )
    lora_weight_path: str | None = field(default=None, metadata={"help": "Start from this existing adapter."})
    lora_bias: str = field(
        default="none", metadata={"help": "none, all or lora_only.", "choices": ["none", "all", "lora_only"]}
    )
    q_lora: bool = field(default=False, metadata={"help": "Q-LoRA: load the base in 4-bit nf4 (needs --use_lora)."})
    use_dora: bool = field(default=False, metadata={"help": "DoRA: weight-decomposed LoRA."})
    use_rslora: bool = field(default=False, metadata={"help": "rsLoRA: scale by alpha / sqrt(r)."})
    lora_vision: bool = field(default=False, metadata={"help": "Also put LoRA on the vision tower."})


def argument_problems(model_args, data_args, training_args, lora_args, preference_args=None) -> list[str]:
    """Every impossible combination, so the user fixes them all in one go."""
    problems = data_args.problems() if isinstance(data_args, DataArguments) else []
    if isinstance(preference_args, PreferenceArguments):
        problems += preference_args.problems(data_args.stage)
        problems += stage_problems(data_args, training_args, lora_args, preference_args)
    if lora_args.q_lora and not training_args.use_lora:
        problems.append("--q_lora True needs --use_lora True")
    if training_args.bf16 and training_args.fp16:
        problems.append("--bf16 and --fp16 are both set: choose one")
    elif training_args.fp16 and not torch.cuda.is_available():
        # accelerate would silently train in fp32 and DeepSpeed refuses; say so before anything loads
        problems.append("--fp16 needs a GPU: on this machine use --bf16 True, or neither")
    if lora_args.lora_weight_path and not training_args.use_lora:
        problems.append("--lora_weight_path needs --use_lora True")
    if lora_args.lora_vision and model_args.fix_vit and not training_args.use_lora:
        problems.append("--lora_vision True has no effect without --use_lora True")
    if training_args.sample_prompts and lora_args.q_lora:
        problems.append("--sample_prompts does not work with --q_lora (a 4-bit model's eval forward breaks training)")
    if model_args.model_name_or_path and is_gptq_checkpoint(model_args.model_name_or_path):
        if training_args.bf16:
            problems.append("a GPTQ checkpoint computes in fp16: use --fp16 True (on a GPU) instead of --bf16")
        if not training_args.use_lora:
            problems.append("a GPTQ checkpoint cannot be fine-tuned in full: add --use_lora True (Q-LoRA)")
    if training_args.on_nonfinite == "skip" and training_args.deepspeed:
        problems.append("--on_nonfinite skip does not work with --deepspeed (its gradients live in the engine)")
    if lora_args.lora_r <= 0:
        problems.append(f"--lora_r must be positive, got {lora_args.lora_r}")
    if lora_args.lora_expert_r is not None and lora_args.lora_expert_r <= 0:
        problems.append(f"--lora_expert_r must be positive, got {lora_args.lora_expert_r}")
    if training_args.use_liger_kernel and not torch.cuda.is_available():
        problems.append("--use_liger_kernel True needs a CUDA GPU (Liger's kernels are Triton GPU kernels)")
    if training_args.mlp_tile_tokens is not None and training_args.mlp_tile_tokens <= 0:
        problems.append(f"--mlp_tile_tokens must be positive, got {training_args.mlp_tile_tokens}")
    return problems


def stage_problems(data_args, training_args, lora_args, preference_args) -> list[str]:
    """What the chosen --stage cannot do with the other flags."""
    stage, problems = data_args.stage, []
    if stage == "kto":
        if training_args.per_device_train_batch_size < 2 or training_args.per_device_eval_batch_size < 2:
            problems.append(
                "--stage kto needs --per_device_train_batch_size (and _eval_) of at least 2: its KL term pairs each "
                "prompt with another completion of the batch"
            )
        if preference_args.precompute_ref_log_probs:
            problems.append(
                "--stage kto computes its reference live (its KL term pairs each batch's prompts with its other "
                "answers): drop --precompute_ref_log_probs"
            )
        if preference_args.pref_loss != "sigmoid":
            problems.append("--pref_loss is for --stage dpo; KTO has its own loss")
    own_reference = not training_args.use_lora or preference_args.precompute_ref_log_probs or lora_args.lora_weight_path
    if stage == "dpo" and is_zero3(training_args) and preference_args.needs_reference and own_reference:
        problems.append(
            "--stage dpo under ZeRO-3 needs a reference of its own in the engine, which is not built yet: use "
            "ZeRO-2, or LoRA (its reference is the model with the adapter off), or --pref_loss orpo|simpo"
        )
    return problems


def parse_arguments(argv: list[str]) -> recipe.RunArguments:
    """The four argument groups, with every adjustment the run makes (recipe.settle_arguments) and every problem,
    the Trainer's own checks included, reported at once before anything is loaded."""
    groups = (ModelArguments, DataArguments, TrainingArguments, LoraArguments, PreferenceArguments)
    built, adjustments = parse_groups(
        groups, argv, "finetune.py", adjust=recipe.settle_arguments, check=argument_problems
    )
    model, data, training, lora, preference = built
    return recipe.RunArguments(model, data, training, lora, preference, adjustments=adjustments)


def train(argv: list[str] | None = None, callbacks: tuple = ()) -> SupervisedTrainer:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_arguments(argv)
    resume = recipe.start(args)  # logging, the output folder's rules, the seed, the process group
    data = recipe.read_data(args)  # every record read and checked
    processing = recipe.prepare_processing(args, data)  # the one step that changes the tokenizer and processor
    datasets = recipe.build_datasets(args, data, processing)  # bad data stops the run here, before the model
    model = recipe.build_model(args, processing)
    trainer = recipe.build_trainer(args, processing, datasets, model, resume, callbacks)
    recipe.record(args, datasets)
    recipe.run(trainer, resume, argv)
    recipe.save(trainer, processing)
    return trainer


if __name__ == "__main__":
    train()
    leave_distributed(0)
