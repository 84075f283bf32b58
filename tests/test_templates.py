"""Any chat template: every assistant turn is trained exactly as the model sees it at inference.

Real templates (tests/fixtures/templates, sources in SOURCES.md) are put on the tiny tokenizers with their special
tokens; one of them on a SentencePiece-style tokenizer. For every template and conversation the property of the
encoder's docstring is checked, not golden lists alone: for each trained assistant turn k, some sample starts with
exactly the ids of apply_chat_template(messages[:k], add_generation_prompt=True), the supervised ids of turn k
follow, and no other token is supervised."""

from __future__ import annotations

import copy

import pytest

from tests.conftest import REPO
from tests.helpers import supervised_runs
from tuning.data.encode import IGNORE_INDEX, Encoder
from tuning.data.errors import DataError
from tuning.data.formats import parse_record

TEMPLATES = REPO / "tests" / "fixtures" / "templates"

MISTRAL_TOKENS = ["[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[TOOL_RESULTS]",
                  "[/TOOL_RESULTS]"]  # fmt: skip
COMMAND_R_TOKENS = ["<BOS_TOKEN>", "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|USER_TOKEN|>",
                    "<|CHATBOT_TOKEN|>", "<|SYSTEM_TOKEN|>", "<|START_RESPONSE|>", "<|END_RESPONSE|>",
                    "<|START_THINKING|>", "<|END_THINKING|>", "<|START_ACTION|>", "<|END_ACTION|>",
                    "<|START_TOOL_RESULT|>", "<|END_TOOL_RESULT|>"]  # fmt: skip
# GLM's role tokens, and its reasoning and tool-call tags as special tokens too (the harder case for finding where a
# turn ends; tests/test_templates_families.py checks the same targets with the tags as ordinary tokens)
GLM_ROLES = ["[gMASK]", "<sop>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
GLM_TAGS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>",
            "</arg_value>"]  # fmt: skip

