"""SDPA for padding-free batches: each packed sample attends causally to itself, with no T x T mask.

Stock `sdpa` turns a flattened batch (one row, positions restarting at every sample) into a block-diagonal
boolean mask of T x T, which SDPA must read in full. Here every sample gets its own causal SDPA call, which
its fused kernels run without a mask: on a 2-core CPU 5.2x faster on 9 samples in 2,048 tokens and 11x on a
16,384-token pack, whose mask alone is 256 MiB (bench/attention.py). A sliding-window layer (the module passes
`sliding_window`) gets the same per sample: a sample no longer than the window is plain causal, a longer one is
attended in blocks of `window` queries, each with the band of keys it may see. Anything that is not a packed
training row (padded batches, generation with a cache, bidirectional vision towers, masks with image blocks) goes
to the stock sdpa path unchanged.
"""

import itertools
import weakref

import torch
from torch import nn

PACKED_SDPA = "sdpa_packed"


def sample_bounds(position_ids: torch.Tensor) -> list[int]:
    """Where the samples of one flattened row start and end: a sample starts wherever the position does not
    go on by one (the rule transformers uses to find packed sequences)."""
    positions = position_ids.reshape(-1)
    starts = (torch.diff(positions) != 1).nonzero().view(-1) + 1
    return [0, *starts.tolist(), positions.numel()]


class _LastRowBounds:
    """sample_bounds of the last position_ids seen. Reading positions back from a GPU waits for every queued
    kernel, and each layer of a forward (and the checkpoint's recompute of it) gets the same position_ids tensor:
    read once per forward rather than once per layer. Held weakly, and keyed on the tensor's version, so neither
    a later tensor at the same address nor an in-place change can return stale bounds."""

    def __init__(self):
        # (weak reference, version, length, bounds), read and replaced whole: nn.DataParallel's replicas run in
        # threads, and none may pair its tensor's key with another's bounds
        self.last = None

    def __call__(self, position_ids: torch.Tensor, length: int) -> list[int]:
        last, key = self.last, (position_ids._version, length)
        if last is not None and last[0]() is position_ids and last[1:3] == key:
            return last[3]
        bounds = sample_bounds(position_ids[..., -length:])
        self.last = (weakref.ref(position_ids), *key, bounds)
        return bounds


_row_bounds = _LastRowBounds()


def packed_sdpa_attention(
    module: nn.Module, query, key, value, attention_mask, position_ids=None, is_causal=None, **kwargs
):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if kwargs.get("s_aux") is not None:
        # sdpa would drop the sinks without a word; transformers gives such models no sdpa, this keeps it so
        raise RuntimeError(f"{type(module).__name__} has attention sinks, which sdpa does not compute: use eager")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    length = query.shape[2]
    one_square_row = query.shape[0] == 1 and key.shape[2] == length and length > 1
    if not (causal and attention_mask is None and one_square_row):
        return sdpa_attention_forward(module, query, key, value, attention_mask, is_causal=is_causal, **kwargs)
    if position_ids is None:
        # packed_sdpa_mask built no mask for this row: without positions the samples cannot be told apart
        raise RuntimeError(
            f"{type(module).__name__} does not pass position_ids to its attention, which {PACKED_SDPA} needs to "
            "keep packed samples apart: train it with --attn_implementation eager, or with --packing False"
        )
    bounds = _row_bounds(position_ids, length)
    outputs = [
        _causal_sample(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], kwargs)
        for a, b in itertools.pairwise(bounds)
    ]
    return torch.cat(outputs, dim=1), None  # (batch, tokens, heads, head size), as sdpa returns it


