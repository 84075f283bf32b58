"""Load a model, quantize it, choose what trains, attach LoRA.

What a family names its vision tower and projector comes from its record (tuning.families), found from the
model's config, never from its path or name.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig

from tuning.attention import supported_attention
from tuning.families import family_of, is_vision_language
from tuning.runtime import gptqmodel_only_for

logger = logging.getLogger(__name__)

OUTPUT_HEADS = ("lm_head", "score")  # a causal LM's head, a reward model's (sequence classifier's) head
# bitsandbytes 4/8-bit, and every GPTQ kernel of gptqmodel (they derive from BaseQuantLinear)
QUANTIZED_LINEARS = ("Linear4bit", "Linear8bitLt", "QuantLinear", "BaseQuantLinear")
ALL_LINEAR = "all-linear"
# where a config keeps its count of routed experts (each family names it its own way)
EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


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
    reward: bool = False  # a reward model: the family's sequence classifier with one label (as TRL's RewardTrainer)


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
    if options.reward:
        model_class, kwargs["num_labels"] = reward_model_class(config), 1
    # A checkpoint saved quantized (bitsandbytes, AWQ, ...) brings its own config; ours would clash with it.
    if (quantization := quantization_config(options, config)) is not None:
        kwargs["quantization_config"] = quantization
    attention, why = supported_attention(config, options.attn_implementation)
    if why:
        logger.info("attention: %s", why)
    if attention:
        kwargs["attn_implementation"] = attention
    if options.device_map is not None and not options.zero3:
        kwargs["device_map"] = options.device_map
    elif kwargs.get("quantization_config") is not None and not torch.cuda.is_available() and not options.zero3:
        kwargs["device_map"] = {"": "cpu"}  # else the quantizer looks for the GPU of the launcher's local rank
    model = model_class.from_pretrained(options.model_name_or_path, **kwargs)
    set_use_cache(model, False)  # a cache defeats packed-sequence masks and wastes memory in training
    return model


def reward_model_class(config):
    """The family's sequence classifier, which a reward model is (a score head on the last token's hidden state);
    a ValueError naming the family where transformers has none."""
    from transformers import AutoModelForSequenceClassification
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    if type(config) not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING:
        raise ValueError(
            f"--stage rm: transformers has no sequence-classification model for {config.model_type}, so no reward "
            "model can be built from it; use a text model of a family that has one (Qwen2, Qwen3, Llama, Mistral, "
            "Gemma, ...), or --stage dpo, which needs no reward model"
        )
    return AutoModelForSequenceClassification


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


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or any(c.__name__ in QUANTIZED_LINEARS for c in type(module).__mro__)


def unwrapped(name: str) -> str:
    """A module or parameter name as in the bare model, without PEFT's wrapper levels."""
    return name.removeprefix("base_model.model.").replace(".base_layer", "")


def _shape(module: nn.Module, leaf: str, param: torch.Tensor) -> tuple[int, ...]:
    if leaf == "weight" and is_linear(module):  # a 4-bit weight is stored packed; its layer knows the real shape
        return module.out_features, module.in_features
    return tuple(getattr(param, "ds_shape", param.shape))  # ZeRO-3 leaves an empty tensor and the shape beside it


@dataclass(frozen=True)
class MoeParts:
    """Where a mixture-of-experts model keeps its fused experts and its routers (names as in the bare model)."""

    experts: dict[str, tuple[str, ...]]  # experts module -> its fused expert parameters, each (experts, ., .)
    routers: dict[str, tuple[str, ...]]  # router module -> its (experts, hidden) matrices, relative names

    def expert_parameters(self) -> list[str]:
        return [f"{module}.{leaf}" for module, leaves in self.experts.items() for leaf in leaves]


