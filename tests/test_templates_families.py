"""Where each family's assistant turn ends, golden: the token at which generation stops, never the next turn's opener.

Command-R7B's tool-use template writes the next turn's opener after every turn (prompt or not): the target ends at
its end-of-turn token. GLM writes no end-of-turn token: the target ends at the role token that opens the next
message, which the model generates and stops at (its generation config lists them). Nemotron-Nano-v2 writes a final
turn's text and its tool calls as two turns, each closed by its end-of-sequence token: refused, with that rule. An
error about a --chat_template file names the file. The templates and tiny tokenizers are tests/test_templates.py's.
"""

from __future__ import annotations

import copy

import pytest

from tests.test_templates import CONVERSATIONS, GLM_ROLES, GLM_TAGS, base_tokenizers, conversation, runs, tokenizer_for
from tuning.data.encode import Encoder
from tuning.data.errors import DataError

__all__ = ["base_tokenizers"]  # the module-scoped fixture, shared

OPENER = "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"


def encode(tokenizer, name: str, **kwargs):
    return Encoder(tokenizer, max_length=8192, **kwargs).encode(conversation(CONVERSATIONS[name]))


def trained(tokenizer, samples) -> list[str]:
    return [text for sample in samples for text, is_trained in runs(tokenizer, sample) if is_trained]


def whole_ids(tokenizer, name: str, **kwargs) -> list[int]:
    conv = conversation(CONVERSATIONS[name])
    messages = Encoder(tokenizer).template_messages(conv)
    return list(tokenizer.apply_chat_template(messages, tools=conv.tools, tokenize=True, **kwargs)["input_ids"])


def test_command_r7b_tool_use_targets_end_at_the_end_of_turn_token(base_tokenizers):
    tokenizer = tokenizer_for(base_tokenizers, "command-r7b-tool_use")
    [sample] = encode(tokenizer, "multi")
    layout = runs(tokenizer, sample)
    assert layout[0][0].endswith("What is 2+2?<|END_OF_TURN_TOKEN|>" + OPENER) and not layout[0][1]
    assert layout[1:] == [
        ("<|START_RESPONSE|>4.<|END_RESPONSE|><|END_OF_TURN_TOKEN|>", True),
        ("<|START_OF_TURN_TOKEN|><|USER_TOKEN|>And times 3?<|END_OF_TURN_TOKEN|>" + OPENER, False),
        ("<|START_RESPONSE|>12.<|END_RESPONSE|><|END_OF_TURN_TOKEN|>", True),
    ]
    # the template's rendering of the conversation, but for the opener it writes after the last turn
    whole = whole_ids(tokenizer, "multi")
    opener = tokenizer(OPENER, add_special_tokens=False)["input_ids"]
    assert whole == sample.input_ids + opener


def test_command_r7b_named_templates_default_and_tool_use(base_tokenizers):
    tokenizer = tokenizer_for(base_tokenizers, "command-r7b")
    [plain] = encode(tokenizer, "multi")  # "default": its prompt opens the response
    assert runs(tokenizer, plain)[0][0].endswith(OPENER + "<|START_RESPONSE|>")
    assert trained(tokenizer, [plain]) == [
        "4.<|END_RESPONSE|><|END_OF_TURN_TOKEN|>",
        "12.<|END_RESPONSE|><|END_OF_TURN_TOKEN|>",
    ]
    [tools] = encode(tokenizer, "tools")  # "tool_use", as the tokenizer picks it when tools are given
    assert trained(tokenizer, [tools]) == [
        '<|START_THINKING|><|END_THINKING|><|START_ACTION|>[\n    {"tool_call_id": "0", "tool_name": "get_weather", '
        '"parameters": {"city": "Paris"}}\n]<|END_ACTION|><|END_OF_TURN_TOKEN|>',
        "<|START_RESPONSE|>It is sunny in Paris.<|END_RESPONSE|><|END_OF_TURN_TOKEN|>",
    ]


def test_glm_answer_ends_at_the_role_token_that_follows_it(base_tokenizers):
    tokenizer = tokenizer_for(base_tokenizers, "glm-4.5")
    [sample] = encode(tokenizer, "multi")
    assert runs(tokenizer, sample) == [
        ("[gMASK]<sop><|user|>\nWhat is 2+2?<|assistant|>", False),
        ("\n<think></think>\n4.<|user|>", True),
        ("\nAnd times 3?<|assistant|>", False),
        ("\n<think></think>\n12.<|user|>", True),
    ]
    # the template's rendering of the conversation, then the "<|user|>" the model ends its last answer with
    assert sample.input_ids == [*whole_ids(tokenizer, "multi"), tokenizer.convert_tokens_to_ids("<|user|>")]
    [tools] = encode(tokenizer, "tools")
    assert trained(tokenizer, [tools]) == [
        "\n<think></think>\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
        "</tool_call><|observation|>",
        "\n<think></think>\nIt is sunny in Paris.<|user|>",
    ]
    # reasoning is kept only after the last user message: one sample per turn, each with its exact context
    first, second = encode(tokenizer, "reasoning")
    assert trained(tokenizer, [first, second]) == [
        "\n<think>Two and two make four.</think>\n4.<|user|>",
        "\n<think>Four times three is twelve.</think>\n12.<|user|>",
    ]
    assert runs(tokenizer, second)[0][0].endswith(
        "<|assistant|>\n<think></think>\n4.<|user|>\nAnd times 3?<|assistant|>"
    )


