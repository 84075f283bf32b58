"""Tiny Qwen-family builds: Qwen2, Qwen3, Qwen2-VL, Qwen2.5-VL and Qwen3-VL, with Qwen's special tokens, its
ChatML template (Qwen3: its official template, with thinking and tools) and the real processors."""

from __future__ import annotations

from importlib import resources

from tuning.tiny.core import Parts, TinySpec, decoder_fields, kind, template, train_bpe

# Qwen's own special tokens, in the order Qwen2/Qwen2.5-VL number them (after the BPE vocabulary).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# The ChatML template that Qwen2-VL and Qwen2.5-VL ship in their tokenizer and processor configs:
# a default system turn, image/video parts, and "Picture N: " labels when add_vision_id is set.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3 adds these as ordinary (not special) tokens: the template writes them, the model generates them.
QWEN3_TOKENS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>")


def chat_template(kind: str) -> str:
    """Qwen2.5-VL's ChatML template; for the Qwen3 kind the official Qwen3 template (thinking, tools), as shipped
    in Qwen3's tokenizer_config.json; for Qwen3.5, Qwen3.5-27B's own (thinking, tools, pictures and videos)."""
    if kind == "qwen3.5":
        return template("qwen3.5")
    if kind != "qwen3":
        return CHAT_TEMPLATE
    asset = resources.files("tuning").joinpath("assets/qwen3_chat_template.jinja")
    return asset.read_text(encoding="utf-8").rstrip("\n")


def build_tokenizer(spec: TinySpec):
    """Train a byte-level BPE on the shipped corpus and wrap it as Qwen2's tokenizer class."""
    from transformers import AddedToken, Qwen2Tokenizer

    vocab, merges = train_bpe(spec)
    for token in SPECIAL_TOKENS:  # numbered here so the ids follow Qwen's order, not the wrapper's
        vocab[token] = len(vocab)

    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
    )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]}
    )
    if spec.kind in ("qwen3", "qwen3.5"):
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN3_TOKENS])
    tokenizer.chat_template = chat_template(spec.kind)
    return tokenizer


def _text_fields(spec: TinySpec, tokenizer) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return decoder_fields(
        spec,
        tokenizer,
        bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|endoftext|>"),
    )


def _vision_token_ids(tokenizer) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return {
        "image_token_id": ids("<|image_pad|>"),
        "video_token_id": ids("<|video_pad|>"),
        "vision_start_token_id": ids("<|vision_start|>"),
        "vision_end_token_id": ids("<|vision_end|>"),
    }


def _mrope_section(head_dim: int) -> list[int]:
    # Qwen's multimodal rope splits head_dim/2 rotary frequencies over (time, height, width)
    # in the proportions 2:3:3 (16, 24, 24 for head_dim 128).
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def build_config(spec: TinySpec, tokenizer):
    import transformers as tf

    text = _text_fields(spec, tokenizer)
    head_dim = spec.hidden_size // spec.num_heads
    mrope = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": _mrope_section(head_dim)}
    vision = {"depth": spec.vision_depth, "num_heads": 2, "initializer_range": spec.initializer_range}
    if spec.kind == "text":
        return tf.Qwen2Config(**text, tie_word_embeddings=True, rope_parameters={"rope_theta": 1000000.0})
    if spec.kind == "qwen3":
        return tf.Qwen3Config(
            **text, head_dim=head_dim, tie_word_embeddings=True, rope_parameters={"rope_theta": 1000000.0}
        )
    if spec.kind == "vl":
        vision_config = {
            **vision,
            "hidden_size": spec.vision_hidden_size,
            "intermediate_size": 2 * spec.vision_hidden_size,
            "out_hidden_size": spec.hidden_size,
            "window_size": 112,
            "fullatt_block_indexes": [spec.vision_depth - 1],
        }
        return tf.Qwen2_5_VLConfig(
            text_config={**text, "rope_parameters": mrope},
            vision_config=vision_config,
            tie_word_embeddings=True,
            **_vision_token_ids(tokenizer),
        )
    if spec.kind == "qwen2-vl":
        vision_config = {
            **vision,
            "embed_dim": spec.vision_hidden_size,
            "hidden_size": spec.hidden_size,
            "mlp_ratio": 2,
        }
        return tf.Qwen2VLConfig(
            text_config={**text, "rope_parameters": mrope},
            vision_config=vision_config,
            tie_word_embeddings=True,
            **_vision_token_ids(tokenizer),
        )
    if spec.kind == "qwen3-vl":
        text3 = {**text, "head_dim": head_dim, "rope_parameters": {**mrope, "mrope_interleaved": True}}
        text3.pop("bos_token_id")
        text3.pop("eos_token_id")
        vision_config = {
            **vision,
            "hidden_size": spec.vision_hidden_size,
            "intermediate_size": 2 * spec.vision_hidden_size,
            "out_hidden_size": spec.hidden_size,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0],
        }
        return tf.Qwen3VLConfig(
            text_config=text3, vision_config=vision_config, tie_word_embeddings=True, **_vision_token_ids(tokenizer)
        )
    if spec.kind == "qwen3.5":
        # Gated DeltaNet layers (linear attention) before a full-attention one, as the real 3:1 pattern, shortened
        text35 = {
            **text,
            "head_dim": head_dim,
            "rope_parameters": {**mrope, "mrope_interleaved": True, "partial_rotary_factor": 1.0},
            "layer_types": ["linear_attention" if i % 2 == 0 else "full_attention" for i in range(spec.num_layers)],
            "linear_key_head_dim": head_dim,
            "linear_value_head_dim": head_dim,
            "linear_num_key_heads": spec.num_kv_heads,
            "linear_num_value_heads": spec.num_heads,
        }
        vision_config = {
            **vision,
            "hidden_size": spec.vision_hidden_size,
            "intermediate_size": 2 * spec.vision_hidden_size,
            "out_hidden_size": spec.hidden_size,
            "num_position_embeddings": 64,
        }
        return tf.Qwen3_5Config(
            text_config=text35, vision_config=vision_config, tie_word_embeddings=True, **_vision_token_ids(tokenizer)
        )
    raise ValueError(f"not a Qwen kind: {spec.kind!r}")


