"""Merge a LoRA adapter into its base model and prove the merge is faithful.

    python merge_lora.py --adapter output/finetune_lora_ds --output output/merged

The base comes from the adapter's config, or --base (needed when the adapter was trained on a 4-bit
or GPTQ model: it merges into the unquantized base, in 16 or 32 bits). The merged folder holds
safetensors shards and the tokenizer/processor, and loads with the Auto classes without PEFT.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from tuning.data.media.resolution import SAVED_NAME
from tuning.data.processing import load_run_processing
from tuning.model import LoadOptions, is_gptq_checkpoint, load_adapter, load_model, resize_for_tokenizer

logger = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


class MergeError(Exception):
    pass


@dataclass
class MergeResult:
    output: Path
    max_logit_difference: float | None
    quantized_difference: float | None = None  # relative to the largest logit
    quantized_top1_agreement: float | None = None
    already_done: bool = False


def adapter_fingerprint(adapter: Path) -> str:
    digest = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        digest.update((adapter / name).read_bytes())
    return digest.hexdigest()[:16]


def read_adapter_config(adapter: Path) -> dict:
    config_file = adapter / "adapter_config.json"
    if not config_file.is_file():
        hint = ""
        if adapter.is_dir() and (adapter / "config.json").is_file():
            hint = " It holds a full model (config.json): there is nothing to merge."
        raise MergeError(f"{adapter} is not an adapter folder: no adapter_config.json.{hint}")
    if not (adapter / "adapter_model.safetensors").is_file():
        raise MergeError(f"{adapter} has no adapter_model.safetensors (only safetensors adapters are loaded)")
    return json.loads(config_file.read_text())


def base_of(adapter: Path, config: dict, base: str | None) -> str:
    chosen = base or config.get("base_model_name_or_path")
    if not chosen:
        raise MergeError(f"the adapter in {adapter} does not name its base model; pass --base MODEL")
    if not base and not Path(chosen).exists() and chosen.startswith(("/", ".")):
        raise MergeError(f"the adapter's base model {chosen} is missing (moved?); pass --base MODEL")
    return chosen


def was_quantized(adapter: Path) -> bool:
    run_args = adapter / "run_args.json"
    if run_args.is_file():
        return bool(json.loads(run_args.read_text()).get("lora", {}).get("q_lora"))
    return False


def probe_inputs(processing, count: int = 3) -> list[dict]:
    """A few chat prompts, tokenized with the model's template, to compare logits on."""
    tokenizer = getattr(processing, "tokenizer", processing)
    prompts = ["你好", "Who are you?", "Describe a red circle on a white background."][:count]
    batches = []
    for prompt in prompts:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        batches.append({"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"]})
    return batches


@torch.no_grad()
def logits_on(model, inputs: list[dict]) -> list[torch.Tensor]:
    model.eval()
    return [model(**batch).logits.float() for batch in inputs]


def max_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def relative_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """The largest logit difference as a fraction of the largest logit."""
    return max_difference(a, b) / max(float(x.abs().max()) for x in a)


