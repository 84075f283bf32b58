"""Tiny builds of text families other than Qwen's, each with its family's special tokens and chat template.

Every kind is the family's real transformers architecture at the spec's size, with the shape-defining settings of
its hub config kept (soft-capping, logit and embedding multipliers, sliding and linear-attention layers, MLA, experts
and router loss), a byte-level BPE with the family's own bos/eos/pad and turn tokens, the chat template the hub
checkpoint ships (tuning/assets/templates/, sources in SOURCES.md) and, as `stop_tokens`, the eos list of its
generation_config with the end of a turn first. Sliding windows are shrunk to SLIDING_WINDOW so that a test's
sequences cross them; two layers hold one of each attention type where a family mixes them.
"""

from __future__ import annotations

import dataclasses

from tuning.tiny import qwen
from tuning.tiny.core import Parts, TinySpec, bpe_tokenizer, decoder_fields, kind, template

SLIDING_WINDOW = 16  # real windows are 128-4096 tokens; 16 makes a few-dozen-token test cross them
EXPERTS, EXPERTS_PER_TOKEN = 4, 2  # real MoE layers have 8-512 experts; 4 with top-2 keeps routing real


def _decoder(spec: TinySpec, tokenizer, **extra) -> dict:
    """The config fields every decoder shares, at the spec's size, with the tokenizer's bos/eos/pad ids."""
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    return decoder_fields(spec, tokenizer, **ids, **extra)


def _head_dim(spec: TinySpec) -> int:
    return spec.hidden_size // spec.num_heads


def _layer_types(spec: TinySpec, period: int, local: str = "sliding_attention") -> list[str]:
    # The family's period (Gemma 3: five local layers, then a global one); the last layer is always global so
    # that even two layers hold both kinds.
    n = spec.num_layers
    return ["full_attention" if (i + 1) % period == 0 or i == n - 1 else local for i in range(n)]


LLAMA_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>")  # fmt: skip


@kind("llama", "LlamaForCausalLM", "tiny-llama", template=template("llama-3.2"), summary="Llama 3.2 Instruct")
def llama(spec: TinySpec) -> Parts:
    import transformers as tf

    # No pad token, as in the real tokenizer; bos is added by the tokenizer and written by the template.
    tokenizer = bpe_tokenizer(
        spec, LLAMA_TOKENS, template("llama-3.2"), bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        add_bos_token=True,
    )  # fmt: skip
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip
    config = tf.LlamaConfig(
        **_decoder(spec, tokenizer, max_position_embeddings=131072), rope_parameters=rope, tie_word_embeddings=True
    )
    return Parts(config, tokenizer, stop_tokens=("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"))


def _gemma_tokenizer(spec: TinySpec, name: str, extra: tuple[str, ...] = ()):
    special = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>", *extra)
    return bpe_tokenizer(
        spec, special, template(name), bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        add_bos_token=True,
    )  # fmt: skip


@kind("gemma2", "Gemma2ForCausalLM", "tiny-gemma2", template=template("gemma-2"), summary="Gemma 2 it (eager only)")
def gemma2(spec: TinySpec) -> Parts:
    import transformers as tf

    tokenizer = _gemma_tokenizer(spec, "gemma-2")
    head_dim = _head_dim(spec)
    config = tf.Gemma2Config(
        **_decoder(spec, tokenizer),
        head_dim=head_dim,
        query_pre_attn_scalar=head_dim,  # gemma-2-2b/9b: 256, their head_dim
        final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0,
        sliding_window=SLIDING_WINDOW,
        layer_types=_layer_types(spec, 2),
        tie_word_embeddings=True,
    )
    return Parts(config, tokenizer, stop_tokens=("<end_of_turn>", "<eos>"))


@kind("gemma3-text", "Gemma3ForCausalLM", "tiny-gemma3-text", template=template("gemma-3"), summary="Gemma 3 1B it")
def gemma3_text(spec: TinySpec) -> Parts:
    import transformers as tf

    tokenizer = _gemma_tokenizer(spec, "gemma-3", ("<start_of_image>", "<end_of_image>"))
    head_dim = _head_dim(spec)
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}  # fmt: skip
    config = tf.Gemma3TextConfig(
        **_decoder(spec, tokenizer),
        head_dim=head_dim,
        query_pre_attn_scalar=head_dim,
        sliding_window=SLIDING_WINDOW,
        layer_types=_layer_types(spec, 6),
        rope_parameters=rope,
        tie_word_embeddings=True,
    )
    return Parts(config, tokenizer, stop_tokens=("<end_of_turn>", "<eos>"))


