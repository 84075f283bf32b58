"""What the toolkit knows about each model family, in one place: one record per family, found from the model's
config (its model_type), never from its name or path.

Generic code asks the record (`family_of(config)`) instead of testing model types or writing a family's tokens.
A model whose family has no record gets a generic one, read from its config: a text model trains as any causal
language model (its tokenizer, chat template and eos token say the rest), while a vision-language model is refused
before anything loads (`require_support`), since nothing generic says how its processor's pictures become the
model's inputs. Adding a family is adding a record here, and where its processor or layers need code of their own,
one small adapter beside it (as RopeIndexPositions is Qwen-VL's).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


@dataclass(frozen=True)
class GroundingStyle:
    """How <ref>label</ref><box>(x1,y1),(x2,y2)</box> is written for a model: around the label and the box, its own
    tokens or the data's tags (or nothing around the label: it stays plain text); the corners as two pairs or as a
    list; the coordinates in [0,1000) or in pixels of the picture as the model sees it."""

    name: str  # the --grounding_format value
    description: str
    ref: tuple[str, str] | tuple[()]  # () : the label is written as plain text before its box
    box: tuple[str, str]
    pixels: bool = False
    # the tags are text to a model that lacks them: a run adds those its vocabulary lacks as new tokens, whose
    # embedding rows train (none for a model that has them, as InternVL has <ref>/<box>); and since a run may have
    # added them, a vocabulary that holds them does not choose the style (the family record or the flag does)
    added: bool = False
    # how a box's corners are written: "pairs" (x1,y1),(x2,y2), one box a tag; "list" [[x1, y1, x2, y2]] and
    # "compact-list" [[x1,y1,x2,y2]], where the boxes of one label share a tag: [[x1, y1, x2, y2], [x1, ...]]
    corners: str = "pairs"


# The data's own form (Qwen-VL's), and the convention of models that have no grounding tokens of their own.
DATA_TAGS = GroundingStyle("qwen-vl", "tags as new tokens", ("<ref>", "</ref>"), ("<box>", "</box>"), added=True)
QWEN2_VL_TOKENS = GroundingStyle(
    "qwen2-vl",
    "native tokens, [0,1000)",
    ("<|object_ref_start|>", "<|object_ref_end|>"),
    ("<|box_start|>", "<|box_end|>"),
)
QWEN2_5_VL_TOKENS = replace(
    QWEN2_VL_TOKENS, name="qwen2.5-vl", description="native tokens, pixel coordinates", pixels=True
)
# InternVL's own (its grounding eval and demo, OpenGVLab/InternVL): the same four tags, special tokens of its
# tokenizer, around a list of boxes in [0,1000)
INTERNVL_TAGS = replace(
    DATA_TAGS, name="internvl", description="its own tags around [[x1, y1, x2, y2]] lists, [0,1000)", corners="list"
)
# GLM-4.1V/4.5V (zai-org/GLM-V's README): a box between <|begin_of_box|> and <|end_of_box|>, in [0,1000), no label
# tokens. The same markers also wrap a plain final answer; only numbers in fours read back as boxes.
GLM_V_BOXES = GroundingStyle(
    "glm-4v",
    "native box tokens around [[x1,y1,x2,y2]] lists, plain labels, [0,1000)",
    (),
    ("<|begin_of_box|>", "<|end_of_box|>"),
    corners="compact-list",
)
GROUNDING_STYLES = {
    style.name: style for style in (DATA_TAGS, QWEN2_VL_TOKENS, QWEN2_5_VL_TOKENS, INTERNVL_TAGS, GLM_V_BOXES)
}
AUTO = "auto"  # the model's own convention

# The MLP projections of the Llama-style gated MLP, which most families share (the tiled MLP looks for them).
GATED_MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    # names (the last part of the qualified module name) of the vision tower and of the projector into the text
    # model; a projector may sit inside the tower (Qwen-VL's merger)
    vision_towers: tuple[str, ...] = ()
    projectors: tuple[str, ...] = ()
    vision_language: bool = False
    # how the processor lays out a picture's features: "patch-grid" (flattened patches with a (t, h, w) grid per
    # picture, tuning/data/media/processor.py), "pictures" (whatever the processor returns per picture or tile,
    # joined per batch by tuning/data/collate.py, placed by the model at its picture tokens); None: no picture
    # layout is known, so pictures are refused
    media: str | None = None
    # how --image_max_pixels and --image_min_pixels reach the processor (tuning/data/media/resolution.py):
    # "pixel-budget" (its size holds pixel counts), "longest-edge" (its size holds the longest edge in pixels: the
    # square root of the budget); None: the processor's own fixed size or tiles, left as they are
    resolution: str | None = None
    # how the processor splits a picture into tiles, which --image_max_tiles bounds (tuning/data/media/resolution.py:
    # "max-patches", "splitting", "pan"; refused with the reason: "grid-pinpoints", "model-tiles"); None: no tiles
    tiles: str | None = None
    # the processor's picture features have one row per sample (Idefics3's tiles, Mllama's pictures x tiles): a
    # batch holds a row for every sample, empty (zeros, which the model drops or masks) for one without pictures
    media_rows_per_sample: bool = False
    # why the family's videos are refused though its processor has a video processor; "": they are read
    why_no_videos: str = ""
    # pictures enter the text through cross-attention layers, by a mask from each sample's ids (Mllama)
    cross_attention: bool = False
    # positions of a packed row come from the model's own get_rope_index (RopeIndexPositions), else 1-D positions
    rope_index: bool = False
    grounding: GroundingStyle | None = None  # its own convention; None: a style whose tokens it has, else the tags
    vision_wrapper: tuple[str, str] | None = None  # what the chat template writes around a picture's tokens
    # every sample of a packed row is computed as if alone (no recurrent state or window crosses a sample's start)
    packs_exactly: bool = True
    why_not_packed: str = ""
    gated_mlp: tuple[str, str, str] = GATED_MLP


# A causal language model known by nothing but its tokenizer and chat template (the encoder's default).
GENERIC = Family("a causal language model", ())

_QWEN_VL = {
    "vision_language": True,
    "vision_towers": ("visual",),
    "projectors": ("merger",),
    "media": "patch-grid",
    "resolution": "pixel-budget",
    "rope_index": True,
    "vision_wrapper": ("<|vision_start|>", "<|vision_end|>"),
}
# A vision tower and a projector beside it, the projected features placed at the picture tokens of the text
# (LLaVA's design, which most vision-language families share).
_TOWER_AND_PROJECTOR = {
    "vision_language": True,
    "vision_towers": ("vision_tower",),
    "projectors": ("multi_modal_projector",),
    "media": "pictures",
}

_MASKS_IGNORE_POSITIONS = (
    "transformers builds its attention masks without the packed positions and it has no sdpa to split them by, so "
    "its packed samples would see each other"
)

FAMILIES = (
    Family("Qwen2 / Qwen2.5", ("qwen2",)),
    Family("Qwen3", ("qwen3",)),
    # text families whose attention masks ignore the packed positions (measured: a packed sample sees the one before)
    Family("gpt-oss", ("gpt_oss",), packs_exactly=False, why_not_packed=_MASKS_IGNORE_POSITIONS),
    Family("BLOOM", ("bloom",), packs_exactly=False, why_not_packed=_MASKS_IGNORE_POSITIONS),
    Family("MPT", ("mpt",), packs_exactly=False, why_not_packed=_MASKS_IGNORE_POSITIONS),
    Family("XGLM", ("xglm",), packs_exactly=False, why_not_packed=_MASKS_IGNORE_POSITIONS),
    Family("Qwen2-VL", ("qwen2_vl",), grounding=QWEN2_VL_TOKENS, **_QWEN_VL),
    Family("Qwen2.5-VL", ("qwen2_5_vl",), grounding=QWEN2_5_VL_TOKENS, **_QWEN_VL),
    # its deepstack mergers feed picture features into early text layers: projectors too
    Family("Qwen3-VL", ("qwen3_vl",), **{**_QWEN_VL, "projectors": ("merger", "deepstack_merger_list")}),
    # Qwen3-VL's pictures (its processor, its rope index) before Gated DeltaNet text layers
    Family(
        "Qwen3.5",
        ("qwen3_5", "qwen3_5_moe"),
        **_QWEN_VL,
        packs_exactly=False,
        why_not_packed="its Gated DeltaNet (linear attention) layers carry a recurrent state from one packed sample "
        "into the next",
    ),
    # Qwen-VL's layout and positions (its processor and get_rope_index are Qwen2-VL's), its own picture tokens
    Family(
        "GLM-4V",
        ("glm4v",),
        grounding=GLM_V_BOXES,
        **{**_QWEN_VL, "vision_wrapper": ("<|begin_of_image|>", "<|end_of_image|>")},
    ),
    Family("LLaVA-1.5", ("llava",), **_TOWER_AND_PROJECTOR),
    # anyres: each picture becomes its tiles' patches (padded per batch, trimmed by image_sizes in the model)
    Family("LLaVA-NeXT", ("llava_next",), **_TOWER_AND_PROJECTOR, tiles="grid-pinpoints"),
    Family("LLaVA-OneVision", ("llava_onevision",), **_TOWER_AND_PROJECTOR, tiles="grid-pinpoints"),
    Family("InternVL", ("internvl",), grounding=INTERNVL_TAGS, **_TOWER_AND_PROJECTOR, tiles="max-patches"),
    Family("Mistral 3 (Pixtral tower)", ("mistral3",), **_TOWER_AND_PROJECTOR, resolution="longest-edge"),
    Family(
        "Gemma 3",
        ("gemma3",),
        **_TOWER_AND_PROJECTOR,
        tiles="pan",
        packs_exactly=False,
        why_not_packed="the tokens of a picture attend to each other both ways (token_type_ids), which the "
        "per-sample causal attention of a packed row does not do",
    ),
    Family(
        "Idefics3 / SmolVLM",
        ("idefics3", "smolvlm"),
        vision_language=True,
        vision_towers=("vision_model",),
        projectors=("connector",),
        media="pictures",
        resolution="longest-edge",
        tiles="splitting",
        media_rows_per_sample=True,
        why_no_videos="SmolVLM2's processor writes a video's prompt (its frames and timestamps) with a chat template "
        "of its own, which the encoder does not render",
    ),
    Family(
        "Llama 3.2 Vision (Mllama)",
        ("mllama",),
        vision_language=True,
        vision_towers=("vision_model",),
        projectors=("multi_modal_projector",),
        media="pictures",
        tiles="model-tiles",
        media_rows_per_sample=True,
        cross_attention=True,
        packs_exactly=False,
        why_not_packed="its text reaches the pictures through cross-attention, and the tokens before a packed "
        "sample's first picture would attend to every picture of the row",
    ),
)

# Layer kinds whose state or window stays within a sample of a packed row (mlp and moe: Nemotron-H's per-token
# layers); any other kind (linear attention, Mamba) carries a recurrent state from one sample into the next.
_PER_SAMPLE_LAYERS = ("full_attention", "sliding_attention", "mlp", "moe")


class UnsupportedFamily(ValueError):
    """A model whose family the toolkit cannot train correctly: the message names it and what is missing."""


def is_vision_language(config) -> bool:
    return config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def family_of(config) -> Family:
    """The record of the model's family, or a generic record read from its config."""
    for family in FAMILIES:
        if config.model_type in family.model_types:
            return family
    return _generic(config)