def top1_agreement(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Share of positions where both models would pick the same next token."""
    same = sum(int((x.argmax(-1) == y.argmax(-1)).sum()) for x, y in zip(a, b, strict=True))
    return same / sum(x.shape[0] * x.shape[1] for x in a)


def load_with_adapter(base: str, adapter: Path, dtype: torch.dtype, tokenizer, q_lora: bool = False):
    model = load_model(LoadOptions(base, dtype=dtype, q_lora=q_lora))
    if getattr(model, "is_quantized", False) and not q_lora:
        raise MergeError(
            f"{base} is a quantized checkpoint; a merge needs the unquantized base: pass --base with the "
            "original 16-bit model"
        )
    resize_for_tokenizer(model, tokenizer)
    try:
        return load_adapter(model, str(adapter))
    except RuntimeError as e:
        if "size mismatch" in str(e):
            raise MergeError(
                f"the adapter in {adapter} does not fit {base}: shapes differ ({str(e).splitlines()[1].strip()}). "
                "Is --base the model the adapter was trained on?"
            ) from None
        raise


def merge(
    adapter: str | Path,
    output: str | Path,
    base: str | None = None,
    dtype: str = "fp32",
    max_shard_size: str = "2GB",
    overwrite: bool = False,
    verify: bool = True,
) -> MergeResult:
    adapter, output = Path(adapter), Path(output)
    config = read_adapter_config(adapter)
    base_model = base_of(adapter, config, base)
    fingerprint = adapter_fingerprint(adapter)
    stamp = output / "merge_info.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("adapter_fingerprint") == fingerprint and not overwrite:
        logger.info("%s already holds this adapter merged; nothing to do", output)
        return MergeResult(output, None, already_done=True)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise MergeError(f"{output} is not empty; pass --overwrite to replace it, or choose another --output")

    torch_dtype = DTYPES[dtype]
    tokenizer, processor, _ = load_run_processing(base_model, adapter)
    model = load_with_adapter(base_model, adapter, torch_dtype, tokenizer)
    inputs = probe_inputs(processor or tokenizer)
    before = logits_on(model, inputs) if verify else None
    merged = model.merge_and_unload()
    difference = max_difference(before, logits_on(merged, inputs)) if verify else None
    if difference is not None:
        logger.info("merged vs base+adapter: max logit difference %.3g", difference)
        if difference > TOLERANCE[torch_dtype]:
            raise MergeError(
                f"the merged model differs from base+adapter by {difference:.3g} (> {TOLERANCE[torch_dtype]})"
            )

    quantized_difference = agreement = None
    trained_on = config.get("base_model_name_or_path")
    gptq_base = trained_on if trained_on and trained_on != base_model and is_gptq_checkpoint(trained_on) else None
    if gptq_base or was_quantized(adapter):
        # the adapter learned on a 4-bit base: the merge goes into the unquantized weights; say how far apart
        quantized_base = gptq_base or base_model  # GPTQ: its own checkpoint; nf4: the base, quantized on load
        logger.info("the adapter was trained on a 4-bit base: merged into the unquantized %s in %s", base_model, dtype)
        quantized = load_with_adapter(quantized_base, adapter, torch_dtype, tokenizer, q_lora=True)
        four_bit, full = logits_on(quantized, inputs), logits_on(merged, inputs)
        quantized_difference, agreement = relative_difference(full, four_bit), top1_agreement(full, four_bit)
        logger.info(
            "merged vs 4-bit base+adapter (the base's 4-bit rounding): max logit difference %.1f%% of the largest "
            "logit, same next token at %.0f%% of positions",
            100 * quantized_difference,
            100 * agreement,
        )

    if output.exists():
        shutil.rmtree(output)
    merged.save_pretrained(output, max_shard_size=max_shard_size)
    (processor or tokenizer).save_pretrained(output)
    if (Path(adapter) / SAVED_NAME).is_file():  # how pictures and videos were resized in training
        shutil.copy(Path(adapter) / SAVED_NAME, Path(output) / SAVED_NAME)
    info = {
        "adapter": str(adapter),
        "base": base_model,
        "dtype": dtype,
        "adapter_fingerprint": fingerprint,
        "max_logit_difference": difference,
        "quantized_relative_difference": quantized_difference,
        "quantized_top1_agreement": agreement,
    }
    stamp.write_text(json.dumps(info, indent=2) + "\n")
    return MergeResult(output, difference, quantized_difference, agreement)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--adapter", required=True, help="folder with adapter_config.json and adapter_model.safetensors"
    )
    parser.add_argument("--output", required=True, help="folder for the merged model")
    parser.add_argument("--base", help="base model (default: the one named in the adapter's config)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights of the merged model")
    parser.add_argument("--max_shard_size", default="2GB", help="largest safetensors shard")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    parser.add_argument("--no_verify", action="store_true", help="skip the logits comparison")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = merge(
            args.adapter, args.output, args.base, args.dtype, args.max_shard_size, args.overwrite, not args.no_verify
        )
    except MergeError as e:
        print(f"merge_lora.py: error: {e}", file=sys.stderr)
        return 1
    if not result.already_done:
        print(f"merged model saved to {result.output}")
    return 0
