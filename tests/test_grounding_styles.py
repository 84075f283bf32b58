"""Grounding in each vision family's own convention: the data's <ref>/<box> written as InternVL and GLM-V write
them (golden text), answers read back in every style (several boxes in one list, styles mixed), readable text, and
samples of the tiny InternVL and GLM-4V builds whose ids hold those forms with no tokens added; the families with no
convention of their own keep the tags as new tokens."""

from __future__ import annotations

import pytest

from tests.helpers import conversations, picture, qwen_vl, supervised_runs, write_json
from tuning.data.encode import Encoder
from tuning.data.grounding import GroundingError, convert, find_boxes, has_boxes, strip_tags
from tuning.data.processing import load_processing, prepare_processing
from tuning.families import DATA_TAGS, FAMILIES, GLM_V_BOXES, INTERNVL_TAGS, grounding_style
from tuning.tiny import ensure_tiny

DATA = (
    "Here: <ref>the cars</ref><box>(10,20),(30,40)</box><box>(50,60),(70,80)</box> and "
    "<ref>a dog</ref><box>(1,2),(3,4)</box>."
)


def family(name: str):
    return next(f for f in FAMILIES if f.name.startswith(name))


def coords(boxes) -> list[tuple]:
    return [(b.label, b.x1, b.y1, b.x2, b.y2) for b in boxes]


def test_data_boxes_in_internvl_form_one_list_per_label():
    assert convert(DATA, "internvl") == (
        "Here: <ref>the cars</ref><box>[[10, 20, 30, 40], [50, 60, 70, 80]]</box> and "
        "<ref>a dog</ref><box>[[1, 2, 3, 4]]</box>."
    )
    assert convert("Where is <ref>the cat</ref>?", INTERNVL_TAGS) == "Where is <ref>the cat</ref>?"
    assert convert("<box>(1,2),(3,4)</box> <box>(5,6),(7,8)</box>", "internvl") == (
        "<box>[[1, 2, 3, 4]]</box> <box>[[5, 6, 7, 8]]</box>"  # only boxes written together share a list
    )
    with pytest.raises(GroundingError, match="not of the form"):
        convert("<ref>x</ref><box>[[1, 2, 3, 4]]</box>", "internvl")  # data is written in Qwen-VL's form


def test_data_boxes_in_glm_v_form_with_plain_labels():
    assert convert(DATA, "glm-4v") == (
        "Here: the cars<|begin_of_box|>[[10,20,30,40],[50,60,70,80]]<|end_of_box|> and "
        "a dog<|begin_of_box|>[[1,2,3,4]]<|end_of_box|>."
    )
    assert convert("Where is <ref>the cat</ref>?", GLM_V_BOXES) == "Where is the cat?"


def test_answers_are_read_in_every_style_several_boxes_in_one_list():
    [one] = find_boxes("<ref>the cat</ref><box>[[100, 200, 300, 400]]</box>", "internvl")
    assert coords([one]) == [("the cat", 100, 200, 300, 400)]
    two = find_boxes("<ref>cars</ref><box>[[1, 2, 3, 4], [5, 6, 7, 8]]</box>", "internvl")
    assert coords(two) == [("cars", 1, 2, 3, 4), ("cars", 5, 6, 7, 8)]
    loose = find_boxes("<ref> cars </ref> <box>[[ 1 ,2, 3,4 ],[5,6,7,8]]</box>", "qwen-vl")
    assert coords(loose) == coords(two)
    mixed = (
        "<|object_ref_start|>a<|object_ref_end|><|box_start|>(1,2),(3,4)<|box_end|>, <ref>b</ref><box>(5,6),(7,8)"
        "</box>, <ref>c</ref><box>[[9, 10, 11, 12]]</box> and d<|begin_of_box|>[13, 14, 15, 16]<|end_of_box|>"
    )
    for style in ("qwen-vl", "qwen2-vl", "internvl", "glm-4v"):
        assert coords(find_boxes(mixed, style)) == [
            ("a", 1, 2, 3, 4),
            ("b", 5, 6, 7, 8),
            ("c", 9, 10, 11, 12),
            ("and d", 13, 14, 15, 16),  # a plain label is the text before its box on its line
        ]
    assert has_boxes(mixed) and not has_boxes("<ref>the cat</ref> has no box")


def test_each_style_reads_back_what_it_wrote():
    for style in ("qwen-vl", "qwen2-vl", "internvl", "glm-4v"):
        written = convert("<ref>the cars</ref><box>(10,20),(30,40)</box><box>(50,60),(70,80)</box>", style)
        assert coords(find_boxes(written, style)) == [("the cars", 10, 20, 30, 40), ("the cars", 50, 60, 70, 80)]