def _causal_sample(module: nn.Module, query, key, value, kwargs: dict) -> torch.Tensor:
    """One sample's causal attention, within the layer's sliding window if it has one. A query sees itself and the
    `window - 1` keys before it (transformers' sliding_window_overlay: kv > q - window, and flash attention's
    window_size (window - 1, ...)); a sample no longer than the window is plain causal. A longer one is attended in
    blocks of `window` queries, each against the keys its band reaches: masks of window x (2 window - 1) booleans,
    never the sample's L x L."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    length, window = query.shape[2], kwargs.get("sliding_window")
    if window is None or length <= window:
        return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs)[0]
    outputs = []
    for start in range(0, length, window):
        end, first = min(start + window, length), max(0, start - window + 1)
        queries = torch.arange(start, end, device=query.device)[:, None]
        keys = torch.arange(first, end, device=query.device)[None, :]
        band = (keys <= queries) & (keys > queries - window)
        outputs.append(
            sdpa_attention_forward(
                module, query[:, :, start:end], key[:, :, first:end], value[:, :, first:end], band[None, None], **kwargs
            )[0]
        )
    return torch.cat(outputs, dim=1)


def packed_sdpa_mask(
    batch_size=None, *args, attention_mask=None, q_length=None, kv_length=None, q_offset=0, use_vmap=False, **kwargs
):
    """No mask for one row without padding and without a cache (packed_sdpa_attention then splits it at the
    position restarts and applies each layer's window); sdpa's own mask for everything else: several rows, padding,
    a cache, and masks that are more than causal (image blocks that attend both ways, extra mask functions)."""
    from transformers.masking_utils import sdpa_mask

    plain = batch_size == 1 and attention_mask is None and q_length == kv_length and not q_offset and not use_vmap
    if plain and not _sees_ahead(kwargs.get("mask_function"), q_length, kwargs.get("device", "cpu")):
        return None
    return sdpa_mask(
        batch_size,
        *args,
        attention_mask=attention_mask,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        use_vmap=use_vmap,
        **kwargs,
    )


def _sees_ahead(mask_function, length: int, device) -> bool:
    """Whether the mask lets any token see the next one (bidirectional blocks of image tokens, say), which the
    per-sample causal calls would not reproduce. One look per token, not T x T: mask functions take index tensors."""
    if mask_function is None or length < 2:
        return False
    q = torch.arange(length - 1, device=device)
    zero = torch.zeros_like(q)
    return bool(torch.as_tensor(mask_function(zero, zero, q, q + 1)).any())


def register_packed_sdpa() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_SDPA, packed_sdpa_mask)


# Layer kinds the per-sample attention computes exactly; others (linear attention, chunked attention, Mamba or
# convolution layers) are left to the stock path, and to the family record's verdict on packing.
PER_SAMPLE_KINDS = ("full_attention", "sliding_attention")


def attention_layers_only(config) -> bool:
    """Whether every layer is full or sliding-window attention, which the per-sample attention computes exactly (a
    sliding window may come from layer_types or from `sliding_window` alone, as Mistral's)."""
    text = config.get_text_config()
    return all(kind in PER_SAMPLE_KINDS for kind in getattr(text, "layer_types", None) or ["full_attention"])


def attend_per_sample(model: nn.Module) -> bool:
    """Switch a model loaded with sdpa to PACKED_SDPA for padding-free training. Other implementations
    (flash_attention_2 has its own varlen path, eager) and models with layers other than attention are left as
    they are."""
    config = model.config
    if config._attn_implementation != "sdpa" or not attention_layers_only(config):
        return False
    register_packed_sdpa()
    model.set_attn_implementation(PACKED_SDPA)
    return True


def model_class_for(config):
    """The class load_model instantiates for this config (image-text-to-text for a vision-language model, else
    causal LM), found without loading weights; None for a model whose code is not in transformers."""
    from transformers.models.auto.auto_factory import _get_model_class
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    for mapping in (MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING):
        if type(config) in mapping:
            return _get_model_class(config, mapping)
    return None


def supported_attention(model, requested: str | None, trust_remote_code: bool = False) -> tuple[str | None, str | None]:
    """The attention implementation to load `model` (a name, a path or a config) with, and a line saying why when
    it is not the one requested. transformers raises when sdpa is asked of an architecture that has none (Gemma 2
    soft-caps its attention scores, gpt-oss adds attention sinks): such a model loads with flash attention where
    flash-attn is installed and the model takes it, else with eager. Read from the model class, no weights loaded."""
    if requested != "sdpa":
        return requested, None
    import transformers
    from transformers.utils import is_flash_attn_2_available

    config = model
    if isinstance(model, str):
        config = transformers.AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    model_class = model_class_for(config)
    if model_class is None or model_class._supports_sdpa:
        return requested, None  # remote code is checked when it loads
    # a model that names its own flash kernels (gpt-oss: ones that take its sinks) would fetch them from the Hub
    compatible = getattr(model_class, "_compatible_flash_implementations", None) or ["flash_attention_2"]
    flash = is_flash_attn_2_available() and model_class._supports_flash_attn and "flash_attention_2" in compatible
    chosen = "flash_attention_2" if flash else "eager"
    why = f"{model_class.__name__} has no sdpa attention in transformers {transformers.__version__}"
    return chosen, f"--attn_implementation {chosen}: {why}"