def moe_parts(model: nn.Module, expert_names: tuple[str, ...] = (), router_names: tuple[str, ...] = ()) -> MoeParts:
    """The fused experts and their routers, by the leaf names given (a family record's), else by shape: an expert
    parameter is a 3-D float tensor whose first dimension is the expert count (its module's num_experts or a
    count in the config), owned by a module that is not one of torch's layers; a router is a sibling of the experts
    module whose matrices have one row per expert. Works on the bare model and on a PEFT model."""
    text = model.config.get_text_config()
    counts = {getattr(text, f) for f in EXPERT_COUNT_FIELDS if isinstance(getattr(text, f, None), int)}
    modules = {unwrapped(name): module for name, module in model.named_modules()}  # the innermost module wins
    owned: dict[str, dict[str, tuple[int, ...]]] = {}  # module -> {parameter: shape}; integers only if packed
    for name, param in model.named_parameters():
        owner, _, leaf = unwrapped(name).rpartition(".")
        if ".lora_" not in f".{owner}" and owner in modules and (param.is_floating_point() or leaf == "weight"):
            owned.setdefault(owner, {})[leaf] = _shape(modules[owner], leaf, param)

    def is_expert(owner: str, leaf: str, shape: tuple[int, ...]) -> bool:
        if len(shape) != 3 or type(modules[owner]).__module__.startswith("torch."):
            return False
        if expert_names:
            return leaf in expert_names
        return shape[0] > 1 and shape[0] in counts | {getattr(modules[owner], "num_experts", 0)}

    experts = {}
    for owner, leaves in owned.items():
        if found := tuple(leaf for leaf, shape in leaves.items() if is_expert(owner, leaf, shape)):
            experts[owner] = found
    routers = {}
    for owner, leaves in experts.items():
        shape = owned[owner][leaves[0]]
        parent = owner.rpartition(".")[0]
        for sibling in [m for m in modules if m.rpartition(".")[0] == parent and m != owner and m not in experts]:
            inside = {
                f"{module}.{leaf}".removeprefix(sibling + "."): found
                for module, leaves_of in owned.items()
                if module == sibling or module.startswith(sibling + ".")
                for leaf, found in leaves_of.items()
            }
            if router_names:
                scores = sibling.rpartition(".")[2] in router_names
            else:  # one row per expert, over one of the experts' own dimensions (the hidden size); a bias beside
                scores = any(len(s) == 2 for s in inside.values()) and all(
                    s[0] == shape[0] and (len(s) == 1 or (len(s) == 2 and s[1] in shape[1:])) for s in inside.values()
                )
            if scores:
                routers[sibling] = tuple(name for name, s in inside.items() if len(s) == 2)
    return MoeParts(experts, routers)


