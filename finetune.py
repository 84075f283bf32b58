"""Fine-tune a Qwen-family (or other Hugging Face) chat or vision-language model: full, LoRA or Q-LoRA.

    python finetune.py --model_name_or_path Qwen/Qwen2.5-VL-7B-Instruct --data_path my.json \
        --output_dir output/my-run --use_lora True --bf16 True
    python finetune.py run.yaml           # the same arguments from a YAML or JSON file

With no --model_name_or_path, the tiny offline demo model (models/tiny-qwen2.5-vl) is built and used.
The flags of the official Qwen scripts keep their names; every transformers.TrainingArguments flag works.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import SimpleNamespace

import torch
import transformers
from transformers import HfArgumentParser

from tuning.attention import PACKED_SDPA, attend_per_sample
from tuning.callbacks import LossPlotCallback, SampleGenerationCallback, StopOnSignal, ThroughputCallback, TileMLPs
from tuning.checkpoints import RestoreFullWeights, resolve_resume, resume_command, save_final, save_run_args
from tuning.data.args import DataArguments, merge_repeated_flags
from tuning.data.collate import FlatteningCollator, PaddingCollator
from tuning.data.dataset import build_dataset, sample_to_features
from tuning.data.errors import DataError, DataErrors
from tuning.loss import LOSS_IMPLEMENTATIONS
from tuning.model import (
    LoadOptions,
    LoraOptions,
    attach_lora,
    compute_dtype,
    count_parameters,
    is_gptq_checkpoint,
    is_vision_language,
    load_model,
    load_processing,
    resize_for_tokenizer,
    rope_index_fn,
    set_trainable,
    untrained_token_ids,
    vision_parts,
)
from tuning.runtime import deepspeed_state_on_cpu, is_zero3, leave_distributed, prepare_host_memory
from tuning.trainer import SupervisedTrainer

logger = logging.getLogger("finetune")


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
            "help": "Linear layer names to adapt (e.g. q_proj v_proj). Default: every linear layer of "
            "the language model."
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


def argument_problems(model_args, data_args, training_args, lora_args) -> list[str]:
    """Every impossible combination, so the user fixes them all in one go."""
    problems = data_args.problems() if isinstance(data_args, DataArguments) else []
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
    if training_args.use_liger_kernel and not torch.cuda.is_available():
        problems.append("--use_liger_kernel True needs a CUDA GPU (Liger's kernels are Triton GPU kernels)")
    if training_args.mlp_tile_tokens is not None and training_args.mlp_tile_tokens <= 0:
        problems.append(f"--mlp_tile_tokens must be positive, got {training_args.mlp_tile_tokens}")
    return problems


def parse_arguments(argv: list[str]):
    """The four argument groups. Every problem is collected, the Trainer's own checks included, and
    reported at once before anything is loaded."""
    groups = (ModelArguments, DataArguments, TrainingArguments, LoraArguments)
    parser = HfArgumentParser(groups)
    config_file = None
    if argv and argv[0].endswith((".yaml", ".yml", ".json")):
        import yaml

        # the file's values are defaults that flags after it override: `finetune.py run.yaml --learning_rate 1e-4`
        config_file = argv[0]
        file_values = yaml.safe_load(Path(config_file).read_text()) or {}  # JSON is YAML too
        parser.set_defaults(**file_values)
        argv = argv[1:]
    namespace, unknown = parser.parse_known_args(merge_repeated_flags(argv))
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    values = vars(namespace)
    if not torch.cuda.is_available() and values.get("deepspeed"):
        values["accelerator_config"] = deepspeed_state_on_cpu()
    if not torch.cuda.is_available() and not values.get("deepspeed"):
        # Without it transformers treats torchrun ranks on a CPU machine as separate single-process runs: every
        # rank trained on the same samples and wrote the same folder. With it, gloo DDP. (DeepSpeed sets up its
        # own CPU accelerator, and use_cpu would switch DeepSpeed off.)
        values["use_cpu"] = True
    if values.get("eval_data_path") and values.get("eval_strategy") in (None, "no"):
        values["eval_strategy"] = "steps"  # eval data given means evaluate, at --eval_steps (or logging steps)
    built, problems = [], []
    for group in groups:
        names = {f.name for f in fields(group) if f.init}
        inputs = {k: v for k, v in values.items() if k in names}
        try:
            built.append(group(**inputs))
        except (ValueError, TypeError) as e:
            problems.append(str(e).splitlines()[0])
            defaults = {f.name: f.default for f in fields(group) if f.init}
            built.append(SimpleNamespace(**{**defaults, **inputs}))
    unused = set(values) - {f.name for group in groups for f in fields(group)}
    if unused:
        problems.append(f"unknown arguments in {config_file}: {', '.join(sorted(unused))}")
    problems += argument_problems(*built)
    if problems:
        raise SystemExit("finetune.py: bad arguments:\n" + "\n".join(f"  - {p}" for p in problems))
    return built


def collator_for(model, tokenizer, encoder, packing: bool, world_size: int):
    if not packing:
        return PaddingCollator(pad_token_id=tokenizer.pad_token_id)
    placeholder = None
    if world_size > 1 and encoder.image_processor is not None:
        # ranks must reduce the same parameters: a rank whose batch has no picture would leave the projector out
        placeholder = sample_to_features(encoder.placeholder_image_sample())
    return FlatteningCollator(rope_index=rope_index_fn(model), placeholder=placeholder)


def standard_callbacks(training_args, resume: str | None, tokenizer, processor) -> list:
    callbacks = [ThroughputCallback(training_args.world_size), LossPlotCallback()]
    if training_args.sample_prompts:
        callbacks.append(
            SampleGenerationCallback(training_args.sample_prompts, training_args.sample_steps, tokenizer, processor)
        )
    if resume and not training_args.use_lora and not training_args.deepspeed:  # DeepSpeed restores its own way
        callbacks.append(RestoreFullWeights(resume))
    return callbacks


def data_or_exit(data_args, paths: list[str], encoder, skip_bad_samples: bool):
    """Every sample read, checked and encoded before a model is loaded: bad data stops the run here, with every
    problem listed, and not hours into training."""
    try:
        return build_dataset(
            paths,
            encoder,
            lazy=data_args.lazy_preprocess,
            skip_bad_samples=skip_bad_samples,
            workers=data_args.preprocessing_num_workers,
            ignore_unknown_fields=data_args.ignore_unknown_fields,
        )
    except (DataError, DataErrors, FileNotFoundError) as e:
        raise SystemExit(f"finetune.py: the data cannot be used: {e}") from None


def learning_rates_by_part(model, training_args) -> dict[str, float]:
    """Parameter-name prefixes with their own learning rate: projector first, as it sits inside the tower."""
    towers, projectors = vision_parts(model)
    rates = {}
    if training_args.projector_lr is not None:
        rates.update(dict.fromkeys(projectors, training_args.projector_lr))
    if training_args.vision_lr is not None:
        rates.update(dict.fromkeys(towers, training_args.vision_lr))
    return rates


def mlp_tiling(training_args, zero3: bool) -> list[TileMLPs]:
    """ZeRO-3 gathers an MLP's weights only inside its own hooks, and tiling hands them to an autograd Function
    directly (measured: the ranks deadlock). DDP, ZeRO-2 and FSDP train the same with it (tested)."""
    wanted = training_args.tiled_mlp
    if wanted is None:
        wanted = training_args.gradient_checkpointing
    if not wanted:
        return []
    if zero3:
        logger.info("mlp: not tiled under ZeRO-3")
        return []
    return [TileMLPs(training_args.mlp_tile_tokens)]


def train(argv: list[str] | None = None, callbacks: tuple = ()) -> SupervisedTrainer:
    argv = sys.argv[1:] if argv is None else argv
    model_args, data_args, training_args, lora_args = parse_arguments(argv)
    logging.basicConfig(level=logging.INFO if training_args.process_index == 0 else logging.WARNING)
    if model_args.model_name_or_path is None:
        from tuning.tiny import ensure_tiny

        model_args.model_name_or_path = str(ensure_tiny("vl"))
    resume = resolve_resume(
        training_args.output_dir, training_args.resume_from_checkpoint, training_args.overwrite_output_dir
    )
    transformers.set_seed(training_args.seed)  # LoRA and new rows are initialised before the Trainer seeds
    zero3 = is_zero3(training_args)
    if zero3 and not transformers.utils.is_torch_cuda_available():
        import deepspeed  # ZeRO-3 on the CPU checks its batch size in from_pretrained: the group must exist

        deepspeed.init_distributed(dist_backend="gloo")

    # Data first: it may add tokens (Qwen-VL grounding tags) that the model must then make room for.
    tokenizer, processor, model_type = load_processing(model_args.model_name_or_path, model_args.trust_remote_code)
    encoder = data_args.encoder(tokenizer, processor, model_type)
    train_set, report = data_or_exit(data_args, data_args.data_path, encoder, data_args.skip_bad_samples)
    logger.info(report.summary())
    eval_set = None
    if data_args.eval_data_path:
        eval_set, eval_report = data_or_exit(data_args, data_args.eval_data_path, encoder, False)
        logger.info(eval_report.summary())

    dtype = compute_dtype(training_args.bf16, training_args.fp16)
    # n_gpu reads 1 under DeepSpeed on a CPU machine: ask torch whether there is a GPU to place the 4-bit model on
    device_map = {"": training_args.local_process_index} if lora_args.q_lora and torch.cuda.is_available() else None
    model = load_model(
        LoadOptions(
            model_args.model_name_or_path,
            trust_remote_code=model_args.trust_remote_code,
            attn_implementation=model_args.attn_implementation,
            dtype=dtype,
            q_lora=lora_args.q_lora,
            zero3=zero3,
            device_map=device_map,
        )
    )
    resize_for_tokenizer(model, tokenizer)
    if data_args.packing and attend_per_sample(model):
        logger.info("attention: %s (one causal sdpa call per packed sample, no mask)", PACKED_SDPA)
    if training_args.use_lora:
        candidates = [t for t in ("<|im_start|>", "<|im_end|>") if t in tokenizer.get_vocab()]
        token_ids = untrained_token_ids(model, tokenizer, candidates, report.added_tokens)
        if token_ids:
            logger.info("training the embedding rows of tokens %s", tokenizer.convert_ids_to_tokens(token_ids))
        model = attach_lora(
            model,
            LoraOptions(
                r=lora_args.lora_r,
                alpha=lora_args.lora_alpha,
                dropout=lora_args.lora_dropout,
                bias=lora_args.lora_bias,
                target_modules=lora_args.lora_target_modules,
                weight_path=lora_args.lora_weight_path,
                use_dora=lora_args.use_dora,
                use_rslora=lora_args.use_rslora,
                include_vision=lora_args.lora_vision,
                tune_projector=model_args.tune_projector,
            ),
            token_ids,
            quantized=lora_args.q_lora or getattr(model, "is_quantized", False),
            checkpointing=training_args.gradient_checkpointing,
            zero3=zero3,
        )
    else:
        set_trainable(model, model_args.fix_vit, model_args.tune_projector)
    logger.info("parameters: %s", count_parameters(model))
    if training_args.ddp_find_unused_parameters is None and is_vision_language(model.config):
        # Text-only batches leave the vision tower out of the graph: DDP must not wait for its gradients.
        training_args.ddp_find_unused_parameters = True
    if data_args.packing and training_args.include_num_input_tokens_seen == "non_padding":
        # a packed batch has no padding: every token is real (and there is no attention mask to count them by)
        training_args.include_num_input_tokens_seen = "all"
    if training_args.gradient_checkpointing and training_args.gradient_checkpointing_kwargs is None:
        training_args.gradient_checkpointing_kwargs = {"use_reentrant": False}

    if training_args.process_index == 0:
        save_run_args(
            training_args.output_dir, model=model_args, data=data_args, training=training_args, lora=lora_args
        )
        report.save(os.path.join(training_args.output_dir, "data_report.json"))
    stop_on_signal = StopOnSignal()
    trainer = SupervisedTrainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=collator_for(model, tokenizer, encoder, data_args.packing, training_args.world_size),
        callbacks=[
            *standard_callbacks(training_args, resume, tokenizer, processor),
            *mlp_tiling(training_args, zero3),
            stop_on_signal,
            *callbacks,
        ],
        on_nonfinite=training_args.on_nonfinite,
        lr_by_prefix=learning_rates_by_part(model, training_args),
        loss_impl="plain" if training_args.use_liger_kernel else training_args.loss_impl,
        max_tokens_per_batch=data_args.max_tokens_per_batch,
    )
    model.train()  # before any forward: a 4-bit model evaluated first switches to an inference-only layout
    prepare_host_memory(training_args.device)
    trainer.train(resume_from_checkpoint=resume)
    if stop_on_signal.received:
        checkpoint = os.path.join(training_args.output_dir, f"checkpoint-{stop_on_signal.saved_at}")
        name = signal.Signals(stop_on_signal.received).name
        if training_args.process_index == 0:
            print(
                f"\n{name}: stopped at step {stop_on_signal.saved_at} and saved {checkpoint}. Resume with:\n"
                f"  {resume_command(argv)}",
                file=sys.stderr,
            )
        leave_distributed(128 + stop_on_signal.received)
        raise SystemExit(128 + stop_on_signal.received)
    save_final(trainer, processor or tokenizer, training_args.output_dir)
    if processor is not None and trainer.is_world_process_zero():
        data_args.media_options().save(training_args.output_dir)  # the chat and the demo resize the same way
    logger.info("saved to %s", training_args.output_dir)
    return trainer


if __name__ == "__main__":
    train()
    leave_distributed(0)