def _generic(config) -> Family:
    from tuning.attention import model_class_for

    kinds = set(getattr(config.get_text_config(), "layer_types", None) or [])
    carried = sorted(kinds - set(_PER_SAMPLE_LAYERS))
    why = f"its {', '.join(carried)} layers carry their state from one packed sample into the next" if carried else ""
    model_class = model_class_for(config)
    if not why and getattr(model_class, "_is_stateful", False):  # transformers' own flag: RWKV, xLSTM, Mamba, ...
        why = f"{model_class.__name__} carries a recurrent state from one packed sample into the next"
    architecture = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    return Family(
        f"{architecture} (model_type {config.model_type!r})",
        (config.model_type,),
        vision_language=is_vision_language(config),
        packs_exactly=not why,
        why_not_packed=why,
    )


def require_support(family: Family) -> Family:
    """The family, if the toolkit can train it: a vision-language model whose family has no record is refused,
    with what is missing."""
    if family.vision_language and family.media is None:
        known = ", ".join(f.name for f in FAMILIES if f.media)
        raise UnsupportedFamily(
            f"{family.name} is a vision-language model of a family this toolkit has no record for: it does not know "
            "how that family's processor lays out pictures, where its vision tower and projector are, or how its "
            f"packed rows are positioned. Supported vision-language families: {known}. To add one, add its record "
            "to tuning/families.py"
        )
    return family