MISTRAL_TOKENS = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                  "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]")  # fmt: skip


def _mistral_tokenizer(spec: TinySpec, special: tuple[str, ...], name: str):
    # No pad token, as in the real tokenizers.
    return bpe_tokenizer(
        spec, special, template(name), bos_token="<s>", eos_token="</s>", unk_token="<unk>", add_bos_token=True
    )


@kind("mistral", "MistralForCausalLM", "tiny-mistral", template=template("mistral-7b-v0.3"),
      summary="Mistral 7B Instruct v0.3, with a sliding window")  # fmt: skip
def mistral(spec: TinySpec) -> Parts:
    import transformers as tf

    tokenizer = _mistral_tokenizer(spec, MISTRAL_TOKENS, "mistral-7b-v0.3")
    # v0.3 itself has no window (v0.1 had 4096): set so that the sliding-window path is covered.
    config = tf.MistralConfig(
        **_decoder(spec, tokenizer),
        head_dim=_head_dim(spec),
        sliding_window=SLIDING_WINDOW,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )
    return Parts(config, tokenizer, stop_tokens=("</s>",))


@kind("mixtral", "MixtralForCausalLM", "tiny-mixtral", template=template("mixtral"), summary="Mixtral 8x7B Instruct")
def mixtral(spec: TinySpec) -> Parts:
    import transformers as tf

    # Mixtral's v1 vocabulary: [INST] is plain text, not a token.
    tokenizer = _mistral_tokenizer(spec, ("<unk>", "<s>", "</s>"), "mixtral")
    config = tf.MixtralConfig(
        **_decoder(spec, tokenizer),
        head_dim=_head_dim(spec),
        num_local_experts=EXPERTS,
        num_experts_per_tok=EXPERTS_PER_TOKEN,
        router_aux_loss_coef=0.02,
        output_router_logits=False,
        sliding_window=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )
    return Parts(config, tokenizer, stop_tokens=("</s>",))


PHI3_TOKENS = ("<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>")


@kind("phi3", "Phi3ForCausalLM", "tiny-phi3", template=template("phi-3.5"), summary="Phi-3.5 mini instruct")
def phi3(spec: TinySpec) -> Parts:
    import transformers as tf

    tokenizer = bpe_tokenizer(
        spec, PHI3_TOKENS, template("phi-3.5"), bos_token="<s>", eos_token="<|endoftext|>",
        pad_token="<|endoftext|>", unk_token="<unk>",
    )  # fmt: skip
    # Fused qkv_proj and gate_up_proj are Phi-3's own; its longrope scaling is left out (default rope).
    config = tf.Phi3Config(**_decoder(spec, tokenizer), tie_word_embeddings=False)
    return Parts(config, tokenizer, stop_tokens=("<|end|>", "<|assistant|>", "<|endoftext|>"))


def _qwen3_tokenizer(spec: TinySpec, chat_template: str):
    # Qwen3's vocabulary and tokens (think, tool call), whatever the kind's name.
    tokenizer = qwen.build_tokenizer(dataclasses.replace(spec, kind="qwen3"))
    tokenizer.chat_template = chat_template
    return tokenizer


QWEN_STOPS = ("<|im_end|>", "<|endoftext|>")


@kind("qwen3-moe", "Qwen3MoeForCausalLM", "tiny-qwen3-moe", template=qwen.chat_template("qwen3"),
      summary="Qwen3 30B-A3B (MoE), Qwen3's template")  # fmt: skip
def qwen3_moe(spec: TinySpec) -> Parts:
    import transformers as tf

    tokenizer = _qwen3_tokenizer(spec, qwen.chat_template("qwen3"))
    config = tf.Qwen3MoeConfig(
        **_decoder(spec, tokenizer),
        head_dim=_head_dim(spec),
        num_experts=EXPERTS,
        num_experts_per_tok=EXPERTS_PER_TOKEN,
        moe_intermediate_size=spec.intermediate_size,
        norm_topk_prob=True,
        router_aux_loss_coef=0.001,
        output_router_logits=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )
    return Parts(config, tokenizer, stop_tokens=QWEN_STOPS, pad_token="<|endoftext|>")


