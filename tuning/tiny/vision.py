"""Tiny builds of vision-language families other than Qwen's, each with its family's processor and template.

Every kind keeps its family's real shape at a toy size: the vision tower and projector classes, the processor with
its own tiling or resizing rules (scaled down so a picture is tens of tokens), the special tokens the family's
tokenizer has (picture, turn, bos/eos), the chat template the hub checkpoint ships (tuning/assets/templates/, sources
in SOURCES_VISION.md) and the eos list of its generation_config. Where a family's random init would hide every
picture (a projector or gate that starts at zero), `init` opens it.
"""

from __future__ import annotations

from tuning.tiny.core import Parts, TinySpec, bpe_tokenizer, decoder_fields, kind, template
from tuning.tiny.qwen import SPECIAL_TOKENS as QWEN_SPECIAL_TOKENS

# The CLIP / SigLIP normalisation constants the real image processors carry.
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
HALF = [0.5, 0.5, 0.5]


def _vision(spec: TinySpec, **extra) -> dict:
    return {
        "hidden_size": spec.vision_hidden_size,
        "intermediate_size": 2 * spec.vision_hidden_size,
        "num_hidden_layers": spec.vision_depth,
        "num_attention_heads": 2,
        "initializer_range": spec.initializer_range,
        **extra,
    }


def _ids(tokenizer, **names: str) -> dict:
    return {key: tokenizer.convert_tokens_to_ids(token) for key, token in names.items()}


# --- LLaVA 1.5 (llava-hf/llava-1.5-7b-hf): CLIP ViT-L/14 at 336, Llama 2 / Vicuna, one <image> per picture -----------
LLAVA_SPECIAL = ("<unk>", "<s>", "</s>", "<image>", "<pad>")
LLAVA_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def _llava_text(spec: TinySpec, template_name: str):
    """(tokenizer, text config fields) of a LLaVA on a Llama 2 / Mistral text model: their sentencepiece tokens and
    <image>, bos added to each text."""
    tokenizer = bpe_tokenizer(spec, LLAVA_SPECIAL, template(template_name), add_bos_token=True, **LLAVA_TOKENS)
    ids = _ids(tokenizer, bos_token_id="<s>", eos_token_id="</s>", pad_token_id="<pad>")
    return tokenizer, decoder_fields(spec, tokenizer, **ids)