# template -> (tokenizer family, special tokens to add, bos, eos)
SPECIALS = {
    "qwen3": ("qwen3", [], None, None),
    "qwen3-thinking-2507": ("qwen3", [], None, None),
    "qwen3.5": ("qwen3", [], None, None),
    "qwen2.5": ("qwen3", [], None, None),
    "llama-3.1": (
        "bpe",
        ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"],
        "<|begin_of_text|>",
        "<|eot_id|>",
    ),
    "gemma-2": ("bpe", ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<end_of_turn>"),
    "internlm2": ("bpe", ["<s>", "</s>"], "<s>", "<|im_end|>"),
    "mistral-nemo": (
        "bpe",
        ["<s>", "</s>", *MISTRAL_TOKENS],
        "<s>",
        "</s>",
    ),
    "deepseek-r1-distill": (
        "bpe",
        [
            "<｜begin▁of▁sentence｜>",
            "<｜end▁of▁sentence｜>",
            "<｜User｜>",
            "<｜Assistant｜>",
            "<｜tool▁calls▁begin｜>",
            "<｜tool▁calls▁end｜>",
            "<｜tool▁call▁begin｜>",
            "<｜tool▁call▁end｜>",
            "<｜tool▁sep｜>",
            "<｜tool▁outputs▁begin｜>",
            "<｜tool▁outputs▁end｜>",
            "<｜tool▁output▁begin｜>",
            "<｜tool▁output▁end｜>",
        ],
        "<｜begin▁of▁sentence｜>",
        "<｜end▁of▁sentence｜>",
    ),
    "mistral-7b-v0.3": (
        "sentencepiece",
        MISTRAL_TOKENS,
        "<s>",
        "</s>",
    ),
    # its named templates, as the tokenizer carries them: "tool_use" when tools are given, else "default"
    "command-r7b": ("bpe", COMMAND_R_TOKENS, "<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>"),
    "command-r7b-tool_use": ("bpe", COMMAND_R_TOKENS, "<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>"),
    "nemotron-nano-v2": ("bpe", ["<SPECIAL_10>", "<SPECIAL_11>", "<SPECIAL_12>"], "<s>", "<SPECIAL_12>"),
    "glm-4.5": ("bpe", [*GLM_ROLES, *GLM_TAGS], None, "<|endoftext|>"),
    "glm-4.7": ("bpe", [*GLM_ROLES, *GLM_TAGS], None, "<|endoftext|>"),
}

# template -> the tokens generation stops at, beyond the tokenizer's end-of-sequence token (the model's own
# generation config: GLM stops at the next message's role token, as it writes no end-of-turn token)
STOPS = {"glm-4.5": ("<|user|>", "<|observation|>"), "glm-4.7": ("<|user|>", "<|observation|>")}

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


def user(text):
    return {"role": "user", "content": text}


def assistant(text, **fields):
    return {"role": "assistant", "content": text, **fields}


CONVERSATIONS = {
    "single": [user("What is 2+2?"), assistant("4.")],
    "multi": [user("What is 2+2?"), assistant("4."), user("And times 3?"), assistant("12.")],
    "system": [
        {"role": "system", "content": "Answer briefly."},
        user("What is 2+2?"),
        assistant("4."),
        user("And times 3?"),
        assistant("12."),
    ],
    "reasoning": [
        user("What is 2+2?"),
        assistant("<think>\nTwo and two make four.\n</think>\n\n4."),
        user("And times 3?"),
        assistant("<think>\nFour times three is twelve.\n</think>\n\n12."),
    ],
    "reasoning_content": [
        user("What is 2+2?"),
        assistant("4.", reasoning_content="Two and two make four."),
        user("And times 3?"),
        assistant("12.", reasoning_content="Four times three is twelve."),
    ],
    "tools": [
        user("What is the weather in Paris?"),
        assistant(
            None,
            tool_calls=[
                {
                    "id": "call00001",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                }
            ],
        ),
        {"role": "tool", "tool_call_id": "call00001", "content": '{"sky": "sunny"}'},
        assistant("It is sunny in Paris."),
    ],
}

# (template, conversation) -> what the refusal says: templates that cannot render a conversation as it is,
# or that would drop part of it, make it a named bad sample.
REFUSED = {
    ("gemma-2", "system"): "System role not supported",
    ("gemma-2", "tools"): "does not render the sample's tools",
    ("gemma-2", "reasoning_content"): "does not render the assistant's reasoning_content",
    ("internlm2", "reasoning_content"): "does not render the assistant's reasoning_content",
    ("internlm2", "tools"): "does not render the sample's tools",
    ("llama-3.1", "reasoning_content"): "does not render the assistant's reasoning_content",
    ("qwen2.5", "reasoning_content"): "does not render the assistant's reasoning_content",
    ("mistral-nemo", "reasoning_content"): "does not render the assistant's reasoning_content",
    ("mistral-7b-v0.3", "reasoning_content"): "does not render the assistant's reasoning_content",
    # R1's prompt opens "<think>\n": an answer without reasoning cannot follow it (the stated policy)
    ("deepseek-r1-distill", "single"): "which the answer must continue",
    ("deepseek-r1-distill", "multi"): "which the answer must continue",
    ("deepseek-r1-distill", "system"): "which the answer must continue",
    ("deepseek-r1-distill", "reasoning_content"): "which the answer must continue",
    ("deepseek-r1-distill", "tools"): "does not render the sample's tools",
    ("command-r7b", "reasoning_content"): "does not render the assistant's reasoning_content",
    ("command-r7b-tool_use", "reasoning_content"): "does not render the assistant's reasoning_content",
    ("nemotron-nano-v2", "reasoning_content"): "does not render the assistant's reasoning_content",
    # its prompt opens "<think>\n"; it writes a final turn of tool calls alone without it
    ("nemotron-nano-v2", "tools"): "which the answer must continue",
}


def sentencepiece_tokenizer():
    """A Llama/Mistral-style tokenizer: '▁' for spaces, prepended to every text segment (the legacy SentencePiece
    behaviour that makes a segment tokenized alone start with '▁')."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tuning.tiny import _corpus_text

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    bpe.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    bpe.train_from_iterator([*_corpus_text().splitlines(), "{}[]:\"',._-+=?!0123456789"], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def base_tokenizers(tiny_text):
    from transformers import AutoTokenizer

    from tuning.tiny import ensure_tiny

    return {
        "qwen3": AutoTokenizer.from_pretrained(ensure_tiny("qwen3")),
        "bpe": AutoTokenizer.from_pretrained(tiny_text),
        "sentencepiece": sentencepiece_tokenizer(),
    }


def tokenizer_for(base_tokenizers, name: str):
    family, specials, bos, eos = SPECIALS[name]
    tokenizer = copy.deepcopy(base_tokenizers[family])
    tokenizer.add_special_tokens({"additional_special_tokens": specials}, replace_extra_special_tokens=False)
    if bos or eos:
        tokenizer.add_special_tokens({key: v for key, v in (("bos_token", bos), ("eos_token", eos)) if v})
    if name == "qwen3":
        return tokenizer  # the tiny Qwen3's own template
    if name == "command-r7b":
        tokenizer.chat_template = {n: (TEMPLATES / f"{name}-{n}.jinja").read_text(encoding="utf-8")
                                   for n in ("default", "tool_use")}  # fmt: skip
        return tokenizer
    tokenizer.chat_template = (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")
    return tokenizer


def conversation(messages: list[dict]):
    record = {"messages": copy.deepcopy(messages)}
    if any(m.get("tool_calls") for m in messages):
        record["tools"] = TOOLS
    return parse_record(record, "conv.json", "sample 0 (index 0)", 0)


def prompt_ids(tokenizer, conv, messages: list[dict]) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tools=conv.tools, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"])


@pytest.mark.parametrize("conv_name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("template", sorted(SPECIALS))
def test_every_turn_is_trained_exactly_as_its_inference_prompt(base_tokenizers, template, conv_name):
    tokenizer = tokenizer_for(base_tokenizers, template)
    conv = conversation(CONVERSATIONS[conv_name])
    encoder = Encoder(tokenizer, None, max_length=4096)
    if (template, conv_name) in REFUSED:
        with pytest.raises(DataError) as refused:
            encoder.encode(conv)
        assert REFUSED[template, conv_name] in str(refused.value)
        assert refused.value.where == "sample 0 (index 0)" and refused.value.fix
        return
    samples = encoder.encode(conv)
    messages = encoder.template_messages(conv)
    covered = set()
    for k, message in enumerate(conv.messages):
        if message.role != "assistant":
            continue
        prompt = prompt_ids(tokenizer, conv, messages[:k])
        found = None
        for s, sample in enumerate(samples):
            if sample.input_ids[: len(prompt)] == prompt and sample.labels[len(prompt)] != IGNORE_INDEX:
                found = s
                break
        assert found is not None, f"turn {k}: no sample starts with its prompt"
        sample = samples[found]
        end = len(prompt)
        while end < len(sample.labels) and sample.labels[end] != IGNORE_INDEX:
            covered.add((found, end))
            end += 1
        target = tokenizer.decode(sample.input_ids[len(prompt) : end])
        stops = (tokenizer.eos_token, "<|im_end|>", "<|eot_id|>", "<end_of_turn>", *STOPS.get(template, ()))
        assert target.endswith(stops), target
        visible = (message.text.split("</think>")[-1]).strip()
        assert "".join(visible.split()) in "".join(target.split()), (visible, target)
        for call in message.tool_calls or []:
            assert call["function"]["name"] in target
    supervised = {(s, i) for s, sample in enumerate(samples) for i, label in enumerate(sample.labels) if label != -100}
    assert supervised == covered, "tokens are supervised outside the assistant targets"


def runs(tokenizer, sample) -> list[tuple[str, bool]]:
    return supervised_runs(tokenizer, sample.input_ids, sample.labels)


def test_qwen3_reasoning_kept_only_after_the_last_query_gives_one_sample_per_turn(base_tokenizers):
    tokenizer = tokenizer_for(base_tokenizers, "qwen3")
    first, second = Encoder(tokenizer).encode(conversation(CONVERSATIONS["reasoning"]))
    assert runs(tokenizer, first) == [
        ("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", False),
        ("<think>\nTwo and two make four.\n</think>\n\n4.<|im_end|>", True),
        ("\n", False),
    ]
    # at the second turn the template has dropped the first turn's reasoning: that turn is context, as rendered
    assert runs(tokenizer, second) == [
        (
            "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4.<|im_end|>\n"
            "<|im_start|>user\nAnd times 3?<|im_end|>\n<|im_start|>assistant\n",
            False,
        ),
        ("<think>\nFour times three is twelve.\n</think>\n\n12.<|im_end|>", True),
        ("\n", False),
    ]
    [same] = Encoder(tokenizer).encode(conversation(CONVERSATIONS["reasoning"][:2]))
    assert same.input_ids == first.input_ids


def test_qwen3_empty_think_block_is_learned_and_enable_thinking_false_puts_it_in_the_prompt(base_tokenizers):
    tokenizer = tokenizer_for(base_tokenizers, "qwen3")
    [default] = Encoder(tokenizer).encode(conversation(CONVERSATIONS["single"]))
    assert [r for r in runs(tokenizer, default) if r[1]] == [("<think>\n\n</think>\n\n4.<|im_end|>", True)]
    [no_thinking] = Encoder(tokenizer, template_kwargs={"enable_thinking": False}).encode(
        conversation(CONVERSATIONS["single"])
    )
    assert runs(tokenizer, no_thinking) == [
        ("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n", False),
        ("4.<|im_end|>", True),
        ("\n", False),
    ]


def test_appending_templates_keep_one_sample_per_conversation(base_tokenizers):
    for name in ("qwen2.5", "llama-3.1", "internlm2", "gemma-2"):
        tokenizer = tokenizer_for(base_tokenizers, name)
        [sample] = Encoder(tokenizer).encode(conversation(CONVERSATIONS["multi"]))
        trained = [text for text, is_trained in runs(tokenizer, sample) if is_trained]
        assert [t[:3] for t in trained] == ["4.<", "12."], (name, trained)


def test_r1_policy_context_is_the_prompt_and_target_the_reasoning_and_answer(base_tokenizers):
    tokenizer = tokenizer_for(base_tokenizers, "deepseek-r1-distill")
    first, second = Encoder(tokenizer).encode(conversation(CONVERSATIONS["reasoning"]))
    assert runs(tokenizer, first) == [
        ("<｜begin▁of▁sentence｜><｜User｜>What is 2+2?<｜Assistant｜><think>\n", False),
        ("Two and two make four.\n</think>\n\n4.<｜end▁of▁sentence｜>", True),
    ]
    assert runs(tokenizer, second)[0][0].endswith(
        "<｜Assistant｜>\n\n4.<｜end▁of▁sentence｜><｜User｜>And times 3?<｜Assistant｜><think>\n"
    )


def test_a_system_prompt_that_moves_to_the_last_user_turn_gives_exact_contexts(base_tokenizers):
    for name in ("mistral-nemo", "mistral-7b-v0.3"):
        tokenizer = tokenizer_for(base_tokenizers, name)
        samples = Encoder(tokenizer).encode(conversation(CONVERSATIONS["system"]))
        assert len(samples) == 2, name
        contexts = [runs(tokenizer, s)[0][0] for s in samples]
        assert all(c.count("Answer briefly.") == 1 for c in contexts)
        assert contexts[1].index("Answer briefly.") > contexts[1].index("4.")  # now in the second user turn


def test_sentencepiece_tokenizer_labels_have_no_stray_prefix_space(base_tokenizers):
    tokenizer = tokenizer_for(base_tokenizers, "mistral-7b-v0.3")
    [sample] = Encoder(tokenizer).encode(conversation(CONVERSATIONS["multi"]))
    whole = tokenizer.apply_chat_template(CONVERSATIONS["multi"], tokenize=True)["input_ids"]
    assert sample.input_ids == list(whole)
    trained = [text for text, is_trained in runs(tokenizer, sample) if is_trained]
    assert [t.strip() for t in trained] == ["4.</s>", "12.</s>"]


def test_a_template_that_raises_makes_a_named_bad_sample_and_the_rest_trains(base_tokenizers, tmp_path):
    from tests.helpers import write_jsonl
    from tuning.data.dataset import build_dataset
    from tuning.data.errors import DataErrors

    tokenizer = tokenizer_for(base_tokenizers, "gemma-2")
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CONVERSATIONS[n]} for n in ("single", "system", "multi")])
    with pytest.raises(DataErrors) as caught:
        build_dataset([str(path)], Encoder(tokenizer), show_progress=False)
    [error] = caught.value.errors
    assert error.where == "line 2" and "System role not supported" in error.problem
    dataset, report = build_dataset([str(path)], Encoder(tokenizer), show_progress=False, skip_bad_samples=True)
    assert report.usable == 2 and len(dataset) == 2 and "System role not supported" in report.bad[0]


def test_the_report_counts_conversations_and_samples(base_tokenizers, tmp_path):
    from tests.helpers import write_jsonl
    from tuning.data.dataset import build_dataset

    tokenizer = tokenizer_for(base_tokenizers, "qwen3")
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CONVERSATIONS[n]} for n in ("single", "reasoning", "multi")])
    dataset, report = build_dataset([str(path)], Encoder(tokenizer), show_progress=False)
    assert (report.usable, report.samples, len(dataset)) == (3, 5, 5)
    assert "usable 3 -> 5 training samples (the chat template rewrites earlier turns" in report.summary()