def grounding_style(family: Family, vocab, requested: str = AUTO) -> GroundingStyle:
    """The style <ref>/<box> data is written in for this model: the one asked for, else the family's own, else a
    style whose tokens are all in the vocabulary, else the data's tags (added as new tokens)."""
    if requested != AUTO:
        return GROUNDING_STYLES[requested]
    if family.grounding is not None:
        return family.grounding
    for style in GROUNDING_STYLES.values():
        if not style.added and all(tag in vocab for tag in (*style.ref, *style.box)):
            return style
    return DATA_TAGS


# The token that ends a document in tokenizers that have one apart from the end of a turn: Qwen's (instruct models
# end a turn with <|im_end|>, their eos, and a document with <|endoftext|>); every family's tokenizer is asked, as
# Qwen's vocabulary comes with MoE and other Qwen models that have no record of their own.
DOCUMENT_END = "<|endoftext|>"


def end_of_text(family: Family, tokenizer) -> str:
    """The token that ends a pre-training document: the document-end token where the tokenizer has it, else eos."""
    return DOCUMENT_END if DOCUMENT_END in tokenizer.get_vocab() else tokenizer.eos_token


# -- Mllama's cross-attention mask ------------------------------------------------------------------------------


def cross_attention_mask(ids: list[int], image_token_id: int, aspect_ratio_mask: torch.Tensor) -> torch.Tensor:
    """(1, tokens, pictures, tiles): which of the sample's picture tiles each text token attends to, as Mllama's
    processor builds it (a picture is seen from its token on, up to the next picture's), from the sample's own ids."""
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense,
        get_cross_attention_token_mask,
    )

    tiles = aspect_ratio_mask.reshape(-1, aspect_ratio_mask.shape[-1]).sum(-1).tolist()
    dense = convert_sparse_cross_attention_mask_to_dense(
        [get_cross_attention_token_mask(ids, image_token_id)], [tiles], aspect_ratio_mask.shape[-1], len(ids)
    )
    return torch.from_numpy(dense)