@kind("qwen3-next", "Qwen3NextForCausalLM", "tiny-qwen3-next", template=template("qwen3-next"),
      summary="Qwen3-Next 80B-A3B Instruct: Gated DeltaNet + full attention, MoE")  # fmt: skip
def qwen3_next(spec: TinySpec) -> Parts:
    import transformers as tf

    tokenizer = _qwen3_tokenizer(spec, template("qwen3-next"))
    head_dim = _head_dim(spec)
    config = tf.Qwen3NextConfig(
        **_decoder(spec, tokenizer),
        head_dim=head_dim,
        layer_types=_layer_types(spec, 4, local="linear_attention"),
        linear_num_key_heads=spec.num_kv_heads,
        linear_num_value_heads=spec.num_heads,
        linear_key_head_dim=head_dim,
        linear_value_head_dim=head_dim,
        linear_conv_kernel_dim=4,
        num_experts=EXPERTS,
        num_experts_per_tok=EXPERTS_PER_TOKEN,
        moe_intermediate_size=spec.intermediate_size,
        shared_expert_intermediate_size=spec.intermediate_size,
        norm_topk_prob=True,
        router_aux_loss_coef=0.001,
        output_router_logits=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25},
    )
    return Parts(config, tokenizer, stop_tokens=QWEN_STOPS, pad_token="<|endoftext|>")


GPT_OSS_TOKENS = ("<|startoftext|>", "<|endoftext|>", "<|return|>", "<|constrain|>", "<|channel|>", "<|start|>",
                  "<|end|>", "<|message|>", "<|call|>")  # fmt: skip


@kind("gpt-oss", "GptOssForCausalLM", "tiny-gpt-oss", template=template("gpt-oss"),
      summary="gpt-oss 20B: MoE, attention sinks, sliding layers, harmony template (eager only)")  # fmt: skip
def gpt_oss(spec: TinySpec) -> Parts:
    import transformers as tf

    tokenizer = bpe_tokenizer(
        spec, GPT_OSS_TOKENS, template("gpt-oss"), bos_token="<|startoftext|>", eos_token="<|return|>",
        pad_token="<|endoftext|>",
    )  # fmt: skip
    rope = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
            "truncate": False, "original_max_position_embeddings": 4096}  # fmt: skip
    config = tf.GptOssConfig(
        **_decoder(spec, tokenizer),
        head_dim=_head_dim(spec),
        num_local_experts=EXPERTS,
        num_experts_per_tok=EXPERTS_PER_TOKEN,
        router_aux_loss_coef=0.9,
        output_router_logits=False,
        sliding_window=SLIDING_WINDOW,
        layer_types=_layer_types(spec, 2),
        attention_bias=True,
        rope_parameters=rope,
    )
    # <|return|> ends the final answer, <|call|> a tool call; <|end|> closes every other message and is no stop.
    return Parts(config, tokenizer, stop_tokens=("<|return|>", "<|call|>", "<|endoftext|>"))


DEEPSEEK_TOKENS = ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<｜User｜>", "<｜Assistant｜>",
                   "<think>", "</think>", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>",
                   "<｜tool▁call▁end｜>", "<｜tool▁sep｜>", "<｜tool▁output▁begin｜>",
                   "<｜tool▁output▁end｜>")  # fmt: skip


@kind("deepseek-v3", "DeepseekV3ForCausalLM", "tiny-deepseek-v3", template=template("deepseek-v3.1"),
      summary="DeepSeek-V3 / V3.1: MLA + MoE with a shared expert, V3.1's template")  # fmt: skip
def deepseek_v3(spec: TinySpec) -> Parts:
    import transformers as tf

    tokenizer = bpe_tokenizer(
        spec, DEEPSEEK_TOKENS, template("deepseek-v3.1"), bos_token="<｜begin▁of▁sentence｜>",
        eos_token="<｜end▁of▁sentence｜>", pad_token="<｜end▁of▁sentence｜>",
    )  # fmt: skip
    head_dim = _head_dim(spec)
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "beta_fast": 32.0, "beta_slow": 1.0,
            "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096}  # fmt: skip
    config = tf.DeepseekV3Config(
        **_decoder(spec, tokenizer, num_key_value_heads=spec.num_heads),  # MLA: as many key/value heads as queries
        q_lora_rank=3 * head_dim,
        kv_lora_rank=2 * head_dim,
        qk_nope_head_dim=head_dim,
        qk_rope_head_dim=head_dim // 2,
        v_head_dim=head_dim,
        n_routed_experts=EXPERTS,
        num_experts_per_tok=EXPERTS_PER_TOKEN,
        n_shared_experts=1,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        moe_intermediate_size=spec.intermediate_size,
        first_k_dense_replace=1,  # V3: the first 3 of 61 layers are dense; here the first of two
        rope_parameters=rope,
    )
    return Parts(config, tokenizer, stop_tokens=("<｜end▁of▁sentence｜>",))