@kind(
    "llava",
    "LlavaForConditionalGeneration",
    "tiny-llava",
    template=template("llava"),
    vision=True,
    summary="LLaVA 1.5: CLIP tower, MLP projector, Llama text",
)
def llava(spec: TinySpec) -> Parts:
    import transformers as tf

    tokenizer, text = _llava_text(spec, "llava")
    # 56 / 14 = 4 patches a side: 16 image tokens (llava-1.5: 336 / 14 = 24 a side, 576 tokens)
    vision = _vision(spec, image_size=56, patch_size=14, projection_dim=spec.vision_hidden_size)
    config = tf.LlavaConfig(
        text_config=tf.LlamaConfig(**text, tie_word_embeddings=False),
        vision_config=tf.CLIPVisionConfig(**vision),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        pad_token_id=text["pad_token_id"],
        tie_word_embeddings=False,
    )
    image_processor = tf.CLIPImageProcessor(
        size={"shortest_edge": 56},
        crop_size={"height": 56, "width": 56},
        do_center_crop=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    processor = tf.LlavaProcessor(
        image_processor,
        tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token, dropped again by the "default" strategy
        chat_template=template("llava"),
    )
    return Parts(config, tokenizer, processor, stop_tokens=("</s>",), pad_token="<pad>")


# --- LLaVA-NeXT (llava-hf/llava-v1.6-mistral-7b-hf): CLIP at 336, anyres tiles plus the base view, Mistral text ----
@kind(
    "llava-next",
    "LlavaNextForConditionalGeneration",
    "tiny-llava-next",
    template=template("llava_next"),
    vision=True,
    summary="LLaVA-NeXT (1.6): CLIP tower, anyres grid of tiles plus a base view, Mistral text",
)
def llava_next(spec: TinySpec) -> Parts:
    import transformers as tf

    tokenizer, text = _llava_text(spec, "llava_next")
    tile = 56  # 4 patches a side: 16 tokens a tile (real: 336 / 14 = 24 a side, 576 tokens)
    # The real pinpoints: 336 x (1 x 2, 2 x 1, 2 x 2, 1 x 3, 3 x 1) pixels; the same grid shapes here.
    pinpoints = [[tile * h, tile * w] for h, w in ((1, 2), (2, 1), (2, 2), (1, 3), (3, 1))]
    config = tf.LlavaNextConfig(
        text_config=tf.MistralConfig(**text, sliding_window=None, tie_word_embeddings=False),
        vision_config=tf.CLIPVisionConfig(
            **_vision(spec, image_size=tile, patch_size=14, projection_dim=spec.vision_hidden_size)
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    image_processor = tf.LlavaNextImageProcessor(
        size={"shortest_edge": tile},
        crop_size={"height": tile, "width": tile},
        image_grid_pinpoints=pinpoints,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    processor = tf.LlavaNextProcessor(
        image_processor,
        tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=template("llava_next"),
    )
    return Parts(config, tokenizer, processor, stop_tokens=("</s>",), pad_token="<pad>")


# --- Gemma 3 (google/gemma-3-4b-it): SigLIP at 896 pooled to 256 soft tokens, <start_of_image> in the text ----------
GEMMA3_SPECIAL = (
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<mask>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
)
GEMMA3_TOKENS = {
    "pad_token": "<pad>",
    "eos_token": "<eos>",
    "bos_token": "<bos>",
    "unk_token": "<unk>",
    "extra_special_tokens": {
        "image_token": "<image_soft_token>",
        "boi_token": "<start_of_image>",
        "eoi_token": "<end_of_image>",
    },
}


def _open_gemma3_projector(model) -> None:
    # Gemma 3 initialises its projection matrix to zeros (the real one is trained): every picture would embed as 0.
    weight = model.model.multi_modal_projector.mm_input_projection_weight
    weight.normal_(0.0, model.config.text_config.initializer_range)


@kind(
    "gemma3",
    "Gemma3ForConditionalGeneration",
    "tiny-gemma3",
    template=template("gemma-3"),
    vision=True,
    summary="Gemma 3: SigLIP tower, pooled soft tokens, bidirectional attention over a picture",
)
def gemma3(spec: TinySpec) -> Parts:
    import transformers as tf
    from transformers.image_utils import PILImageResampling

    tokenizer = bpe_tokenizer(spec, GEMMA3_SPECIAL, template("gemma-3"), add_bos_token=True, **GEMMA3_TOKENS)
    ids = _ids(tokenizer, pad_token_id="<pad>", eos_token_id="<eos>", bos_token_id="<bos>")
    head_dim = spec.hidden_size // spec.num_heads
    text = tf.Gemma3TextConfig(
        **decoder_fields(spec, tokenizer, **ids),
        head_dim=head_dim,
        query_pre_attn_scalar=head_dim,  # the real models scale by head_dim (256)
        sliding_window=512,
        layer_types=["sliding_attention", "full_attention"],  # the real 5:1 pattern, shortened
    )
    # 112 / 14 = 8 patches a side, average-pooled 2x2 to 4 a side: 16 soft tokens (real: 896 / 14 = 64, pooled to 16)
    vision = tf.SiglipVisionConfig(**_vision(spec, image_size=112, patch_size=14, vision_use_head=False))
    config = tf.Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=16,
        **_ids(
            tokenizer,
            image_token_index="<image_soft_token>",
            boi_token_index="<start_of_image>",
            eoi_token_index="<end_of_image>",
        ),
        initializer_range=spec.initializer_range,
    )
    image_processor = tf.Gemma3ImageProcessor(
        size={"height": 112, "width": 112}, image_mean=HALF, image_std=HALF, resample=PILImageResampling.BILINEAR
    )
    processor = tf.Gemma3Processor(image_processor, tokenizer, chat_template=template("gemma-3"), image_seq_length=16)
    return Parts(
        config,
        tokenizer,
        processor,
        init=_open_gemma3_projector,
        stop_tokens=("<end_of_turn>", "<eos>"),
        pad_token="<pad>",
    )


# --- LLaVA-OneVision (llava-hf/llava-onevision-qwen2-0.5b-ov-hf): SigLIP at 384, anyres tiles, Qwen2 text ----------
QWEN2_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN2_TOKENS = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}


@kind(
    "llava-onevision",
    "LlavaOnevisionForConditionalGeneration",
    "tiny-llava-onevision",
    template=template("llava_onevision"),
    vision=True,
    summary="LLaVA-OneVision: SigLIP tower, anyres grid of tiles plus a base view, Qwen2 text",
)
def llava_onevision(spec: TinySpec) -> Parts:
    import transformers as tf

    special = (*QWEN2_SPECIAL, "<image>", "<video>")
    tokenizer = bpe_tokenizer(spec, special, template("llava_onevision"), **QWEN2_TOKENS)
    text = decoder_fields(spec, tokenizer, **_ids(tokenizer, eos_token_id="<|im_end|>", pad_token_id="<|endoftext|>"))
    # tiles of 56 / 14 = 4 patches a side: 16 tokens a tile (real: 384 / 14 = 27 a side, 729 tokens)
    vision = tf.SiglipVisionConfig(**_vision(spec, image_size=56, patch_size=14, vision_use_head=False))
    tile = 56
    # The real grid pinpoints are every (h, w) in multiples of 384 up to 6 x 6 tiles; here up to 3 tiles a side.
    pinpoints = [[tile * h, tile * w] for h in range(1, 4) for w in range(1, 4)]
    config = tf.LlavaOnevisionConfig(
        text_config=tf.Qwen2Config(**text, tie_word_embeddings=False),
        vision_config=vision,
        **_ids(tokenizer, image_token_index="<image>", video_token_index="<video>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=False,
    )
    size = {"height": tile, "width": tile}
    image_processor = tf.LlavaOnevisionImageProcessor(
        size=size, image_grid_pinpoints=pinpoints, image_mean=HALF, image_std=HALF
    )
    video_processor = tf.LlavaOnevisionVideoProcessor(size=size, image_mean=HALF, image_std=HALF)
    processor = tf.LlavaOnevisionProcessor(
        image_processor,
        tokenizer,
        video_processor,
        num_image_tokens=(tile // 14) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        chat_template=template("llava_onevision"),
    )
    return Parts(config, tokenizer, processor, stop_tokens=("<|im_end|>", "<|endoftext|>"), pad_token="<|endoftext|>")


# --- InternVL 3 (OpenGVLab/InternVL3-1B-hf): InternViT at 448, dynamic tiles + thumbnail, pixel shuffle, Qwen2 --------
INTERNVL_SPECIAL = (
    *QWEN_SPECIAL_TOKENS,
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
    "<video>",
)
INTERNVL_TOKENS = {
    **QWEN2_TOKENS,
    "extra_special_tokens": {
        "start_image_token": "<img>",
        "end_image_token": "</img>",
        "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>",
    },
}


@kind(
    "internvl",
    "InternVLForConditionalGeneration",
    "tiny-internvl",
    template=template("internvl"),
    vision=True,
    summary="InternVL 3 (-hf): InternViT tower, tiles of a picture plus a thumbnail, pixel shuffle, Qwen2 text",
)
def internvl(spec: TinySpec) -> Parts:
    import transformers as tf

    tokenizer = bpe_tokenizer(spec, INTERNVL_SPECIAL, template("internvl"), **INTERNVL_TOKENS)
    text = decoder_fields(spec, tokenizer, **_ids(tokenizer, eos_token_id="<|im_end|>", pad_token_id="<|endoftext|>"))
    tile = 56
    # a tile is 56 / 14 = 4 patches a side, pixel-shuffled (ratio 0.5) to 2 x 2: 4 tokens (real: 448 / 14 = 32, to 256)
    vision = tf.InternVLVisionConfig(
        **_vision(spec, image_size=[tile, tile], patch_size=[14, 14]), use_absolute_position_embeddings=True
    )
    config = tf.InternVLConfig(
        text_config=tf.Qwen2Config(**text, tie_word_embeddings=True),
        vision_config=vision,
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=4,
        downsample_ratio=0.5,
        tie_word_embeddings=True,
    )
    size = {"height": tile, "width": tile}
    image_processor = tf.GotOcr2ImageProcessor(
        size=size, crop_to_patches=False, min_patches=1, max_patches=6, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD
    )
    video_processor = tf.InternVLVideoProcessor(size=size, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    processor = tf.InternVLProcessor(
        image_processor, tokenizer, video_processor, image_seq_length=4, chat_template=template("internvl")
    )
    return Parts(config, tokenizer, processor, stop_tokens=("<|im_end|>", "<|endoftext|>"), pad_token="<|endoftext|>")


# --- SmolVLM 2 (HuggingFaceTB/SmolVLM2-256M-Video-Instruct): SigLIP, Idefics3 splitting, pixel shuffle, SmolLM2 ------
SMOLVLM_GRID = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
SMOLVLM_SPECIAL = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<global-img>",
    *SMOLVLM_GRID,
    "<fake_token_around_image>",
    "<image>",
    "<end_of_utterance>",
)
SMOLVLM_TOKENS = {
    "bos_token": "<|im_start|>",
    "eos_token": "<end_of_utterance>",
    "pad_token": "<|im_end|>",
    "unk_token": "<|endoftext|>",
    "extra_special_tokens": {
        "fake_image_token": "<fake_token_around_image>",
        "image_token": "<image>",
        "global_image_token": "<global-img>",
        "end_of_utterance_token": "<end_of_utterance>",
    },
}


@kind(
    "smolvlm",
    "SmolVLMForConditionalGeneration",
    "tiny-smolvlm",
    template=template("smolvlm"),
    vision=True,
    summary="SmolVLM 2: SigLIP tower, a picture split into tiles plus a global view, pixel shuffle, Llama text",
)
def smolvlm(spec: TinySpec) -> Parts:
    import transformers as tf

    tokenizer = bpe_tokenizer(spec, SMOLVLM_SPECIAL, template("smolvlm"), **SMOLVLM_TOKENS)
    ids = _ids(tokenizer, bos_token_id="<|im_start|>", eos_token_id="<end_of_utterance>", pad_token_id="<|im_end|>")
    tile, scale = 32, 2
    # a tile is 32 / 8 = 4 patches a side, pixel-shuffled by 2 to 2 x 2: 4 tokens (real 256M: 512 / 16 = 32, by 4 to 64)
    vision = tf.SmolVLMVisionConfig(**_vision(spec, image_size=tile, patch_size=8))
    config = tf.SmolVLMConfig(
        text_config=tf.LlamaConfig(**decoder_fields(spec, tokenizer, **ids), tie_word_embeddings=False),
        vision_config=vision,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=scale,
        pad_token_id=ids["pad_token_id"],
        tie_word_embeddings=False,
    )
    image_processor = tf.SmolVLMImageProcessor(
        size={"longest_edge": 3 * tile},  # at most 3 x 3 tiles (real: 2048 / 512 = 4 x 4)
        max_image_size={"longest_edge": tile},
        do_image_splitting=True,
        image_mean=HALF,
        image_std=HALF,
    )
    # SmolVLM2's video_sampling: at most max_frames frames at fps, each frame one tile (real: 64 at 1 fps, 512 px)
    video_processor = tf.SmolVLMVideoProcessor(
        size={"longest_edge": tile},
        max_image_size={"longest_edge": tile},
        video_sampling={"fps": 1, "max_frames": 16, "video_size": {"longest_edge": tile}},
        do_sample_frames=True,
        image_mean=HALF,
        image_std=HALF,
    )
    processor = tf.SmolVLMProcessor(
        image_processor,
        tokenizer,
        video_processor,
        image_seq_len=(tile // 8) ** 2 // scale**2,
        chat_template=template("smolvlm"),
    )
    return Parts(config, tokenizer, processor, stop_tokens=("<end_of_utterance>", "<|im_end|>"), pad_token="<|im_end|>")


# --- Mistral Small 3.1 (mistralai/Mistral-Small-3.1-24B-Instruct-2503): Pixtral tower, 2 x 2 patch merger ----------
MISTRAL_SPECIAL = (
    "<unk>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
    "[TOOL_CALLS]",
    "[IMG]",
    "<pad>",
    "[IMG_BREAK]",
    "[IMG_END]",
    "[PREFIX]",
    "[MIDDLE]",
    "[SUFFIX]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "[TOOL_CONTENT]",
)
MISTRAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


@kind(
    "mistral3",
    "Mistral3ForConditionalGeneration",
    "tiny-mistral3",
    template=template("mistral3"),
    vision=True,
    summary="Mistral Small 3.1: Pixtral tower at native aspect ratio, 2x2 patch merger, Mistral text",
)
def mistral3(spec: TinySpec) -> Parts:
    import transformers as tf

    tokenizer = bpe_tokenizer(spec, MISTRAL_SPECIAL, template("mistral3"), add_bos_token=True, **MISTRAL_TOKENS)
    ids = _ids(tokenizer, bos_token_id="<s>", eos_token_id="</s>", pad_token_id="<pad>")
    head_dim = spec.hidden_size // spec.num_heads
    longest = 112  # a picture's longest edge: 112 / 14 = 8 patches, merged 2 x 2 to 4 tokens a side (real: 1540)
    vision = tf.PixtralVisionConfig(**_vision(spec, image_size=longest, patch_size=14), head_dim=16)
    config = tf.Mistral3Config(
        text_config=tf.MistralConfig(
            **decoder_fields(spec, tokenizer, **ids), head_dim=head_dim, tie_word_embeddings=False
        ),
        vision_config=vision,
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=2,
        vision_feature_layer=-1,
        multimodal_projector_bias=False,
        tie_word_embeddings=False,
    )
    image_processor = tf.PixtralImageProcessor(
        size={"longest_edge": longest}, patch_size={"height": 14, "width": 14}, image_mean=CLIP_MEAN, image_std=CLIP_STD
    )
    processor = tf.PixtralProcessor(
        image_processor, tokenizer, patch_size=14, spatial_merge_size=2, chat_template=template("mistral3")
    )
    return Parts(config, tokenizer, processor, stop_tokens=("</s>",), pad_token="<pad>")


# --- Llama 3.2 Vision (meta-llama/Llama-3.2-11B-Vision-Instruct): tiles, cross-attention layers, one <|image|> -------
MLLAMA_SPECIAL = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",  # real id 128256: past the text vocab_size, in the 8 extra embedding rows the text model adds
)
MLLAMA_TOKENS = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|finetune_right_pad_id|>"}


def _open_mllama_gates(model) -> None:
    # The cross-attention and its MLP enter the residual stream through tanh(gate), and the gates start at zero:
    # a random build would ignore every picture. tanh(0.5) lets them through (the real gates are trained).
    for layer in model.model.language_model.layers:
        if hasattr(layer, "cross_attn_attn_gate"):
            layer.cross_attn_attn_gate.fill_(0.5)
            layer.cross_attn_mlp_gate.fill_(0.5)


@kind(
    "mllama",
    "MllamaForConditionalGeneration",
    "tiny-mllama",
    template=template("mllama"),
    vision=True,
    summary="Llama 3.2 Vision: tiled pictures read through cross-attention layers, gates opened",
)
def mllama(spec: TinySpec) -> Parts:
    import transformers as tf

    tokenizer = bpe_tokenizer(spec, MLLAMA_SPECIAL, template("mllama"), **MLLAMA_TOKENS)
    ids = _ids(
        tokenizer, bos_token_id="<|begin_of_text|>", eos_token_id="<|eot_id|>", pad_token_id="<|finetune_right_pad_id|>"
    )
    text = tf.MllamaTextConfig(
        **decoder_fields(spec, tokenizer, **ids),
        # the last layer is a cross-attention layer (real 11B: 8 of 40, every fifth from the fourth)
        cross_attention_layers=[spec.num_layers - 1],
        tie_word_embeddings=False,
    )
    tile = 28  # 28 / 14 = 2 x 2 patches (+ class token, padded to 8) a tile, up to 4 tiles (real: 560 / 14 = 40 x 40)
    vision = tf.MllamaVisionConfig(
        hidden_size=spec.vision_hidden_size,
        intermediate_size=2 * spec.vision_hidden_size,
        num_hidden_layers=spec.vision_depth,
        num_global_layers=1,
        attention_heads=2,
        image_size=tile,
        patch_size=14,
        max_num_tiles=4,
        intermediate_layers_indices=list(range(spec.vision_depth)),
        # the tower's output: the last hidden state and each intermediate layer, concatenated
        vision_output_dim=spec.vision_hidden_size * (spec.vision_depth + 1),
        initializer_range=spec.initializer_range,
    )
    config = tf.MllamaConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<|image|>")
    )
    image_processor = tf.MllamaImageProcessor(
        size={"height": tile, "width": tile}, max_image_tiles=4, image_mean=CLIP_MEAN, image_std=CLIP_STD
    )
    processor = tf.MllamaProcessor(image_processor, tokenizer, chat_template=template("mllama"))
    return Parts(
        config,
        tokenizer,
        processor,
        init=_open_mllama_gates,
        stop_tokens=("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"),
        pad_token="<|finetune_right_pad_id|>",
    )


# --- GLM-4.1V (zai-org/GLM-4.1V-9B-Thinking): Qwen2-VL-style patches and 3-D rope, GLM-4 text --------------------
GLM4V_SPECIAL = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|image|>",
    "<|video|>",
    "<think>",
    "</think>",
    "<|begin_of_box|>",
    "<|end_of_box|>",
)


@kind(
    "glm4v",
    "Glm4vForConditionalGeneration",
    "tiny-glm4v",
    template=template("glm4v"),
    vision=True,
    summary="GLM-4.1V: native-resolution patches merged 2x2, 3-D rope, GLM-4 text",
)
def glm4v(spec: TinySpec) -> Parts:
    import transformers as tf

    tokens = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    tokenizer = bpe_tokenizer(spec, GLM4V_SPECIAL, template("glm4v"), **tokens)
    head_dim = spec.hidden_size // spec.num_heads
    rotary_half = int(head_dim * 0.5) // 2  # GLM rotates half of each head; (t, h, w) split that 1:1.5:1.5 (8, 12, 12)
    t = max(1, rotary_half // 4)
    rope = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.5,
        "mrope_section": [t, (rotary_half - t) // 2, rotary_half - t - (rotary_half - t) // 2],
    }
    text = tf.Glm4vTextConfig(
        **decoder_fields(spec, tokenizer, pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>")),
        rope_parameters=rope,
    )
    vision = tf.Glm4vVisionConfig(
        depth=spec.vision_depth,
        hidden_size=spec.vision_hidden_size,
        intermediate_size=2 * spec.vision_hidden_size,
        num_heads=2,
        image_size=56,  # learned position embeddings for 4 x 4 patches, interpolated to each picture's grid
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=spec.hidden_size,
        initializer_range=spec.initializer_range,
    )
    config = tf.Glm4vConfig(
        text_config=text,
        vision_config=vision,
        **_ids(
            tokenizer,
            image_token_id="<|image|>",
            video_token_id="<|video|>",
            image_start_token_id="<|begin_of_image|>",
            image_end_token_id="<|end_of_image|>",
            video_start_token_id="<|begin_of_video|>",
            video_end_token_id="<|end_of_video|>",
        ),
        tie_word_embeddings=False,
    )
    # min/max pixels count both temporal frames of a picture: 4 to 64 merged tokens (real: 12,544 to 9,633,792)
    size = {"shortest_edge": 2 * 4 * 28 * 28, "longest_edge": 2 * 64 * 28 * 28}
    image_processor = tf.Glm4vImageProcessor(size=size, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    video_processor = tf.Glm4vVideoProcessor(size=size, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    processor = tf.Glm4vProcessor(image_processor, tokenizer, video_processor, chat_template=template("glm4v"))
    return Parts(
        config,
        tokenizer,
        processor,
        stop_tokens=("<|user|>", "<|observation|>", "<|endoftext|>"),
        pad_token="<|endoftext|>",
    )