def family_moe_names(config) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(expert parameter names, router names) from the family record, where it names them; else found by shape."""
    family = family_of(config)
    return tuple(getattr(family, "expert_parameters", ())), tuple(getattr(family, "routers", ()))


@dataclass(frozen=True)
class LoraTargets:
    modules: str | list[str]  # PEFT target_modules: a regex over linear layers ([]: none)
    experts: list[str]  # fused expert parameters, by name suffix (PEFT target_parameters)
    routers: list[str] = field(default_factory=list)  # router matrices that are no linear layer (the same)
    named_experts: bool = False  # the experts or such a router were asked for by name, not by default

    @property
    def parameters(self) -> list[str]:
        return self.experts + self.routers


def lora_targets(
    model: nn.Module,
    targets: list[str] | None,
    include_vision: bool,
    include_projector: bool = False,
    moe: MoeParts | None = None,
) -> LoraTargets:
    """What LoRA adapts: the named (default: all) linear layers and fused expert parameters of the language model,
    never the output head, the routers only if named, the vision tower only if asked, the projector only if asked
    (it is usually trained in full instead).

    A name is the last part of a linear layer's name (q_proj), of an expert parameter's (gate_up_proj), of an experts
    module's (experts: all its parameters) or of a router's (gate, router); all-linear stands for the default and
    may be combined with router names. Layer numbers become \\d+ so the regex stays short."""
    towers, projectors = vision_parts(model)
    moe = moe or moe_parts(model, *family_moe_names(model.config))

    def allowed(name: str) -> bool:
        if name.rsplit(".", 1)[-1] in OUTPUT_HEADS:
            return False
        if any(name == p or name.startswith(p + ".") for p in projectors):
            return include_projector
        if any(name.startswith(t + ".") for t in towers):
            return include_vision
        return True

    def leaf(name: str) -> str:
        return name.rsplit(".", 1)[-1]

    linears = {name for name, module in model.named_modules() if is_linear(module) and allowed(name)}
    routers = {r: names for r, names in moe.routers.items() if allowed(r)}
    in_router = {f"{r}.{n}".rpartition(".")[0]: r for r, names in routers.items() for n in names}  # matrix owner
    expert_params = {f"{m}.{p}": (m, p) for m, ps in moe.experts.items() if allowed(m) for p in ps}
    plain_linears = sorted(n for n in linears if n not in in_router)
    wanted = set(targets or [ALL_LINEAR])
    by_default = ALL_LINEAR in wanted
    known = {
        "linear layers": {leaf(n) for n in plain_linears},
        "expert parameters": {p for _, p in expert_params.values()},
        "experts modules (all their parameters)": {leaf(m) for m, _ in expert_params.values()},
        "routers": {leaf(r) for r in routers},
    }
    if missing := sorted(wanted - {ALL_LINEAR} - set().union(*known.values())):
        listed = "; ".join(f"{kind}: {', '.join(sorted(names))}" for kind, names in known.items() if names)
        everything = "every linear layer and expert parameter but the routers" if expert_params else "all of them"
        raise ValueError(
            f"--lora_target_modules {' '.join(missing)} matches nothing in this model ({listed}; or {ALL_LINEAR}: "
            f"{everything})"
        )
    chosen_routers = [r for r in routers if leaf(r) in wanted]
    router_matrices = [f"{r}.{n}" for r in chosen_routers for n in routers[r]]
    modules = [n for n in plain_linears if by_default or leaf(n) in wanted]
    modules += sorted({m.rpartition(".")[0] for m in router_matrices} & linears)
    experts = [p for p, (m, name) in expert_params.items() if by_default or {name, leaf(m)} & wanted]
    router_params = [m for m in router_matrices if m.rpartition(".")[0] not in linears]  # a router of its own kind
    named = bool(router_params) or any({p, leaf(m)} & wanted for m, p in expert_params.values())
    patterns = sorted({re.sub(r"\\.\d+\\.", r"\\.\\d+\\.", re.escape(name)) for name in modules})
    regex = "^(?:" + "|".join(patterns) + ")$" if patterns else []
    return LoraTargets(regex, _parameter_keys(model, experts), _parameter_keys(model, router_params), named)


def _parameter_keys(model: nn.Module, chosen: list[str]) -> list[str]:
    """PEFT matches target parameters by name suffix: the names past their layer number where those pick out
    exactly the chosen parameters (short adapter configs), else the full names."""
    tails = sorted({re.split(r"\.\d+\.", name)[-1] for name in chosen})
    picked = {n for n, _ in model.named_parameters() if any(n == t or n.endswith("." + t) for t in tails)}
    return tails if picked == set(chosen) else sorted(chosen)


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


def attention_modules(model: nn.Module) -> list[str]:
    """The language model's attention blocks (linear attention too): the outermost modules with children whose
    name or class says attention, outside the vision tower and projector."""
    towers, projectors = vision_parts(model)
    vision = tuple(unwrapped(name) + "." for name in towers + projectors)
    found: list[str] = []
    for qualified, module in model.named_modules():
        name = unwrapped(qualified)
        said = re.search("attn|attention", f"{name.rpartition('.')[2]} {type(module).__name__}", re.IGNORECASE)
        inside = (name + ".").startswith(vision) or any(name == f or name.startswith(f + ".") for f in found)
        if said and next(module.children(), None) is not None and not inside:
            found.append(name)
    return found


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Totals, then the attention and, in an MoE, the experts and the routers apart, each with its trainable part
    (a LoRA weight counts with the layer it adapts). A 4-bit weight counts its packed elements."""
    named = [(unwrapped(n), p) for n, p in model.named_parameters()]
    counts = {
        "total": sum(p.numel() for _, p in named),
        "trainable": sum(p.numel() for _, p in named if p.requires_grad),
        "lora": sum(p.numel() for n, p in named if p.requires_grad and "lora_" in n),
        "token_rows": sum(p.numel() for n, p in named if p.requires_grad and "token_adapter" in n),
    }
    parts = {"attention": set(attention_modules(model))}
    moe = moe_parts(model, *family_moe_names(model.config))
    if moe.experts:
        parts.update(experts=set(moe.experts), router=set(moe.routers))

    def owners(name: str) -> set[str]:
        pieces = name.split(".")
        return {".".join(pieces[:i]) for i in range(1, len(pieces))}

    for part, modules in parts.items():
        inside = [p for n, p in named if owners(n) & modules]
        counts[part] = sum(p.numel() for p in inside)
        counts[f"{part}_trainable"] = sum(p.numel() for p in inside if p.requires_grad)
    return counts


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
    # each expert gets its own rank-r pair: E experts train E times the LoRA of one dense MLP (None: r)
    expert_r: int | None = None
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