# -- Qwen-VL's packed positions ---------------------------------------------------------------------------------


class RopeIndexPositions:
    """Positions of a packed row for the Qwen-VL families: a row of text positions first, restarting at every
    sample (the model finds the sample bounds in it), then each sample's own 3-D rope positions from the model's
    get_rope_index, with its pictures' and videos' grids: position_ids of shape (4, 1, tokens)."""

    def __init__(self, rope_index: Callable):
        self.rope_index = rope_index

    def __call__(self, features: list[dict]) -> torch.Tensor:
        text = torch.tensor([i for f in features for i in range(len(f["input_ids"]))]).view(1, 1, -1)
        return torch.cat([text, torch.cat([self._sample(f) for f in features], dim=2)], dim=0)

    def _sample(self, feature: dict) -> torch.Tensor:
        length = len(feature["input_ids"])
        if feature.get("pixel_values") is None and feature.get("pixel_values_videos") is None:
            return torch.arange(length).view(1, 1, -1).expand(3, 1, -1)
        extra = {}
        if feature.get("second_per_grid_ts"):  # Qwen2.5-VL: the time between a video's frame groups
            extra["second_per_grid_ts"] = torch.tensor(feature["second_per_grid_ts"])
        positions, _ = self.rope_index(
            torch.tensor([feature["input_ids"]]),
            mm_token_type_ids=torch.tensor([feature.get("mm_token_type_ids") or [0] * length]),
            image_grid_thw=feature.get("image_grid_thw"),
            video_grid_thw=feature.get("video_grid_thw"),
            **extra,
        )
        return positions


def packed_positions(model: nn.Module) -> RopeIndexPositions | None:
    """The family's position function for packed rows, or None for 1-D positions (built by the collator)."""
    if not family_of(model.config).rope_index:
        return None
    for module in model.modules():  # the inner model that holds the language model owns get_rope_index
        if hasattr(module, "get_rope_index") and hasattr(module, "language_model"):
            return RopeIndexPositions(module.get_rope_index)
    raise UnsupportedFamily(f"{type(model).__name__} has no get_rope_index, which its family's packed rows need")
