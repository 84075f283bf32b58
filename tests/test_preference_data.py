"""Preference data: every peer's shape read, encoded exactly as at inference, refused by name where it is bad."""

from __future__ import annotations

import pytest

from tests.helpers import encoder_for, write_jsonl
from tuning.data.dataset import PreferencePairs, build_dataset
from tuning.data.encode import IGNORE_INDEX
from tuning.data.errors import DataErrors
from tuning.data.formats import iter_conversations

FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures" / "preference"

# file -> (detected format, stage, records, prompt messages of the first record)
SHAPES = {
    "trl_standard.jsonl": ("trl-standard", "dpo", 4, 1),
    "trl_conversational.jsonl": ("trl-conversational", "dpo", 3, 1),
    "trl_implicit.jsonl": ("trl-implicit", "dpo", 3, 1),
    "trl_reward_margin.jsonl": ("trl-implicit", "dpo", 3, 1),
    "trl_vision.jsonl": ("trl-conversational", "dpo", 4, 1),
    "trl_unpaired.jsonl": ("trl-unpaired", "kto", 4, 1),
    "trl_unpaired_conversational.jsonl": ("trl-unpaired", "kto", 4, 1),
    "rlaif_v.jsonl": ("rlaif-v", "dpo", 3, 1),
    "llamafactory_alpaca_dpo.json": ("alpaca-preference", "dpo", 4, 1),
    "llamafactory_sharegpt_dpo.json": ("sharegpt-preference", "dpo", 3, 1),
    "llamafactory_mm_dpo.json": ("sharegpt-preference", "dpo", 3, 1),
    "llamafactory_sharegpt_kto.json": ("kto-tag", "kto", 4, 1),
    "swift_dpo.jsonl": ("swift-preference", "dpo", 3, 2),
    "swift_dpo_agent.jsonl": ("swift-preference", "dpo", 2, 1),
    "swift_dpo_rejected_messages.jsonl": ("swift-preference", "dpo", 3, 1),
    "swift_mm_dpo.jsonl": ("swift-preference", "dpo", 3, 1),
    "swift_rm_margin.jsonl": ("swift-preference", "dpo", 3, 1),
    "swift_kto.jsonl": ("chat-unpaired", "kto", 4, 2),
}


def read(name: str, stage: str) -> list:
    return list(iter_conversations([FIXTURES / name], stage=stage))


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_every_peer_shape_is_read_for_its_stage_and_refused_for_sft(name):
    expected, stage, records, prompt_length = SHAPES[name]
    convs = read(name, stage)
    assert [getattr(c, "problem", None) for c in convs] == [None] * records
    assert {c.format for c in convs} == {expected}
    first = convs[0]
    assert first.prompt_length == prompt_length
    assert first.kind == ("pair" if stage == "dpo" else "unpaired")
    for conv in convs:
        completion = conv.messages[conv.prompt_length :]
        assert all(m.trained for m in completion if m.role == "assistant")
        assert not any(m.trained for m in conv.messages[: conv.prompt_length])
    refused = read(name, "sft")
    assert all("preference data" in e.problem and "--stage dpo" in e.fix for e in refused)


def test_kto_reads_pairs_as_pairs_and_dpo_refuses_unpaired_records():
    [*pairs] = read("swift_dpo.jsonl", "kto")
    assert all(c.kind == "pair" for c in pairs)
    [error, *_] = read("swift_kto.jsonl", "dpo")
    assert "unpaired record" in error.problem and error.field == "label"


def test_supervised_data_given_to_a_preference_stage_is_refused():
    [error, *_] = iter_conversations([FIXTURES.parent.parent.parent / "data" / "example_chatml.jsonl"], stage="dpo")
    assert "supervised data" in error.problem and "--stage sft" in error.fix


def test_the_shapes_put_answers_and_pictures_where_the_peers_do():
    plain, tools = read("swift_dpo.jsonl", "dpo")[0], read("swift_dpo_agent.jsonl", "dpo")[0]
    assert [m.role for m in plain.rejected][-1] == "assistant"
    # ms-swift: a rejected trajectory replaces everything after the last user turn
    assert [m.role for m in tools.messages[tools.prompt_length :]] == ["assistant", "tool", "assistant"]
    assert [m.role for m in tools.rejected[tools.prompt_length :]] == ["assistant"]
    [same_text, *_] = [c for c in read("swift_mm_dpo.jsonl", "dpo") if c.rejected[0].images != c.messages[0].images]
    assert same_text.messages[1:] == same_text.rejected[1:]  # rejected_images alone: the same answer, other pictures
    margins = [c.margin for c in read("trl_reward_margin.jsonl", "dpo")]
    assert margins == [1.0, 0.33, 0.5]
    labels = [c.label for c in read("trl_unpaired.jsonl", "kto")]
    assert labels == [True, False, True, False]


def pair(**fields) -> dict:
    return {"prompt": [{"role": "user", "content": "q"}], **fields}


