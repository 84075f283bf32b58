"""Encoding: ids equal the chat template's, loss only on assistant content and its end-of-turn token."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import DATA
from tests.helpers import (
    conversations,
    encoder_for,
    picture,
    qwen_vl,
    reference_ids,
    supervised_runs,
    write_json,
    write_jsonl,
)
from tuning.data.encode import IGNORE_INDEX, DroppedSample
from tuning.data.errors import DataError
from tuning.data.formats import ImageRef, iter_conversations
from tuning.data.media.images import load_image
from tuning.families import GENERIC

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
DATA_FILES = [
    "example.json",
    "example_chatml.jsonl",
    "example_openai.jsonl",
    "example_llava.json",
    "example_sharegpt.json",
    "example_alpaca.json",
    "example_swift.jsonl",
    "example_xtuner.jsonl",
]


def encode_one(processing, path, **kwargs):
    [conv] = conversations(path)
    [sample] = encoder_for(processing, **kwargs).encode(conv)
    return sample


def test_golden_single_turn(text_processing, tmp_path):
    sample = encode_one(text_processing, write_json(tmp_path / "d.json", [qwen_vl("a", "hi", "hello there")]))
    assert supervised_runs(text_processing[0], sample.input_ids, sample.labels) == [
        (SYSTEM + "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", False),
        ("hello there<|im_end|>", True),
        ("\n", False),
    ]


def test_golden_multi_turn_with_system_and_aliases(text_processing, tmp_path):
    record = {
        "id": "m",
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "one"},
            {"from": "gpt", "value": "1"},
            {"from": "human", "value": "two"},
            {"from": "gpt", "value": "2"},
        ],
    }
    sample = encode_one(text_processing, write_json(tmp_path / "d.json", [record]))
    assert supervised_runs(text_processing[0], sample.input_ids, sample.labels) == [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\none<|im_end|>\n<|im_start|>assistant\n", False),
        ("1<|im_end|>", True),
        ("\n<|im_start|>user\ntwo<|im_end|>\n<|im_start|>assistant\n", False),
        ("2<|im_end|>", True),
        ("\n", False),
    ]


def test_golden_chatml_ids_are_literal(text_processing, tmp_path):
    """One literal id list: the special tokens sit where Qwen numbers them, after the BPE vocabulary."""
    tokenizer = text_processing[0]
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {
                "type": "chatml",
                "messages": [
                    {"role": "system", "content": "s"},
                    {"role": "user", "content": "u"},
                    {"role": "assistant", "content": "a"},
                ],
            }
        ],
    )
    sample = encode_one(text_processing, path)
    start, end, newline = (tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "Ċ"))
    s, u, a = (tokenizer.convert_tokens_to_ids(t) for t in "sua")
    system, user, assistant = (
        tokenizer(w, add_special_tokens=False)["input_ids"] for w in ("system", "user", "assistant")
    )
    expected = [
        start,
        *system,
        newline,
        s,
        end,
        newline,
        start,
        *user,
        newline,
        u,
        end,
        newline,
        start,
        *assistant,
        newline,
        a,
        end,
        newline,
    ]
    assert sample.input_ids == expected
    assert sample.labels == [IGNORE_INDEX] * (len(expected) - 3) + [a, end, IGNORE_INDEX]
    assert (start, end) == (len(tokenizer) - 13, len(tokenizer) - 12)


@pytest.mark.parametrize("name", DATA_FILES)
def test_parity_with_apply_chat_template_for_every_shipped_sample(vl_processing, name):
    encoder = encoder_for(vl_processing)
    for conv in iter_conversations([DATA / name]):
        [sample] = encoder.encode(conv)
        assert sample.input_ids == reference_ids(vl_processing, conv, encoder), conv.id


@pytest.mark.parametrize("name", DATA_FILES)
def test_supervised_tokens_are_the_assistant_contents(vl_processing, name):
    tokenizer = vl_processing[0]
    encoder = encoder_for(vl_processing)
    for conv in iter_conversations([DATA / name]):
        [sample] = encoder.encode(conv)
        supervised = [
            run for run, is_supervised in supervised_runs(tokenizer, sample.input_ids, sample.labels) if is_supervised
        ]
        messages = encoder.template_messages(conv)
        contents = [
            m["content"]
            for m, turn in zip(messages, conv.messages, strict=True)
            if turn.trained and m["role"] == "assistant"
        ]
        contents = [c if isinstance(c, str) else "".join(p["text"] for p in c) for c in contents]
        assert supervised == [c + "<|im_end|>" for c in contents], conv.id


def test_image_tokens_never_train_and_match_the_grid(vl_processing, tmp_path):
    picture(tmp_path / "a.png", "red")
    picture(tmp_path / "b.png", "blue", (128, 64))
    path = write_json(
        tmp_path / "d.json",
        [
            qwen_vl(
                "multi",
                "Picture 1: <img>a.png</img>\nWhat is it?",
                "red",
                "Picture 2: <img>b.png</img>\nAnd this one? Picture 3: <img>a.png</img>",
                "blue, red",
            )
        ],
    )
    sample = encode_one(vl_processing, path)
    image_id = vl_processing[0].convert_tokens_to_ids("<|image_pad|>")
    pads = [i for i, t in enumerate(sample.input_ids) if t == image_id]
    assert sample.num_images == 3
    assert len(pads) == int(sample.image_grid_thw.prod(dim=1).sum()) // 4
    assert all(sample.labels[i] == IGNORE_INDEX for i in pads)
    assert sample.mm_token_type_ids == [int(t == image_id) for t in sample.input_ids]
    assert sample.pixel_values is None  # computed per batch, never held for the whole set
    pixels = encoder_for(vl_processing).pixels(sample)["pixel_values"]
    assert pixels.shape[0] == int(sample.image_grid_thw.prod(dim=1).sum())
    text = vl_processing[0].decode(sample.input_ids)
    assert "Picture 3: <|vision_start|>" in text  # the numbering runs across turns


def test_grounding_becomes_absolute_pixels_for_qwen25vl(vl_processing, tmp_path):
    picture(tmp_path / "p.png", size=(320, 240))
    path = write_json(
        tmp_path / "d.json",
        [qwen_vl("g", "Picture 1: <img>p.png</img>\nFind it", "<ref>the thing</ref><box>(500,500),(750,1000)</box>")],
    )
    with pytest.raises(DataError, match=r"outside \[0,1000\)"):
        encode_one(vl_processing, path)
    path = write_json(
        tmp_path / "d.json",
        [qwen_vl("g", "Picture 1: <img>p.png</img>\nFind it", "<ref>the thing</ref><box>(500,500),(750,999)</box>")],
    )
    sample = encode_one(vl_processing, path)
    _, height, width = (int(v) * 14 for v in sample.image_grid_thw[0])
    answer = vl_processing[0].decode(
        [t for t, lab in zip(sample.input_ids, sample.labels, strict=True) if lab != IGNORE_INDEX]
    )
    x1, y1, x2, y2 = round(width * 0.5), round(height * 0.5), round(width * 0.75), round(height * 0.999)
    assert (
        answer
        == f"<|object_ref_start|>the thing<|object_ref_end|><|box_start|>({x1},{y1}),({x2},{y2})<|box_end|><|im_end|>"
    )


def test_grounding_conventions_can_be_forced(vl_processing, tmp_path):
    picture(tmp_path / "p.png")
    path = write_json(
        tmp_path / "d.json",
        [qwen_vl("g", "Picture 1: <img>p.png</img>\nFind it", "<ref>x</ref><box>(10,20),(30,40)</box>")],
    )
    relative = vl_processing[0].decode(encode_one(vl_processing, path, grounding="qwen2-vl").input_ids)
    assert "<|box_start|>(10,20),(30,40)<|box_end|>" in relative


def test_qwen_vl_tags_become_single_new_tokens(tiny_vl, tmp_path):
    """The processing step adds the tags where the data uses them, and says so; the encoder then reads them."""
    from tuning.data.args import DataArguments
    from tuning.data.dataset import encode_dataset, read_conversations
    from tuning.data.processing import load_processing

    loaded = load_processing(str(tiny_vl))  # a private copy: tokens get added
    before = len(loaded.tokenizer)
    picture(tmp_path / "p.png")
    plain = write_json(tmp_path / "plain.json", [qwen_vl("p", "Picture 1: <img>p.png</img>\nWhat?", "a square")])
    path = write_json(
        tmp_path / "d.json",
        [qwen_vl("g", "Picture 1: <img>p.png</img>\nFind it", "<ref>x</ref><box>(10,20),(30,40)</box>")],
    )
    data_args = DataArguments(data_path=[str(path)], grounding_format="qwen-vl")
    assert data_args.processing(loaded, read_conversations([str(plain)]).uses_grounding).added_tokens == []
    read = read_conversations([str(path)])
    processing = data_args.processing(loaded, read.conversations)
    assert processing.added_tokens == ["<ref>", "</ref>", "<box>", "</box>"]
    assert len(loaded.tokenizer) == before + 4
    dataset, _ = encode_dataset(read, data_args.encoder(processing), show_progress=False)
    ids = dataset[0]["input_ids"]
    for tag in processing.added_tokens:
        assert loaded.tokenizer.convert_tokens_to_ids(tag) in ids


def test_overlong_keeps_whole_turns_and_never_cuts_an_image(vl_processing, tmp_path):
    picture(tmp_path / "p.png")
    long_answer = "word " * 200
    path = write_json(
        tmp_path / "d.json",
        [
            qwen_vl(
                "long",
                "Picture 1: <img>p.png</img>\nFirst?",
                "short answer",
                "Picture 2: <img>p.png</img>\nMore?",
                long_answer.strip(),
            )
        ],
    )
    full = encode_one(vl_processing, path, max_length=4096)
    first_turn_end = full.labels.index(IGNORE_INDEX, full.labels.index(next(x for x in full.labels if x != -100)))
    limit = first_turn_end + 10  # room for the first exchange and part of the second image: never enough
    sample = encode_one(vl_processing, path, max_length=limit)
    assert sample.truncated and len(sample.input_ids) <= limit
    assert sample.num_images == 1
    assert vl_processing[0].decode(sample.input_ids).endswith("short answer<|im_end|>\n")
    image_id = vl_processing[0].convert_tokens_to_ids("<|image_pad|>")
    assert sample.input_ids.count(image_id) == int(sample.image_grid_thw.prod()) // 4
    with pytest.raises(DroppedSample):
        encode_one(vl_processing, path, max_length=20)
    with pytest.raises(DataError, match="model_max_length"):
        encode_one(vl_processing, path, max_length=limit, overlong="error")
    with pytest.raises(DroppedSample):
        encode_one(vl_processing, path, max_length=limit, overlong="drop")


def test_pretraining_text_trains_every_token(text_processing):
    [conv, *_] = iter_conversations([DATA / "example_pretrain.jsonl"])
    [sample] = encoder_for(text_processing).encode(conv)
    assert sample.labels == sample.input_ids
    assert text_processing[0].decode(sample.input_ids) == conv.pretrain_text + "<|endoftext|>"


def test_images_in_data_for_a_text_model_is_an_error(text_processing):
    conv = next(c for c in iter_conversations([DATA / "example.json"]) if c.images)
    with pytest.raises(DataError, match="text-only"):
        encoder_for(text_processing).encode(conv)


def test_pixels_match_the_processor(vl_processing):
    conv = next(c for c in iter_conversations([DATA / "example.json"]) if c.images)
    encoder = encoder_for(vl_processing)
    [sample] = encoder.encode(conv)
    expected = vl_processing[1].image_processor(
        images=[load_image(ImageRef(r.source, r.base_dir)) for r in conv.images], return_tensors="pt"
    )
    computed = encoder.pixels(sample)  # per batch, from the sample's pictures
    assert torch.equal(computed["pixel_values"], expected["pixel_values"])
    assert torch.equal(computed["image_grid_thw"], expected["image_grid_thw"])


def test_a_template_without_a_clean_split_is_a_clear_error(tiny_text, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_text)
    # Like templates that drop the reasoning of earlier turns: adding a message rewrites what came before.
    tokenizer.chat_template = (
        "{% for m in messages|reverse %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    path = write_json(tmp_path / "d.json", [qwen_vl("x", "hi", "hello")])
    with pytest.raises(DataError, match=r"chat template of '.*tiny-qwen2' cannot be split into turns"):
        encode_one((tokenizer, None, GENERIC), path)
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="has no chat template"):
        encode_one((tokenizer, None, GENERIC), path)