def test_glm_v_final_answer_marks_are_not_boxes():
    """GLM-4.1V-Thinking marks its final answer with the box tokens too: only numbers in fours are boxes."""
    answer = "<answer>The total is <|begin_of_box|>42<|end_of_box|></answer>"
    assert find_boxes(answer, "glm-4v") == [] and not has_boxes(answer)
    assert strip_tags(answer) == "<answer>The total is 42</answer>"


def test_readable_text_in_every_style():
    for style in ("qwen-vl", "qwen2-vl", "internvl", "glm-4v"):
        assert strip_tags(convert(DATA, style)) == "Here: the cars and a dog."
    assert strip_tags("<ref>cut off</ref><box>[[1, 2") == "cut off[[1, 2"  # malformed: no tag shows
    assert strip_tags("see <|begin_of_box|>[[1,2,3,4]]<|end_of_box|>.") == "see."


def test_each_family_gets_its_own_convention_or_the_tags():
    assert grounding_style(family("InternVL"), set()) is INTERNVL_TAGS
    assert grounding_style(family("GLM-4V"), set()) is GLM_V_BOXES
    assert grounding_style(family("Qwen2.5-VL"), set()).name == "qwen2.5-vl"
    after_a_run = {*DATA_TAGS.ref, *DATA_TAGS.box}  # a tokenizer saved by a run that added the tags
    for name in ("LLaVA-1.5", "Gemma 3", "Idefics3 / SmolVLM", "Mistral 3"):
        assert grounding_style(family(name), set()) is DATA_TAGS
        assert grounding_style(family(name), after_a_run) is DATA_TAGS  # InternVL's tags are not InternVL's form
    assert grounding_style(family("LLaVA-1.5"), set(), "internvl") is INTERNVL_TAGS  # asked for by name


def grounding_sample(tmp_path, kind: str, answer: str):
    """A grounding sample encoded for the kind's tiny model as a run encodes it: (processing, sample)."""
    picture(tmp_path / "p.png", size=(64, 48))
    path = write_json(tmp_path / "d.json", [qwen_vl("g", "Picture 1: <img>p.png</img>\nWhere is the cat?", answer)])
    loaded = load_processing(str(ensure_tiny(kind)))  # a private copy: tokens may be added
    before = len(loaded.tokenizer)
    processing = prepare_processing(loaded, uses_grounding=True)
    encoder = Encoder(
        processing.tokenizer, processing.processor, family=processing.family, grounding=processing.grounding
    )
    [conv] = conversations(path)
    [sample] = encoder.encode(conv)
    return processing, sample, before


@pytest.mark.parametrize(
    ("kind", "written", "tags"),
    [
        ("internvl", "<ref>the cat</ref><box>[[100, 200, 300, 400]]</box>", ("<ref>", "</ref>", "<box>", "</box>")),
        ("glm4v", "the cat<|begin_of_box|>[[100,200,300,400]]<|end_of_box|>", ("<|begin_of_box|>", "<|end_of_box|>")),
    ],
)
def test_a_native_family_trains_its_own_form_with_its_own_tokens(tmp_path, kind, written, tags):
    processing, sample, before = grounding_sample(tmp_path, kind, "<ref>the cat</ref><box>(100,200),(300,400)</box>")
    tokenizer = processing.tokenizer
    assert processing.added_tokens == [] and len(tokenizer) == before
    trained = "".join(
        text for text, supervised in supervised_runs(tokenizer, sample.input_ids, sample.labels) if supervised
    )
    assert trained.startswith(written)
    for tag in tags:  # each of the family's own tokens is one id of the sample
        assert tokenizer.convert_tokens_to_ids(tag) in sample.input_ids
    assert coords(find_boxes(tokenizer.decode(sample.input_ids), processing.grounding)) == [
        ("the cat", 100, 200, 300, 400)
    ]


@pytest.mark.parametrize("kind", ["llava", "gemma3", "smolvlm", "mistral3"])
def test_a_family_without_a_convention_adds_the_tags(tmp_path, kind):
    data = "<ref>the cat</ref><box>(100,200),(300,400)</box>"
    processing, sample, before = grounding_sample(tmp_path, kind, data)
    assert processing.grounding is DATA_TAGS
    assert processing.added_tokens == ["<ref>", "</ref>", "<box>", "</box>"] and len(processing.tokenizer) == before + 4
    for tag in processing.added_tokens:
        assert processing.tokenizer.convert_tokens_to_ids(tag) in sample.input_ids
    assert data in processing.tokenizer.decode(sample.input_ids)