GRANITE_TOKENS = ("<|end_of_text|>", "<|start_of_role|>", "<|end_of_role|>", "<|tool_call|>", "<|start_of_cite|>",
                  "<|end_of_cite|>")  # fmt: skip


@kind("granite", "GraniteForCausalLM", "tiny-granite", template=template("granite-3.3"),
      summary="Granite 3.3 2B instruct: embedding, residual, attention and logit multipliers")  # fmt: skip
def granite(spec: TinySpec) -> Parts:
    import transformers as tf

    # One token is bos, eos, pad and unk, as in the real tokenizer: padding looks like the end of a turn.
    end = "<|end_of_text|>"
    tokenizer = bpe_tokenizer(
        spec, GRANITE_TOKENS, template("granite-3.3"), bos_token=end, eos_token=end, pad_token=end, unk_token=end
    )
    config = tf.GraniteConfig(
        **_decoder(spec, tokenizer),
        embedding_multiplier=12.0,
        residual_multiplier=0.22,
        logits_scaling=8.0,
        attention_multiplier=1.0 / _head_dim(spec),  # the real 0.015625 is 1/head_dim (64)
        rope_parameters={"rope_type": "default", "rope_theta": 10000000.0},
        tie_word_embeddings=True,
    )
    return Parts(config, tokenizer, stop_tokens=(end,))


COHERE_TOKENS = ("<PAD>", "<UNK>", "<CLS>", "<SEP>", "<MASK_TOKEN>", "<BOS_TOKEN>", "<EOS_TOKEN>", "<EOP_TOKEN>",
                 "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>",
                 "<|SYSTEM_TOKEN|>", "<|START_RESPONSE|>", "<|END_RESPONSE|>", "<|START_THINKING|>",
                 "<|END_THINKING|>", "<|START_ACTION|>", "<|END_ACTION|>", "<|START_TOOL_RESULT|>",
                 "<|END_TOOL_RESULT|>")  # fmt: skip


@kind("command-r", "Cohere2ForCausalLM", "tiny-command-r", template=template("command-r7b"),
      summary="Command R7B: logit scale, sliding and global layers, its default template")  # fmt: skip
def command_r(spec: TinySpec) -> Parts:
    import transformers as tf

    tokenizer = bpe_tokenizer(
        spec, COHERE_TOKENS, template("command-r7b"), bos_token="<BOS_TOKEN>", eos_token="<|END_OF_TURN_TOKEN|>",
        pad_token="<PAD>", unk_token="<UNK>", add_bos_token=True,
    )  # fmt: skip
    config = tf.Cohere2Config(
        **_decoder(spec, tokenizer),
        logit_scale=0.25,
        sliding_window=SLIDING_WINDOW,
        layer_types=_layer_types(spec, 4),
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
        tie_word_embeddings=True,
    )
    return Parts(config, tokenizer, stop_tokens=("<|END_OF_TURN_TOKEN|>",))


GLM4_TOKENS = ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
               "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
               "<|end_of_video|>")  # fmt: skip


@kind("glm4", "Glm4ForCausalLM", "tiny-glm4", template=template("glm-4-0414"), summary="GLM-4 9B 0414")
def glm4(spec: TinySpec) -> Parts:
    import transformers as tf

    # No bos ("[gMASK]<sop>" opens every prompt) and no end-of-turn token: an answer ends where the model writes
    # the next role, so <|user|> and <|observation|> stop generation.
    tokenizer = bpe_tokenizer(
        spec, GLM4_TOKENS, template("glm-4-0414"), eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    config = tf.Glm4Config(
        **_decoder(spec, tokenizer),
        head_dim=_head_dim(spec),
        attention_bias=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        tie_word_embeddings=False,
    )
    return Parts(config, tokenizer, stop_tokens=("<|user|>", "<|observation|>", "<|endoftext|>"))