def build_processor(spec: TinySpec, tokenizer):
    import transformers as tf

    sizes = {"min_pixels": spec.min_pixels, "max_pixels": spec.max_pixels}
    if spec.kind in ("qwen3-vl", "qwen3.5"):  # Qwen3.5 checkpoints ship Qwen3-VL's processor
        patch = 16
        image_processor = tf.Qwen2VLImageProcessor(**sizes, patch_size=patch)
        video_processor = tf.Qwen3VLVideoProcessor(patch_size=patch)
        own = chat_template(spec.kind)
        return tf.Qwen3VLProcessor(image_processor, tokenizer, video_processor, chat_template=own)
    image_processor = tf.Qwen2VLImageProcessor(**sizes)
    video_processor = tf.Qwen2VLVideoProcessor()
    processor_class = tf.Qwen2_5_VLProcessor if spec.kind == "vl" else tf.Qwen2VLProcessor
    return processor_class(image_processor, tokenizer, video_processor, chat_template=CHAT_TEMPLATE)


def _make(spec: TinySpec) -> Parts:
    tokenizer = build_tokenizer(spec)
    config = build_config(spec, tokenizer)
    processor = None if spec.kind in TEXT_KINDS else build_processor(spec, tokenizer)
    return Parts(config, tokenizer, processor, stop_tokens=("<|im_end|>", "<|endoftext|>"), pad_token="<|endoftext|>")


TEXT_KINDS = ("text", "qwen3")
for _name, _class, _folder, _summary in (
    ("text", "Qwen2ForCausalLM", "tiny-qwen2", "Qwen2 / Qwen2.5 text"),
    ("qwen3", "Qwen3ForCausalLM", "tiny-qwen3", "Qwen3 text, its official template (thinking, tools)"),
    ("vl", "Qwen2_5_VLForConditionalGeneration", "tiny-qwen2.5-vl", "Qwen2.5-VL"),
    ("qwen2-vl", "Qwen2VLForConditionalGeneration", "tiny-qwen2-vl", "Qwen2-VL"),
    ("qwen3-vl", "Qwen3VLForConditionalGeneration", "tiny-qwen3-vl", "Qwen3-VL"),
    ("qwen3.5", "Qwen3_5ForConditionalGeneration", "tiny-qwen3.5", "Qwen3.5: Gated DeltaNet + attention, pictures"),
):
    kind(
        _name,
        _class,
        _folder,
        template=chat_template(_name),
        vision=_name not in TEXT_KINDS,
        summary=_summary,
    )(_make)