def test_glm_without_thinking_and_with_its_tags_as_ordinary_tokens(base_tokenizers):
    tokenizer = tokenizer_for(base_tokenizers, "glm-4.5")
    [sample] = encode(tokenizer, "single", template_kwargs={"enable_thinking": False})
    assert runs(tokenizer, sample) == [
        ("[gMASK]<sop><|user|>\nWhat is 2+2?/nothink<|assistant|>\n<think></think>", False),
        ("\n4.<|user|>", True),
    ]
    plain = copy.deepcopy(base_tokenizers["bpe"])
    plain.add_special_tokens({"additional_special_tokens": GLM_ROLES, "eos_token": "<|endoftext|>"})
    plain.add_tokens(GLM_TAGS)
    plain.chat_template = tokenizer.chat_template
    for name in ("multi", "tools"):
        assert trained(plain, encode(plain, name)) == trained(tokenizer, encode(tokenizer, name)), name


def test_glm_4_7_prompt_opens_the_think_block_the_answer_closes(base_tokenizers):
    tokenizer = tokenizer_for(base_tokenizers, "glm-4.7")
    [sample] = encode(tokenizer, "single")
    assert runs(tokenizer, sample) == [
        ("[gMASK]<sop><|user|>What is 2+2?<|assistant|><think>", False),
        ("</think>4.<|user|>", True),
    ]
    first, _ = encode(tokenizer, "reasoning")
    assert trained(tokenizer, [first]) == ["Two and two make four.</think>4.<|user|>"]


def test_a_template_without_any_turn_token_closes_answers_with_eos(base_tokenizers):
    """Nothing the template writes would stop generation (llava-hf's LLaVA templates): each answer is closed with the
    tokenizer's end-of-sequence token, where generation stops, and is a sample of its own (later turns' history, as
    the template renders it at inference, does not hold the token)."""
    tokenizer = copy.deepcopy(base_tokenizers["bpe"])  # GLM's template, its role tokens plain text
    tokenizer.chat_template = tokenizer_for(base_tokenizers, "glm-4.5").chat_template
    samples = encode(tokenizer, "multi")
    answers = [m for m in CONVERSATIONS["multi"] if m["role"] == "assistant"]
    targets = trained(tokenizer, samples)
    assert len(samples) == len(targets) == len(answers) > 1
    assert all(text.endswith(tokenizer.eos_token) for text in targets)


def test_a_template_without_any_turn_token_nor_eos_is_refused_for_the_true_reason(base_tokenizers):
    tokenizer = copy.deepcopy(base_tokenizers["bpe"])
    tokenizer.chat_template = tokenizer_for(base_tokenizers, "glm-4.5").chat_template
    tokenizer.eos_token = None
    with pytest.raises(DataError) as refused:
        encode(tokenizer, "single")
    assert "writes no end-of-turn token after an assistant turn, and no special token opens the user message" in str(
        refused.value
    )


def test_nemotron_prompt_opens_think_once(base_tokenizers):
    tokenizer = tokenizer_for(base_tokenizers, "nemotron-nano-v2")
    first, second = encode(tokenizer, "reasoning")
    layout = runs(tokenizer, first)
    assert layout[0][0].endswith("<SPECIAL_11>User\nWhat is 2+2?\n<SPECIAL_11>Assistant\n<think>\n")
    assert layout[1:] == [("Two and two make four.\n</think>\n\n4.\n<SPECIAL_12>", True), ("\n", False)]
    assert trained(tokenizer, [second]) == ["Four times three is twelve.\n</think>\n\n12.\n<SPECIAL_12>"]


def test_nemotron_end_of_sequence_inside_an_answer_is_named_with_its_rule(base_tokenizers):
    """Its template writes a final turn's text and tool calls as two assistant turns, each closed by <SPECIAL_12>:
    at inference generation stops at the first, so the tool calls could never be generated."""
    tokenizer = tokenizer_for(base_tokenizers, "nemotron-nano-v2")
    messages = copy.deepcopy(CONVERSATIONS["tools"])
    messages[1]["content"] = "Let me check."
    with pytest.raises(DataError) as refused:
        Encoder(tokenizer, max_length=8192).encode(conversation(messages))
    problem = refused.value.problem
    assert (
        "writes the end-of-sequence token '<SPECIAL_12>' inside this assistant turn, before '\\n<SPECIAL_11>Assistant"
        in problem
    )
    assert "generation stops at that token" in problem and refused.value.message_index == 1


def test_errors_name_the_chat_template_file(base_tokenizers, tmp_path):
    from tuning.data.processing import Loaded, prepare_processing
    from tuning.families import GENERIC

    tokenizer = tokenizer_for(base_tokenizers, "gemma-2")
    with pytest.raises(DataError) as own:
        encode(tokenizer, "system")
    assert "the chat template of '" + str(tokenizer.name_or_path) + "'" in str(own.value)
    path = tmp_path / "house.jinja"
    path.write_text(tokenizer.chat_template, encoding="utf-8")
    processing = prepare_processing(Loaded(tokenizer, None, GENERIC), chat_template=str(path))
    with pytest.raises(DataError) as given:
        encode(processing.tokenizer, "system")
    assert f"the chat template '{path}' (--chat_template) refuses this conversation" in str(given.value)
    assert str(tokenizer.name_or_path) not in str(given.value)
    processing.tokenizer.chat_template = "{{ messages[0]['content'] }}"  # another template: no longer the file's
    assert Encoder(processing.tokenizer).template.file is None