BAD = {
    "same answers": (
        pair(chosen=[{"role": "assistant", "content": "a"}], rejected=[{"role": "assistant", "content": "a"}]),
        "rejected",
        "the same",
    ),
    "empty chosen": (pair(chosen="", rejected="b"), "chosen", "empty"),
    "missing rejected": (pair(chosen="a"), "rejected", "must be an answer"),
    "label not boolean": ({"prompt": "q", "completion": "a", "label": "yes"}, "label", "true or false"),
    "margin not a number": (pair(chosen="a", rejected="b", margin="big"), "margin", "'margin' is 'big'"),
    "prompt ends with the answer": (
        {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chosen": "a"},
        "prompt",
        "ends with a assistant turn",
    ),
    "texts without a prompt": ({"chosen": "The sky is blue.", "rejected": "The sky is red."}, "prompt", "texts"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_preference_records_are_named(tmp_path, case):
    record, field, words = BAD[case]
    stage = "kto" if "label" in record else "dpo"
    [error] = iter_conversations([write_jsonl(tmp_path / "bad.jsonl", [record])], stage=stage)
    assert error.field == field and words in error.problem, str(error)
    assert str(error).startswith(f"{tmp_path / 'bad.jsonl'}, line 1")


# -- encoding ------------------------------------------------------------------------------------------------------


def encoded_pairs(processing, name: str, **kwargs):
    dataset, report = build_dataset(
        [str(FIXTURES / name)], encoder_for(processing, **kwargs), show_progress=False, stage="dpo"
    )
    return PreferencePairs(dataset), report


def first_label(labels: list[int]) -> int:
    return next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)


def test_a_pair_is_its_inference_prompt_then_each_answer_to_its_end_of_turn(text_processing):
    tokenizer = text_processing[0]
    pairs, report = encoded_pairs(text_processing, "trl_conversational.jsonl")
    assert report.preference == {"pairs": 3} and report.samples == 6
    conv = read("trl_conversational.jsonl", "dpo")[1]  # a system prompt and an earlier exchange
    prompt = [{"role": m.role, "content": m.text} for m in conv.messages[: conv.prompt_length]]
    rendered = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
    expected_prompt = rendered["input_ids"]
    item = pairs[1]
    for side, answer in (("chosen", "20 divided by 2 is 10."), ("rejected", "That is 40.")):
        ids, labels = item[side]["input_ids"], item[side]["labels"]
        start = first_label(labels)
        assert ids[:start] == expected_prompt  # the context is exactly the inference prompt, history untrained
        trained = tokenizer.decode([t for t in labels if t != IGNORE_INDEX])
        assert trained == answer + "<|im_end|>"


def test_pictures_stay_in_the_prompt_of_both_sides_and_rejected_images_change_them(vl_processing):
    pairs, report = encoded_pairs(vl_processing, "swift_mm_dpo.jsonl")
    assert report.images == 6
    for index in range(len(pairs)):
        item = pairs[index]
        chosen, rejected = item["chosen"], item["rejected"]
        for side in (chosen, rejected):
            assert side["image_grid_thw"].shape[0] == 1
            assert side["pixel_values"] is not None
            image_tokens = [i for i, t in enumerate(side["mm_token_type_ids"]) if t == 1]
            assert image_tokens and max(image_tokens) < first_label(side["labels"])
    same_answer = pairs[1]  # rejected_images: the same text over another picture
    assert same_answer["chosen"]["labels"] == same_answer["rejected"]["labels"]
    assert not same_answer["chosen"]["pixel_values"].equal(same_answer["rejected"]["pixel_values"])


def test_a_pair_over_the_length_is_dropped_whole_with_both_lengths(text_processing):
    _, report = encoded_pairs(text_processing, "trl_conversational.jsonl", max_length=70, overlong="drop")
    assert report.preference == {"pairs": 2}
    [dropped] = report.dropped
    assert (
        "chosen" in dropped["reason"]
        and "rejected" in dropped["reason"]
        and "--model_max_length 70" in dropped["reason"]
    )
    with pytest.raises(DataErrors, match="--overlong drop"):
        encoded_pairs(text_processing, "trl_conversational.jsonl", max_length=70, overlong="error")


def test_the_check_command_shows_each_prompt_with_both_answers_marked(tiny_text):
    from tests.helpers import run_module

    data = FIXTURES / "trl_conversational.jsonl"
    args = ["--stage", "dpo", "--data_path", str(data), "--model_name_or_path", str(tiny_text), "--show", "2"]
    result = run_module("tuning.data", *args, "--dataset_cache_dir", "none")
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "preference: pairs 3" in out
    headers = [line for line in out.splitlines() if line.startswith("--- ")]
    assert [h.split()[2] for h in headers] == ["chosen", "rejected", "chosen", "rejected"]
    assert "[[A spider has eight legs.<|im_end|>]]" in out and "[[A spider has six legs.<|im_end|>]]" in out
    refused = run_module("tuning.data", *args[2:], "--dataset_cache_dir", "none")  # the same data as SFT
    assert refused.returncode == 1 and "--stage dpo" in refused.stdout + refused.stderr
