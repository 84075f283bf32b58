"""Load a model, quantize it, choose what trains, attach LoRA.

What a family names its vision tower and projector comes from its record (tuning.families), found from the
model's config, never from its path or name.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig

from tuning.families import family_of, is_vision_language
from tuning.runtime import gptqmodel_only_for

logger = logging.getLogger(__name__)

OUTPUT_HEADS = ("lm_head",)
# bitsandbytes 4/8-bit, and every GPTQ kernel of gptqmodel (they derive from BaseQuantLinear)
QUANTIZED_LINEARS = ("Linear4bit", "Linear8bitLt", "QuantLinear", "BaseQuantLinear")


def compute_dtype(bf16: bool, fp16: bool) -> torch.dtype:
    return torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32


@dataclass
class LoadOptions:
    model_name_or_path: str
    trust_remote_code: bool = False
    attn_implementation: str | None = "sdpa"
    dtype: torch.dtype = torch.float32
    q_lora: bool = False  # 4-bit nf4 with double quantisation
    load_in_8bit: bool = False  # LLM.int8(), for inference (the chat command and the web demo)
    zero3: bool = False
    device_map: dict | str | None = None


def quant_method(config) -> str | None:
    """How a checkpoint was saved quantized ("gptq", "bitsandbytes", ...), or None."""
    existing = getattr(config, "quantization_config", None)
    return existing.get("quant_method") if isinstance(existing, dict) else getattr(existing, "quant_method", None)


def quantization_config(options: LoadOptions, config):
    from transformers import BitsAndBytesConfig, GPTQConfig

    existing = getattr(config, "quantization_config", None)
    method = quant_method(config)
    if method is not None and method != "gptq":
        return None
    if method == "gptq":
        import importlib.util

        if importlib.util.find_spec("gptqmodel") is None:
            raise ImportError(
                f"{options.model_name_or_path} is a GPTQ checkpoint: loading it needs gptqmodel "
                "(pip install gptqmodel; auto-gptq is no longer maintained). Or train Q-LoRA on the unquantized "
                "model with --q_lora True, which quantizes it with bitsandbytes."
            )
        # The default CPU kernel is inference-only; "auto_trainable" picks a kernel with a backward pass.
        backend = "auto" if torch.cuda.is_available() else "auto_trainable"
        return GPTQConfig(bits=existing.get("bits", 4) if isinstance(existing, dict) else 4, backend=backend)
    if options.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    if not options.q_lora:
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=options.dtype,
        # ZeRO-3 shards parameters of one float dtype; storing the packed 4-bit weights in the dtype of the rest
        # of the model lets it shard them with everything else.
        bnb_4bit_quant_storage=(options.dtype or torch.float32) if options.zero3 else torch.uint8,
        # The vision side stays in full precision: it is small, and its projector trains in full.
        llm_int8_skip_modules=[rf".*{name}" for name in vision_module_names(config)] + list(OUTPUT_HEADS),
    )


def is_gptq_checkpoint(model_name_or_path: str) -> bool:
    """Whether a local model folder holds GPTQ weights (read from its config.json, never from its name)."""
    config = Path(model_name_or_path) / "config.json"
    if not config.is_file():
        return False
    quantization = json.loads(config.read_text()).get("quantization_config") or {}
    return quantization.get("quant_method") == "gptq"


def load_model(options: LoadOptions):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(options.model_name_or_path, trust_remote_code=options.trust_remote_code)
    model_class = AutoModelForImageTextToText if is_vision_language(config) else AutoModelForCausalLM
    kwargs = {
        "dtype": options.dtype,
        "trust_remote_code": options.trust_remote_code,
        "use_safetensors": True,  # never unpickle weights
    }
    # A checkpoint saved quantized (bitsandbytes, AWQ, ...) brings its own config; ours would clash with it.
    if (quantization := quantization_config(options, config)) is not None:
        kwargs["quantization_config"] = quantization
    if options.attn_implementation:
        kwargs["attn_implementation"] = options.attn_implementation
    if options.device_map is not None and not options.zero3:
        kwargs["device_map"] = options.device_map
    elif kwargs.get("quantization_config") is not None and not torch.cuda.is_available() and not options.zero3:
        kwargs["device_map"] = {"": "cpu"}  # else the quantizer looks for the GPU of the launcher's local rank
    model = model_class.from_pretrained(options.model_name_or_path, **kwargs)
    set_use_cache(model, False)  # a cache defeats packed-sequence masks and wastes memory in training
    return model


def load_adapter(model: nn.Module, adapter: str, trainable: bool = False):
    """A PEFT adapter on top of `model`. A local adapter must be safetensors: a pickled adapter_model.bin is
    refused rather than unpickled."""
    from peft import PeftModel

    folder = Path(adapter)
    if folder.is_dir() and not (folder / "adapter_model.safetensors").is_file():
        pickled = (
            " (it has a pickled adapter_model.bin, which is not loaded)"
            if (folder / "adapter_model.bin").is_file()
            else ""
        )
        raise FileNotFoundError(
            f"{adapter} holds no adapter_model.safetensors{pickled}; save the adapter with safetensors "
            "(PEFT's default) and try again"
        )
    with gptqmodel_only_for(quant_method(model.config) == "gptq"):
        return PeftModel.from_pretrained(model, adapter, is_trainable=trainable)


def set_use_cache(model: nn.Module, enabled: bool) -> None:
    """On the model's config and on its text config, which a VL model's language model reads."""
    model.config.use_cache = enabled
    model.config.get_text_config().use_cache = enabled


def submodule_names(model: nn.Module, names: tuple[str, ...]) -> list[str]:
    """Qualified names of the outermost modules whose own name is one of `names`."""
    found = []
    for qualified, _ in model.named_modules():
        leaf = qualified.rsplit(".", 1)[-1]
        if leaf in names and not any(qualified.startswith(f + ".") for f in found):
            found.append(qualified)
    return found


def vision_module_names(config) -> tuple[str, ...]:
    family = family_of(config)
    return (*family.vision_towers, *family.projectors)


def vision_parts(model: nn.Module) -> tuple[list[str], list[str]]:
    """(vision tower prefixes, projector prefixes), by the names the model's family record gives them. The
    projector sits inside the tower in Qwen-VL models."""
    family = family_of(model.config)
    return submodule_names(model, family.vision_towers), submodule_names(model, family.projectors)


def set_trainable(model: nn.Module, fix_vit: bool, tune_projector: bool) -> None:
    """Full fine-tuning: the language model trains; the vision tower unless fixed; the projector by flag."""
    towers, projectors = vision_parts(model)
    for name, param in model.named_parameters():
        if any(name.startswith(p + ".") for p in projectors):
            wanted = tune_projector
        elif any(name.startswith(t + ".") for t in towers):
            wanted = not fix_vit
        else:
            wanted = True
        # Integer tensors cannot train (and refuse even a no-op change): quantized storage, ZeRO-3 bookkeeping.
        if param.requires_grad != wanted and (param.is_floating_point() or param.is_complex()):
            param.requires_grad = wanted


def lora_target_regex(
    model: nn.Module, targets: list[str] | None, include_vision: bool, include_projector: bool = False
) -> str:
    """A PEFT target regex naming exactly the chosen linear layers: the named (or all) linear layers of the
    language model, never the output head, the vision tower only if asked, the projector only if asked
    (it is usually trained in full instead). Layer numbers become \\d+ so the regex stays short."""
    towers, projectors = vision_parts(model)

    def allowed(name: str) -> bool:
        if name.rsplit(".", 1)[-1] in OUTPUT_HEADS:
            return False
        if any(name == p or name.startswith(p + ".") for p in projectors):
            return include_projector
        if any(name.startswith(t + ".") for t in towers):
            return include_vision
        return True

    linears = [
        name
        for name, module in model.named_modules()
        if (isinstance(module, nn.Linear) or any(c.__name__ in QUANTIZED_LINEARS for c in type(module).__mro__))
        and allowed(name)
    ]
    leaves = sorted({name.rsplit(".", 1)[-1] for name in linears})
    wanted = leaves if not targets or targets == ["all-linear"] else targets
    if missing := [t for t in wanted if t not in leaves]:
        raise ValueError(
            f"--lora_target_modules {' '.join(missing)} not found among the model's linear layers ({', '.join(leaves)})"
        )
    chosen = [name for name in linears if name.rsplit(".", 1)[-1] in wanted]
    patterns = sorted({re.sub(r"\\.\d+\\.", r"\\.\\d+\\.", re.escape(name)) for name in chosen})
    return "^(?:" + "|".join(patterns) + ")$"


def untrained_token_ids(model: nn.Module, tokenizer, candidates: list[str], added: list[str]) -> list[int]:
    """Token rows that need training: tokens added for this run, and special tokens whose embedding row
    is far smaller than a typical row (never trained: e.g. ChatML tokens in a base model)."""
    embeddings = model.get_input_embeddings().weight
    if embeddings.numel() == 0:  # sharded away under ZeRO-3: only the added tokens are known to be new
        return sorted(tokenizer.convert_tokens_to_ids(added))
    norms = embeddings.detach().float().norm(dim=-1)
    typical = norms.median()
    ids = set(tokenizer.convert_tokens_to_ids(added))
    for token in candidates:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is not None and token_id < len(norms) and norms[token_id] < 0.1 * typical:
            ids.add(token_id)
    return sorted(ids)


def count_parameters(model: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
    tokens = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "token_adapter" in n)
    return {"total": total, "trainable": trainable, "lora": lora, "token_rows": tokens}


def resize_for_tokenizer(model: nn.Module, tokenizer) -> bool:
    """Grow the embedding (and tied head) when the data added tokens; new rows start at the mean row."""
    if len(tokenizer) <= model.get_input_embeddings().num_embeddings:
        return False
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64, mean_resizing=True)
    return True


def embedding_module_name(model: nn.Module) -> str:
    embeddings = model.get_input_embeddings()
    return next(name for name, module in model.named_modules() if module is embeddings).rsplit(".", 1)[-1]


@dataclass
class LoraOptions:
    r: int = 64
    alpha: int = 16
    dropout: float = 0.05
    bias: str = "none"
    target_modules: list[str] | None = None
    weight_path: str | None = None
    use_dora: bool = False
    use_rslora: bool = False
    include_vision: bool = False
    tune_projector: bool = True


def projector_modules(model: nn.Module, projectors: list[str]) -> list[str]:
    """Names PEFT can copy for modules_to_save: a ModuleList (Qwen3-VL's deepstack mergers) by its items."""
    modules = dict(model.named_modules())
    names = []
    for prefix in projectors:
        leaf = prefix.rsplit(".", 1)[-1]
        module = modules[prefix]
        if isinstance(module, nn.ModuleList):
            names += [f"{leaf}.{i}" for i in range(len(module))]
        else:
            names.append(leaf)
    return names


def attach_lora(
    model: nn.Module,
    options: LoraOptions,
    token_ids: list[int],
    quantized: bool,
    checkpointing: bool,
    zero3: bool = False,
):
    """Wrap the model with LoRA; the projector (if tuned) as a full copy, new token rows as trainable rows.

    Under ZeRO-3 PEFT cannot copy a partitioned module for modules_to_save, so a tuned projector gets LoRA
    on its linear layers instead."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        with gptqmodel_only_for(quant_method(model.config) == "gptq"):
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
    elif checkpointing:
        model.enable_input_require_grads()  # frozen embeddings would otherwise cut the graph at checkpoints
    if options.weight_path:
        logger.info("starting from the adapter in %s", options.weight_path)
        return load_adapter(model, options.weight_path, trainable=True)
    _, projectors = vision_parts(model)
    full_projector = options.tune_projector and bool(projectors) and not zero3
    if options.tune_projector and projectors and zero3:
        logger.info("ZeRO-3: the projector trains through LoRA on its linear layers, not as a full copy")
    modules_to_save = projector_modules(model, projectors) if full_projector else None
    lora_projector = options.tune_projector and bool(projectors) and zero3
    config = LoraConfig(
        r=options.r,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        bias=options.bias,
        target_modules=lora_target_regex(model, options.target_modules, options.include_vision, lora_projector),
        modules_to_save=modules_to_save,
        trainable_token_indices={embedding_module_name(model): token_ids} if token_ids else None,
        use_dora=options.use_dora,
        use_rslora=options.use_rslora,
        task_type="CAUSAL_LM",
    )
    with gptqmodel_only_for(quant_method(model.config) == "gptq"):
        return get_peft_model(model, config)
