"""A fine-tuning run as named phases, called in this order by finetune.train():

    settle_arguments(values)    while parsing: every change to the arguments, each with its reason, before any load
    start(args)                 logging, the output folder's rules (resume or refuse), the seed, the process group
    read_data(args)             every record of the train and eval files counted and checked, streaming
    prepare_processing(...)     the one step that changes the tokenizer and processor (tuning.data.processing)
    build_datasets(...)         every sample encoded into the cache (or read from it); bad data stops the run here
    build_model(...)            loaded, quantized, frozen; LoRA or trainable token rows attached
    build_trainer(...)          the trainer, its collator and its callbacks
    record(...)                 the run's arguments and data report in the output folder
    run(...)                    training; a signal saves a checkpoint and stops with the command that resumes
    save(...)                   the model or adapter, with its tokenizer or processor and its picture options

bench/ and the tests call these phases rather than assembling a trainer themselves. A preference stage shares every
phase but build_trainer.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers

from tuning.attention import PACKED_SDPA, attend_per_sample, supported_attention
from tuning.callbacks import LossPlotCallback, SampleGenerationCallback, StopOnSignal, ThroughputCallback, TileMLPs
from tuning.checkpoints import RestoreFullWeights, resolve_resume, resume_command, save_final, save_run_args
from tuning.data.cache import CacheError
from tuning.data.collate import FlatteningCollator, PaddingCollator, PairCollator, UnpairedCollator
from tuning.data.dataset import (
    DataReport,
    PreferencePairs,
    ReadData,
    UnpairedExamples,
    default_workers,
    encode_dataset,
    read_conversations,
    sample_to_features,
)
from tuning.data.encode import Encoder
from tuning.data.errors import DataError, DataErrors
from tuning.data.media.resolution import tiles_problem
from tuning.data.processing import Processing, load_processing
from tuning.families import (
    GATED_MLP,
    UnsupportedFamily,
    family_of,
    is_vision_language,
    packed_positions,
    require_support,
)
from tuning.model import (
    LoadOptions,
    LoraOptions,
    attach_lora,
    compute_dtype,
    count_parameters,
    load_model,
    resize_for_tokenizer,
    reward_model_class,
    set_trainable,
    untrained_token_ids,
    vision_parts,
)
from tuning.preference import (
    KTOTrainer,
    PreferenceTrainer,
    Reference,
    RewardTrainer,
    frozen_copy,
    with_reference_adapter,
)
from tuning.runtime import (
    deepspeed_state_on_cpu,
    is_zero3,
    leave_distributed,
    prepare_host_memory,
    prepare_process_group,
)
from tuning.trainer import SupervisedTrainer

logger = logging.getLogger("finetune")
PROG = "finetune.py"


@dataclass
class RunArguments:
    """The four argument groups of a run, and what settle_arguments changed in them."""

    model: object
    data: object
    training: object
    lora: object
    preference: object = None  # tuning.preference.PreferenceArguments, read by --stage dpo
    adjustments: list[str] = field(default_factory=list)

    @property
    def stage(self) -> str:
        return getattr(self.data, "stage", "sft")


# -- arguments ----------------------------------------------------------------------------------------------------


def settle_arguments(values: dict) -> list[str]:
    """Every change the run makes to its arguments, made here on the parsed values before the argument groups are
    built and anything is loaded; returns each change with its reason, for the log."""
    changes = []

    def change(name: str, value, reason: str) -> None:
        values[name] = value
        changes.append(f"--{name} {value}: {reason}")

    if values.get("model_name_or_path") is None:
        from tuning.tiny import ensure_tiny

        change("model_name_or_path", str(ensure_tiny("vl")), "no model given, so the tiny offline demo model")
    if not torch.cuda.is_available() and values.get("deepspeed"):
        values["accelerator_config"] = deepspeed_state_on_cpu()
        changes.append("DeepSpeed over gloo: on a machine without GPUs accelerate would count every rank as rank 0")
    if not torch.cuda.is_available() and not values.get("deepspeed"):
        # Without it transformers treats torchrun ranks on a CPU machine as separate single-process runs: every
        # rank trained on the same samples and wrote the same folder. With it, gloo DDP. (DeepSpeed sets up its
        # own CPU accelerator, and use_cpu would switch DeepSpeed off.)
        change("use_cpu", True, "no GPU: torchrun's ranks then train together over gloo")
    if values.get("eval_data_path") and values.get("eval_strategy") in (None, "no"):
        change("eval_strategy", "steps", "eval data given means evaluate, at --eval_steps (or every logging step)")
    if values.get("use_liger_kernel") and values.get("loss_impl") != "plain":
        change("loss_impl", "plain", "Liger's fused linear cross-entropy replaces the chunked loss")
    if values.get("gradient_checkpointing") and values.get("gradient_checkpointing_kwargs") is None:
        reason = "the reentrant kind loses the gradients of layers whose inputs need none (frozen embeddings)"
        change("gradient_checkpointing_kwargs", {"use_reentrant": False}, reason)
    _activation_checkpointing_names(values)
    if values.get("dataloader_num_workers") is None:
        values["dataloader_num_workers"] = dataloader_workers(torch.cuda.is_available())
        if values["dataloader_num_workers"]:
            changes.append(
                f"--dataloader_num_workers {values['dataloader_num_workers']}: batches and their pixel "
                "values are prepared beside the GPU"
            )
    config = _config_or_none(values["model_name_or_path"], values.get("trust_remote_code", False))
    if config is not None:
        changes += _settle_for_model(values, config)
    if values.get("packing") and values.get("include_num_input_tokens_seen") == "non_padding":
        change("include_num_input_tokens_seen", "all", "a packed batch has no padding (and no mask to count it by)")
    return changes


def dataloader_workers(gpu: bool) -> int:
    """On a GPU up to 4 workers a rank, within the cores its node's ranks share; on a CPU none: the training
    takes every core, and workers would only compete with it."""
    if not gpu:
        return 0
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(4, default_workers() // ranks_here - 1))


def _activation_checkpointing_names(values: dict) -> None:
    """--gradient_checkpointing keeps its name (the Qwen scripts'); transformers 5.24 calls it activation
    checkpointing and warns on the old name, so the value moves to the new one where the Trainer has it."""
    for old, new in (
        ("gradient_checkpointing", "activation_checkpointing"),
        ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"),
    ):
        if new in values and values[new] is None and values.get(old) is not None:
            values[new], values[old] = values[old], None


def _settle_for_model(values: dict, config) -> list[str]:
    family = family_of(config)
    try:
        require_support(family)
    except UnsupportedFamily as e:
        raise SystemExit(f"{PROG}: {e}") from None
    if values.get("image_max_tiles") is not None and (problem := tiles_problem(family.tiles, family.name)):
        raise SystemExit(f"{PROG}: {problem}")
    if values.get("stage") == "rm":
        try:
            reward_model_class(config)
        except ValueError as e:
            raise SystemExit(f"{PROG}: {e}") from None
    changes = []
    attention, why = supported_attention(config, values.get("attn_implementation"))
    if why:
        values["attn_implementation"] = attention
        changes.append(why)
    if values.get("ddp_find_unused_parameters") is None and is_vision_language(config):
        values["ddp_find_unused_parameters"] = True
        changes.append("--ddp_find_unused_parameters True: text-only batches leave the vision tower out of the graph")
    if values.get("packing") and not family.packs_exactly:
        values["packing"] = False
        changes.append(f"--packing False: {family.name} does not pack exactly ({family.why_not_packed})")
    return changes


def _config_or_none(model: str, trust_remote_code: bool):
    """The model's config, or None where it cannot be read yet (loading the model says why, later)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None


# -- the phases ---------------------------------------------------------------------------------------------------


def start(args: RunArguments) -> str | None:
    """Logging (rank 0 tells), the output folder's rules, the seed, the process group; the checkpoint to resume."""
    logging.basicConfig(level=logging.INFO if args.training.process_index == 0 else logging.WARNING)
    for line in args.adjustments:
        logger.info("arguments: %s", line)
    training = args.training
    resume = resolve_resume(training.output_dir, training.resume_from_checkpoint, training.overwrite_output_dir)
    transformers.set_seed(training.seed)  # LoRA and new rows are initialised before the Trainer seeds
    prepare_process_group(training)
    return resume


@dataclass
class DataRead:
    train: ReadData
    eval: ReadData | None
    cache_root: Path | None = None  # --dataset_cache_dir, made; None when off

    @property
    def uses_grounding(self) -> bool:
        return self.train.uses_grounding or bool(self.eval and self.eval.uses_grounding)


def read_data(args: RunArguments) -> DataRead:
    """Every record of the train and eval files counted and checked, streaming them (or the count of the same files
    read from the cache), before anything is loaded."""
    data, wait, tell = args.data, waits_for_node(args.training), args.training.process_index == 0
    try:
        root = data.cache_root()
        train = read_conversations(data.data_path, data.ignore_unknown_fields, root, wait, tell, data.stage)
        held_out = (
            read_conversations(data.eval_data_path, data.ignore_unknown_fields, root, wait, tell, data.stage)
            if data.eval_data_path
            else None
        )
    except (FileNotFoundError, CacheError) as e:
        raise SystemExit(f"{PROG}: the data cannot be used: {e}") from None
    return DataRead(train, held_out, root)


def waits_for_node(training_args) -> bool:
    """Whether this rank waits for the first rank of its node to read and encode the data (and then memory-maps
    what it wrote) rather than doing the same work again."""
    return training_args.world_size > 1 and training_args.local_process_index != 0


def prepare_processing(args: RunArguments, data: DataRead) -> Processing:
    """The model's tokenizer and processor, changed for this run in the one step that changes them."""
    loaded = load_processing(args.model.model_name_or_path, args.model.trust_remote_code)
    return args.data.processing(loaded, data.uses_grounding)


@dataclass
class Datasets:
    encoder: Encoder
    train: object
    report: DataReport
    eval: object | None = None
    eval_report: DataReport | None = None


def build_datasets(args: RunArguments, data: DataRead, processing: Processing) -> Datasets:
    """Every sample encoded before a model is loaded (or read from the cache an earlier run filled): bad data stops
    the run here, with every problem listed, and not hours into training."""
    encoder = args.data.encoder(processing)
    train, report = _encoded(args, data, data.train, encoder, args.data.skip_bad_samples)
    report.added_tokens = processing.added_tokens
    logger.info(report.summary())
    datasets = Datasets(encoder, _as_stage(args, train), report)
    if data.eval is not None:
        held_out, datasets.eval_report = _encoded(args, data, data.eval, encoder, False)
        datasets.eval = _as_stage(args, held_out)
        logger.info(datasets.eval_report.summary())
    return datasets


# what each preference stage trains: its items (over the encoded samples), their collator (over the SFT one), its
# trainer; SFT and pt train the samples one by one
PREFERENCE_STAGES = {
    "dpo": (PreferencePairs, PairCollator, PreferenceTrainer),
    "kto": (UnpairedExamples, UnpairedCollator, KTOTrainer),
    "rm": (PreferencePairs, PairCollator, RewardTrainer),
}


def _as_stage(args: RunArguments, samples):
    """The encoded samples as the stage trains them: one by one (SFT), as chosen and rejected pairs (DPO, reward
    models), or as completions with a desirable label (KTO)."""
    return PREFERENCE_STAGES[args.stage][0](samples) if args.stage in PREFERENCE_STAGES else samples


def _encoded(args: RunArguments, data: DataRead, read: ReadData, encoder: Encoder, skip_bad_samples: bool):
    # without a cache each rank encodes into its own temporary folder: there is nothing to share
    wait = data.cache_root is not None and waits_for_node(args.training)
    try:
        return encode_dataset(
            read,
            encoder,
            cache_root=data.cache_root,
            skip_bad_samples=skip_bad_samples,
            workers=args.data.preprocessing_num_workers,
            show_progress=args.training.process_index == 0,
            wait=wait,
        )
    except (DataError, DataErrors) as e:
        raise SystemExit(f"{PROG}: the data cannot be used: {e}") from None


def build_model(args: RunArguments, processing: Processing):
    """The model, with room for the tokens the processing step added; LoRA (and the token rows that need training)
    or the parts that train in full."""
    model_args, training, lora = args.model, args.training, args.lora
    zero3 = is_zero3(training)
    # n_gpu reads 1 under DeepSpeed on a CPU machine: ask torch whether there is a GPU to place the 4-bit model on
    device_map = {"": training.local_process_index} if lora.q_lora and torch.cuda.is_available() else None
    model = load_model(
        LoadOptions(
            model_args.model_name_or_path,
            trust_remote_code=model_args.trust_remote_code,
            attn_implementation=model_args.attn_implementation,
            dtype=compute_dtype(training.bf16, training.fp16),
            q_lora=lora.q_lora,
            zero3=zero3,
            device_map=device_map,
            reward=args.stage == "rm",
        )
    )
    resize_for_tokenizer(model, processing.tokenizer)
    if args.stage == "rm":  # the classifier pools a padded row at its last token that is no padding
        model.config.pad_token_id = pad_id(processing.tokenizer)
    if args.data.packing and attend_per_sample(model):
        logger.info("attention: %s (one causal sdpa call per packed sample, no mask)", PACKED_SDPA)
    if training.use_lora:
        tokenizer = processing.tokenizer
        token_ids = untrained_token_ids(model, tokenizer, processing.template_tokens(), processing.added_tokens)
        if token_ids:
            logger.info("training the embedding rows of tokens %s", tokenizer.convert_ids_to_tokens(token_ids))
        model = attach_lora(
            model,
            lora_options(args),
            token_ids,
            quantized=lora.q_lora or getattr(model, "is_quantized", False),
            checkpointing=training.gradient_checkpointing,
            zero3=zero3,
            reward=args.stage == "rm",
        )
    else:
        set_trainable(model, model_args.fix_vit, model_args.tune_projector)
    logger.info("parameters: %s", count_parameters(model))
    return model


def lora_options(args: RunArguments) -> LoraOptions:
    lora = args.lora
    return LoraOptions(
        r=lora.lora_r,
        expert_r=lora.lora_expert_r,
        alpha=lora.lora_alpha,
        dropout=lora.lora_dropout,
        bias=lora.lora_bias,
        target_modules=lora.lora_target_modules,
        weight_path=lora.lora_weight_path,
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        include_vision=lora.lora_vision,
        tune_projector=args.model.tune_projector,
    )


def build_trainer(
    args: RunArguments, processing: Processing, datasets: Datasets, model, resume: str | None, callbacks=()
) -> SupervisedTrainer | PreferenceTrainer:
    """The stage's trainer (SFT, or a preference stage's: PREFERENCE_STAGES) on the same parts, collator and
    callbacks."""
    training = args.training
    family = family_of(model.config)
    collator = collator_for(model, datasets.encoder, args.data.packing, training.world_size)
    common = dict(
        model=model,
        args=training,
        train_dataset=datasets.train,
        eval_dataset=datasets.eval,
        callbacks=[
            *standard_callbacks(training, resume, datasets.encoder),
            *mlp_tiling(training, is_zero3(training), family.gated_mlp),
            StopOnSignal(),
            *callbacks,
        ],
        on_nonfinite=training.on_nonfinite,
        lr_by_prefix=learning_rates_by_part(model, training),
        loss_impl=training.loss_impl,
        max_tokens_per_batch=args.data.max_tokens_per_batch,
    )
    if args.stage not in PREFERENCE_STAGES:
        return SupervisedTrainer(**common, data_collator=collator)
    _, wrap, trainer = PREFERENCE_STAGES[args.stage]
    reference = build_reference(args, model)
    loss = args.preference.pref_loss if args.stage == "dpo" else args.stage
    logger.info("preference: %s, reference: %s", loss, describe_reference(reference))
    return trainer(**common, data_collator=wrap(collator), preference=args.preference, reference=reference)


def build_reference(args: RunArguments, model) -> Reference:
    """The reference the preference loss compares with: the starting weights, by construction."""
    preference, precompute = args.preference, args.preference.precompute_ref_log_probs
    if args.stage == "rm" or (args.stage == "dpo" and not preference.needs_reference):
        return Reference("none")
    if preference.ref_model:
        options = LoadOptions(
            preference.ref_model,
            trust_remote_code=args.model.trust_remote_code,
            attn_implementation=args.model.attn_implementation,
            dtype=compute_dtype(args.training.bf16, args.training.fp16),
        )
        reference = load_model(options)
        if args.data.packing:
            attend_per_sample(reference)  # packed rows, as the policy reads them
        reference.requires_grad_(False)
        return Reference("model", reference.eval(), precompute)
    if args.training.use_lora:
        # continuing from an adapter, the reference is that adapter as it starts, not the bare base (LLaMA-Factory
        # #8974, ms-swift #8047: loss 0 and accuracy 1.0 from step 5): computed before the first step, or (KTO,
        # whose KL term pairs each batch's own prompts and answers) that adapter kept frozen beside the trained one
        if args.lora.lora_weight_path and args.stage == "kto":
            with_reference_adapter(model, args.lora.lora_weight_path)
            return Reference("adapter")
        return Reference("policy" if args.lora.lora_weight_path else "adapter-off", precompute=precompute)
    if precompute:
        return Reference("policy", precompute=True)
    return Reference("model", frozen_copy(model))


def describe_reference(reference: Reference) -> str:
    what = {
        "adapter-off": "the model with its adapter switched off",
        "policy": "the model as it starts, computed before the first step",
        "adapter": "the adapter the run starts from, kept frozen beside the trained one",
        "model": "a frozen model of its own",
        "none": "none",
    }[reference.kind]
    return what + (" (precomputed)" if reference.precompute and reference.kind != "policy" else "")


def collator_for(model, encoder: Encoder, packing: bool, world_size: int):
    token_types, rows = encoder.media.token_types_input, encoder.family.media_rows_per_sample
    if not packing:
        return PaddingCollator(pad_id(encoder.tokenizer), token_types=token_types, rows_per_sample=rows)
    placeholder = None
    if world_size > 1 and encoder.image_processor is not None:
        # ranks must reduce the same parameters: a rank whose batch has no picture would leave the projector out
        placeholder = sample_to_features(encoder.placeholder_image_sample())
    return FlatteningCollator(packed_positions(model), placeholder, token_types=token_types, rows_per_sample=rows)


def pad_id(tokenizer) -> int:
    """The id that fills a padded batch: the pad token, else eos (Llama 3 and Mistral ship no pad token; padding is
    masked out of the attention and the loss, so which id fills it changes nothing)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


def standard_callbacks(training_args, resume: str | None, encoder: Encoder) -> list:
    callbacks = [ThroughputCallback(training_args.world_size), LossPlotCallback()]
    if training_args.sample_prompts:
        prompts, every = training_args.sample_prompts, training_args.sample_steps
        callbacks.append(SampleGenerationCallback(prompts, every, encoder))
    if resume and not training_args.use_lora and not training_args.deepspeed:  # DeepSpeed restores its own way
        callbacks.append(RestoreFullWeights(resume))
    return callbacks


def learning_rates_by_part(model, training_args) -> dict[str, float]:
    """Parameter-name prefixes with their own learning rate: projector first, as it sits inside the tower."""
    towers, projectors = vision_parts(model)
    rates = {}
    if training_args.projector_lr is not None:
        rates.update(dict.fromkeys(projectors, training_args.projector_lr))
    if training_args.vision_lr is not None:
        rates.update(dict.fromkeys(towers, training_args.vision_lr))
    return rates


def mlp_tiling(training_args, zero3: bool, projections: tuple[str, str, str] = GATED_MLP) -> list[TileMLPs]:
    """Tiled MLPs follow --gradient_checkpointing unless --tiled_mlp says otherwise. ZeRO-3 gathers an MLP's weights
    only inside its own hooks, and tiling hands them to an autograd Function directly (measured: the ranks
    deadlock). DDP, ZeRO-2 and FSDP train the same with it (tested)."""
    wanted = training_args.tiled_mlp
    if wanted is None:
        wanted = training_args.gradient_checkpointing
    if not wanted:
        return []
    if zero3:
        logger.info("mlp: not tiled under ZeRO-3")
        return []
    return [TileMLPs(training_args.mlp_tile_tokens, projections)]


def record(args: RunArguments, datasets: Datasets) -> None:
    """The run's arguments (run_args.json) and what happened to every sample (data_report.json)."""
    if args.training.process_index == 0:
        output_dir = args.training.output_dir
        save_run_args(output_dir, model=args.model, data=args.data, training=args.training, lora=args.lora)
        datasets.report.save(os.path.join(output_dir, "data_report.json"))


def run(trainer: SupervisedTrainer, resume: str | None, argv: list[str]) -> None:
    """Train. A SIGTERM or SIGINT saves a checkpoint at the end of its step and exits with 128 + the signal,
    printing the command that resumes the run."""
    prepare_host_memory(trainer.args.device)
    trainer.model.train()  # before any forward: a 4-bit model evaluated first switches to an inference-only layout
    trainer.train(resume_from_checkpoint=resume)
    stop = next(c for c in trainer.callback_handler.callbacks if isinstance(c, StopOnSignal))
    if stop.received:
        output_dir = trainer.args.output_dir
        if trainer.is_world_process_zero():
            checkpoint = os.path.join(output_dir, f"checkpoint-{stop.saved_at}")
            print(
                f"\n{signal.Signals(stop.received).name}: stopped at step {stop.saved_at} and saved {checkpoint}. "
                f"Resume with:\n  {resume_command(argv)}",
                file=sys.stderr,
            )
        leave_distributed(128 + stop.received)
        raise SystemExit(128 + stop.received)


def save(trainer: SupervisedTrainer, processing: Processing) -> None:
    """The model or adapter, its tokenizer or processor beside it, and how pictures were resized (the chat and the
    demo resize the same way)."""
    output_dir = trainer.args.output_dir
    save_final(trainer, processing.saved, output_dir)
    if processing.media is not None and trainer.is_world_process_zero():
        processing.media.save(output_dir)
    logger.info("saved to %s", output_dir)
