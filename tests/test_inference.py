"""Inference takes the training path: the chat command, the web demo, tuning.evaluate and the sample callback build
their prompts with the training encoder, load pictures with its loaders and limits, and read boxes in the model's
convention."""

from __future__ import annotations

import json

import pytest

from tests.helpers import conversations, encoder_for, picture, write_json, write_jsonl
from tuning.data.encode import IGNORE_INDEX


@pytest.fixture(scope="module")
def vl_chat(tiny_vl):
    from tuning.chat import Chat, GenerationSettings, load_for_chat

    return Chat(*load_for_chat(str(tiny_vl)), settings=GenerationSettings(4), add_vision_id=False)


def test_a_chat_prompt_is_the_trained_context_of_the_answer(vl_chat, vl_processing, tmp_path):
    """The ids and pixels the chat sends are the training sample's up to its answer, token for token."""
    import torch

    picture(tmp_path / "p.png", "blue", (120, 90))
    question = [{"type": "image", "image": "p.png"}, {"type": "text", "text": "What colour is it?"}]
    record = {"id": "c", "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": "blue"}]}
    [conv] = conversations(write_jsonl(tmp_path / "d.jsonl", [record]))
    encoder = encoder_for(vl_processing)
    [sample] = encoder.encode(conv)
    answer_start = next(i for i, label in enumerate(sample.labels) if label != IGNORE_INDEX)

    inputs = vl_chat._inputs([vl_chat.user_message("What colour is it?", [tmp_path / "p.png"])])
    assert inputs["input_ids"][0].tolist() == sample.input_ids[:answer_start]
    assert torch.equal(inputs["pixel_values"], encoder.pixels(sample)["pixel_values"])
    assert torch.equal(inputs["image_grid_thw"], sample.image_grid_thw)


def test_a_chat_asks_as_qwen_vl_data_writes_its_pictures(vl_chat, vl_processing, tmp_path):
    """Qwen-VL data writes "Picture 1: <img>..</img>\\n" before the question (as Qwen-VL's own from_list_format
    does); a chat that labels its pictures asks with the same newline after each one, token for token."""
    picture(tmp_path / "a.png", "blue", (120, 90))
    picture(tmp_path / "b.png", "red", (90, 120))
    question = "Picture 1: <img>a.png</img>\nPicture 2: <img>b.png</img>\nWhich one is red?"
    record = {"id": "q", "conversations": [{"from": "user", "value": question}, {"from": "assistant", "value": "2"}]}
    [conv] = conversations(write_json(tmp_path / "d.json", [record]))
    [sample] = encoder_for(vl_processing).encode(conv)
    answer_start = next(i for i, label in enumerate(sample.labels) if label != IGNORE_INDEX)

    vl_chat.add_vision_id = True
    try:
        message = vl_chat.user_message("Which one is red?", [tmp_path / "a.png", tmp_path / "b.png"])
        inputs = vl_chat._inputs([message])
    finally:
        vl_chat.add_vision_id = False
    assert inputs["input_ids"][0].tolist() == sample.input_ids[:answer_start]


def test_grounding_in_a_question_is_written_in_the_models_convention(vl_chat, tmp_path):
    picture(tmp_path / "p.png", "red", (112, 84))
    inputs = vl_chat._inputs([vl_chat.user_message("Where is <ref>the red</ref>?", [tmp_path / "p.png"])])
    prompt = vl_chat.tokenizer.decode(inputs["input_ids"][0])
    assert "<|object_ref_start|>the red<|object_ref_end|>" in prompt and "<ref>" not in prompt


def test_a_picture_the_training_loader_refuses_is_refused_in_the_chat(vl_chat, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ValueError, match="cannot be read"):
        vl_chat._inputs([vl_chat.user_message("What is it?", [tmp_path / "broken.png"])])
    with pytest.raises(ValueError, match="not found"):
        vl_chat._inputs([vl_chat.user_message("What is it?", [tmp_path / "missing.png"])])


def test_a_qwen2_5_vl_answer_box_is_read_in_pixels_of_the_picture_the_model_saw(vl_chat, tmp_path):
    """Qwen2.5-VL writes pixel coordinates of the resized picture; the chat reads them back to [0,1000)."""
    picture(tmp_path / "p.png", "green", (200, 100))
    from tuning.chat import picture_ref

    width, height = vl_chat.encoder.media.seen_size(picture_ref(tmp_path / "p.png"))
    answer = f"<|object_ref_start|>it<|object_ref_end|><|box_start|>(0,0),({width // 2},{height})<|box_end|>"
    [box] = vl_chat.answer_boxes(answer, tmp_path / "p.png")
    assert (box.label, box.x1, box.y1, round(box.x2), box.y2) == ("it", 0, 0, 500, 1000)


def test_evaluate_lists_the_records_it_cannot_use(vl_chat, tmp_path):
    from tuning.evaluate import exact_match

    picture(tmp_path / "p.png")
    good = {"id": "q1", "conversations": [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "hello"}]}
    long = {"id": "q2", "conversations": [*good["conversations"], *good["conversations"]]}
    write_jsonl(tmp_path / "held.jsonl", [good, "{not json", long])
    score = exact_match(vl_chat, tmp_path / "held.jsonl")
    assert score.total == 1 and score.skipped == ["q2"]
    assert len(score.bad) == 1 and "held.jsonl, line 2" in score.bad[0]


def test_the_evaluate_command_reports_bad_records_and_fails(tiny_vl, tmp_path):
    from tests.helpers import run_module

    path = write_json(tmp_path / "held.json", [{"id": "x", "conversations": [{"from": "user", "value": "hi"}]}])
    result = run_module("tuning.evaluate", str(tiny_vl), "--data", str(path), "--json")
    assert result.returncode == 1
    assert json.loads(result.stdout.splitlines()[-1])["total"] == 0
    assert "not evaluated, the record cannot be read" in result.stderr and "no assistant turn" in result.stderr