def prepare_quantized(model: nn.Module, moe: MoeParts, checkpointing: bool) -> nn.Module:
    """PEFT's k-bit preparation (base frozen, the rest of the 16-bit weights in fp32, checkpointing), except that
    fused experts keep their dtype: bitsandbytes quantizes only linear layers, so the experts, most of an MoE's
    weights, are still 16-bit, and fp32 would double them."""
    from peft import prepare_model_for_kbit_training

    method = quant_method(model.config)
    if not moe.experts or method != "bitsandbytes":
        with gptqmodel_only_for(method == "gptq"):
            return prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False}
            )
    experts = set(moe.expert_parameters())
    expert_bytes, expert_dtype = 0, None
    for name, param in model.named_parameters():
        if param.requires_grad:
            param.requires_grad = False
        if name in experts:
            expert_bytes, expert_dtype = expert_bytes + param.numel() * param.element_size(), param.dtype
        elif param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit":
            param.data = param.data.float()
    size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    logger.warning(
        "4-bit: bitsandbytes quantizes linear layers only; the fused experts stay in %s and hold %.1f of the "
        "model's %.1f MiB (%.0f%%)",
        str(expert_dtype).removeprefix("torch."),
        expert_bytes / 2**20,
        size / 2**20,
        100 * expert_bytes / size,
    )
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def linear_dropout(model: nn.Module, p: float) -> None:
    """Dropout on the input of every LoRA linear layer. PEFT refuses any dropout in a config that adapts
    parameters (it changes an expert's weight, never sees its input), so such a config says 0 and this adds it
    where it applies."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import ParamWrapper

    for module in model.modules():
        if isinstance(module, LoraLayer) and not isinstance(module, ParamWrapper):
            for adapter in module.lora_dropout:
                module.lora_dropout[adapter] = nn.Dropout(p)


def attach_lora(
    model: nn.Module,
    options: LoraOptions,
    token_ids: list[int],
    quantized: bool,
    checkpointing: bool,
    zero3: bool = False,
    reward: bool = False,
):
    """Wrap the model with LoRA (on fused MoE experts too); the projector (if tuned) as a full copy, new token rows
    as trainable rows.

    Under ZeRO-3 PEFT cannot copy a partitioned module for modules_to_save, so a tuned projector gets LoRA
    on its linear layers instead."""
    from peft import LoraConfig, get_peft_model

    moe = moe_parts(model, *family_moe_names(model.config))
    if quantized:
        model = prepare_quantized(model, moe, checkpointing)
    elif checkpointing:
        model.enable_input_require_grads()  # frozen embeddings would otherwise cut the graph at checkpoints
    if options.weight_path:
        logger.info("starting from the adapter in %s", options.weight_path)
        model = load_adapter(model, options.weight_path, trainable=True)
        if model.peft_config["default"].target_parameters and options.dropout:
            linear_dropout(model, options.dropout)
        return model
    _, projectors = vision_parts(model)
    full_projector = options.tune_projector and bool(projectors) and not zero3
    if options.tune_projector and projectors and zero3:
        logger.info("ZeRO-3: the projector trains through LoRA on its linear layers, not as a full copy")
    modules_to_save = projector_modules(model, projectors) if full_projector else None
    lora_projector = options.tune_projector and bool(projectors) and zero3
    targets = lora_targets(model, options.target_modules, options.include_vision, lora_projector, moe)
    parameters = adaptable_parameters(targets, options)
    expert_rank = [re.escape(p) for p in targets.experts if p in parameters] if options.expert_r else []
    config = LoraConfig(
        r=options.r,
        lora_alpha=options.alpha,
        rank_pattern=dict.fromkeys(expert_rank, options.expert_r),
        lora_dropout=0.0 if parameters else options.dropout,
        bias=options.bias,
        target_modules=targets.modules,
        target_parameters=parameters or None,
        modules_to_save=modules_to_save,
        trainable_token_indices={embedding_module_name(model): token_ids} if token_ids else None,
        use_dora=options.use_dora,
        use_rslora=options.use_rslora,
        # a reward model's score head trains in full beside the adapter (PEFT adds it to modules_to_save)
        task_type="SEQ_CLS" if reward else "CAUSAL_LM",
    )
    with gptqmodel_only_for(quant_method(model.config) == "gptq"):
        model = get_peft_model(model, config)
    if parameters and options.dropout:
        linear_dropout(model, options.dropout)
    return model


def adaptable_parameters(targets: LoraTargets, options: LoraOptions) -> list[str]:
    """The targeted parameters PEFT can adapt with these options, and a line on what it cannot do with them."""
    if not targets.parameters:
        return []
    if options.use_dora:
        if targets.named_experts:
            raise ValueError(
                "--use_dora cannot adapt fused expert parameters or a router that is no linear layer (PEFT's "
                "ParamWrapper has no DoRA): drop --use_dora, or name only linear layers in --lora_target_modules"
            )
        logger.info("DoRA on the linear layers only: PEFT has none for fused experts (without --use_dora they adapt)")
        return []
    dropout = f"; dropout {options.dropout:g} on the linear layers only" if options.dropout else ""
    logger.info("LoRA on fused parameters too: %s (no dropout there%s)", ", ".join(targets.parameters), dropout)
    return targets.parameters
