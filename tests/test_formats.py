"""Bring your own data: the files other toolkits document read as what they mean, or are refused by name.

The fixtures in tests/fixtures/formats are written in the exact shapes that Qwen's qwen-vl-finetune, LLaVA,
LLaMA-Factory, ms-swift, XTuner and OpenAI document (see the README there)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from PIL import Image

from tests.conftest import DATA, REPO, run_env
from tests.helpers import (
    conversations,
    encoder_for,
    reference_ids,
    run_module,
    supervised_runs,
    write_json,
    write_jsonl,
)
from tuning.data.dataset import build_dataset
from tuning.data.errors import DataError, DataErrors
from tuning.data.formats import iter_conversations

FIXTURES = REPO / "tests" / "fixtures" / "formats"
PICTURES = {
    "demo/chart_1.png": "blue",
    "demo/chart_2.png": "green",
    "coco/train2017/000000033471.jpg": "brown",
    "mllm_demo_data/1.jpg": "brown",
    "mllm_demo_data/2.jpg": "grey",
    "images/dog.png": "brown",
    "images/beijing.png": "grey",
    "resource/dog.jpg": "brown",
}
PLACEHOLDERS = ("<image>", "<video>", "<IMG_CONTEXT>", "<ref-object>", "<bbox>", "<audio>")


@pytest.fixture
def formats_folder(tmp_path):
    """The fixtures copied next to pictures at every path they name."""
    for path in FIXTURES.iterdir():
        shutil.copy(path, tmp_path / path.name)
    for name, colour in PICTURES.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (84, 56), colour).save(tmp_path / name)
    return tmp_path


def read(folder, name: str, **kwargs) -> list:
    return list(iter_conversations([folder / name], **kwargs))


# -- every documented shape is read as what it means ------------------------------------------------

READS = {
    # file: (detected formats in order, images per sample, videos per sample)
    "qwen_vl_finetune_single_images.json": (["llava", "llava"], [1, 1], [0, 0]),
    "qwen_vl_finetune_multi_images.json": (["llava"], [2], [0]),
    "qwen_vl_finetune_video.json": (["llava"], [0], [1]),
    "llava_instruct.json": (["llava", "sharegpt", "llava"], [1, 0, 1], [0, 0, 0]),
    "llamafactory_mllm_demo.json": (["messages", "messages"], [1, 1], [0, 0]),
    "llamafactory_mllm_video_demo.json": (["messages"], [0], [1]),
    "llamafactory_alpaca_en_demo.json": (["alpaca"] * 3, [0, 0, 0], [0, 0, 0]),
    "llamafactory_sharegpt.json": (["sharegpt", "sharegpt"], [1, 0], [0, 0]),
    "llamafactory_glaive_toolcall_en_demo.json": (["sharegpt", "sharegpt"], [0, 0], [0, 0]),
    "swift_messages.jsonl": (["messages"] * 3, [0, 2, 0], [0, 0, 0]),
    "swift_query_response.jsonl": (
        ["query-response", "swift-sharegpt", "alpaca", "query-response"],
        [0, 0, 0, 1],
        [0] * 4,
    ),
    "swift_agent.jsonl": (["messages", "messages"], [0, 0], [0, 0]),
    "swift_grounding.jsonl": (["messages", "messages"], [1, 1], [0, 0]),
    "xtuner_openai_sft.jsonl": (["message-list", "message-list"], [0, 0], [0, 0]),
    "xtuner_mllm_single_image.jsonl": (["messages", "messages"], [1, 1], [0, 0]),
    "openai_tool_calling.jsonl": (["messages", "messages"], [0, 0], [0, 0]),
}


@pytest.mark.parametrize("name", sorted(READS))
def test_each_documented_shape_is_read_with_its_pictures_and_no_placeholder_left(formats_folder, name):
    formats, images, videos = READS[name]
    convs = read(formats_folder, name)
    assert [c for c in convs if isinstance(c, DataError)] == []
    assert [c.format for c in convs] == formats
    assert [len(c.images) for c in convs] == images
    assert [len(c.videos) for c in convs] == videos
    for conv in convs:
        for message in conv.messages:
            assert not any(tag in message.text for tag in PLACEHOLDERS), (conv.id, message.text)


def test_llava_pictures_go_where_the_placeholder_is_or_first(formats_folder):
    first, text_only, no_placeholder = read(formats_folder, "llava_instruct.json")
    assert [type(p).__name__ for p in first.messages[0].parts] == ["ImageRef", "str"]
    assert first.messages[0].parts[1] == "What is in the picture?"  # "<image>\n" goes as a whole
    assert [m.role for m in first.messages] == ["user", "assistant", "user", "assistant"]
    assert text_only.images == []
    assert [type(p).__name__ for p in no_placeholder.messages[0].parts] == ["ImageRef", "str"]
    [single, _] = read(formats_folder, "qwen_vl_finetune_single_images.json")
    assert single.messages[0].parts[0] == "Which bar is the tallest?"  # "...?\n<image>": the picture last
    assert single.messages[0].parts[1].source == "demo/chart_1.png"


def test_alpaca_joins_instruction_and_input_and_turns_history_into_turns(formats_folder):
    plain, with_input, with_history = read(formats_folder, "llamafactory_alpaca_en_demo.json")
    assert [m.text for m in plain.messages] == [
        "Describe a process of making crepes.",
        "Whisk flour, eggs and milk into a thin batter, pour a ladle into a hot pan, swirl, and turn once.",
    ]
    assert with_input.messages[0].text == "Translate the sentence into French.\nThe cat sleeps."
    assert [(m.role, m.text) for m in with_history.messages] == [
        ("system", "You are a translator."),
        ("user", "Translate the sentence into French.\nThe cat sleeps."),
        ("assistant", "Le chat dort."),
        ("user", "Into Spanish?"),
        ("assistant", "El gato duerme."),
        ("user", "And into German?"),
        ("assistant", "Die Katze schläft."),
    ]


def test_tool_calls_are_read_in_the_openai_shape(formats_folder):
    [glaive, _] = read(formats_folder, "llamafactory_glaive_toolcall_en_demo.json")
    assert [m.role for m in glaive.messages] == ["user", "assistant", "tool", "assistant"]
    assert glaive.messages[1].tool_calls == [
        {
            "type": "function",
            "function": {"name": "calculate_area", "arguments": {"shape": "rectangle", "dimensions": [5, 3]}},
        }
    ]
    assert glaive.tools[0]["type"] == "function" and glaive.tools[0]["function"]["name"] == "calculate_area"
    parallel, thought = read(formats_folder, "swift_agent.jsonl")
    assert [m.role for m in parallel.messages] == ["user", "assistant", "tool", "tool", "assistant"]
    assert [c["function"]["arguments"]["city"] for c in parallel.messages[1].tool_calls] == ["Beijing", "Shanghai"]
    assert thought.messages[1].text.startswith("<think>") and len(thought.messages[1].tool_calls) == 1
    [openai, weighted] = read(formats_folder, "openai_tool_calling.jsonl")
    call = openai.messages[2].tool_calls[0]
    assert call["id"] == "call_1" and call["function"]["arguments"] == {
        "location": "San Francisco, USA",
        "format": "celsius",
    }
    assert openai.messages[3].tool_call_id == "call_1"
    assert [m.trained for m in weighted.messages if m.role == "assistant"] == [False, True]


# -- parity: the ids are the model's own template, the pictures attached --------------------------

VL_FILES = [
    "qwen_vl_finetune_single_images.json",
    "qwen_vl_finetune_multi_images.json",
    "llava_instruct.json",
    "llamafactory_mllm_demo.json",
    "llamafactory_alpaca_en_demo.json",
    "llamafactory_sharegpt.json",
    "swift_messages.jsonl",
    "swift_query_response.jsonl",
    "swift_grounding.jsonl",
    "xtuner_openai_sft.jsonl",
    "xtuner_mllm_single_image.jsonl",
]


@pytest.mark.parametrize("name", VL_FILES)
def test_each_format_encodes_to_the_templates_ids_with_its_pictures(vl_processing, formats_folder, name):
    encoder = encoder_for(vl_processing)
    dataset, report = build_dataset([str(formats_folder / name)], encoder, show_progress=False)
    convs = read(formats_folder, name)
    assert report.images == sum(len(c.images) for c in convs) and report.samples == len(convs)
    for conv, sample in zip(convs, dataset.samples, strict=True):
        assert sample.input_ids == reference_ids(vl_processing, conv, encoder), conv.id
        text = vl_processing[0].decode(sample.input_ids)
        assert not any(tag in text for tag in PLACEHOLDERS)
        assert text.count("<|vision_start|>") == len(conv.images)


def test_swift_grounding_objects_become_the_models_boxes(vl_processing, formats_folder):
    tokenizer = vl_processing[0]
    encoder = encoder_for(vl_processing)
    pixels, norm1 = read(formats_folder, "swift_grounding.jsonl")
    [sample] = encoder.encode(pixels)
    _, grid_h, grid_w = (int(v) for v in sample.image_grid_thw[0])
    width, height = grid_w * 14, grid_h * 14  # the picture as the model sees it; the file is 84x56

    def box(x1, y1, x2, y2):  # pixels of the 84x56 file -> [0,1000) -> pixels of the resized picture
        norm = [
            round(x1 * 1000 / 84),
            round(y1 * 1000 / 56),
            min(999, round(x2 * 1000 / 84)),
            min(999, round(y2 * 1000 / 56)),
        ]
        x1, y1, x2, y2 = (round(c * s / 1000) for c, s in zip(norm, (width, height, width, height), strict=True))
        return f"<|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>"

    answer = [run for run, supervised in supervised_runs(tokenizer, sample.input_ids, sample.labels) if supervised]
    assert answer == [
        f"<|object_ref_start|>a dog<|object_ref_end|>{box(10, 20, 40, 50)} is sitting in front of "
        f"<|object_ref_start|>the grass<|object_ref_end|>{box(0, 30, 56, 56)}<|im_end|>"
    ]
    [sample] = encoder.encode(norm1)
    assert "<|object_ref_start|>dog<|object_ref_end|>" in tokenizer.decode(sample.input_ids)


def test_turns_marked_not_trained_are_context_only(vl_processing, formats_folder):
    tokenizer = vl_processing[0]
    *_, loss_false = read(formats_folder, "swift_messages.jsonl")
    [sample] = encoder_for(vl_processing).encode(loss_false)
    trained = [run for run, supervised in supervised_runs(tokenizer, sample.input_ids, sample.labels) if supervised]
    assert trained == ["It equals 3<|im_end|>"]
    _, weighted = read(formats_folder, "openai_tool_calling.jsonl")
    [sample] = encoder_for(vl_processing).encode(weighted)
    runs = [run for run, supervised in supervised_runs(tokenizer, sample.input_ids, sample.labels) if supervised]
    assert runs == ["Why did the tomato blush? It saw the salad dressing.<|im_end|>"]


def test_train_on_last_turn_only(vl_processing, formats_folder):
    tokenizer = vl_processing[0]
    [first, *_] = read(formats_folder, "llava_instruct.json")
    encoder = encoder_for(vl_processing, train_on_last_turn_only=True)
    [sample] = encoder.encode(first)
    runs = [run for run, supervised in supervised_runs(tokenizer, sample.input_ids, sample.labels) if supervised]
    assert runs == ["It is brown.<|im_end|>"]


# -- refused by name, never trained wrong ----------------------------------------------------------

REFUSED = {
    "llamafactory_kto_en_demo.json": ["preference data (field(s) label)"],
    "llamafactory_dpo_en_demo.json": ["preference data (field(s) chosen, rejected)"],
    "llamafactory_mllm_audio_demo.json": ["audio input ('audios'): no audio model is supported"],
    "swift_dpo_kto.jsonl": ["preference data (field(s) rejected_response)", "preference data (field(s) label)"],
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_preference_and_audio_data_is_refused_by_name(vl_processing, formats_folder, name):
    with pytest.raises(DataErrors) as caught:
        build_dataset([str(formats_folder / name)], encoder_for(vl_processing), show_progress=False)
    problems = [e.problem for e in caught.value.errors]
    assert len(problems) == len(REFUSED[name])
    for problem, expected in zip(problems, REFUSED[name], strict=True):
        assert problem.startswith(expected), problem
    assert all(str(formats_folder / name) == e.file for e in caught.value.errors)


def record(**fields) -> dict:
    return {"id": "x", **fields}


USER_ANSWER = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]
BAD = {
    "more placeholders than images": (
        record(
            image="images/dog.png",
            conversations=[{"from": "human", "value": "<image><image>q"}, {"from": "gpt", "value": "a"}],
        ),
        "2 <image> placeholder(s) but 1 image(s) listed in 'images'",
        "images",
    ),
    "more images than placeholders": (
        {
            "messages": [{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "a"}],
            "images": ["images/dog.png", "images/dog.png"],
        },
        "1 <image> placeholder(s) but 2 image(s) listed",
        "images",
    ),
    "a placeholder with no images": (
        record(conversations=USER_ANSWER),
        "<image> appears 1 time(s) but the sample lists no images",
        "content",
    ),
    "a video placeholder with no videos": (
        {"messages": [{"role": "user", "content": "<video>q"}, {"role": "assistant", "content": "a"}]},
        "<video> appears 1 time(s) but the sample lists no videos",
        "content",
    ),
    "a picture in the answer": (
        record(
            image="images/dog.png",
            conversations=[{"from": "human", "value": "q"}, {"from": "gpt", "value": "<image>a"}],
        ),
        "an image in the assistant turn",
        "content",
    ),
    "an unknown field": (
        record(conversations=[{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], score=3),
        "unknown record field(s) 'score'",
        "score",
    ),
    "an unknown message field": (
        {"messages": [{"role": "user", "content": "q", "lang": "en"}, {"role": "assistant", "content": "a"}]},
        "unknown message field(s) 'lang'",
        "lang",
    ),
    "tool output without a call": (
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "tool", "content": "{}"},
                {"role": "assistant", "content": "a"},
            ]
        },
        "a tool message that does not follow an assistant tool call",
        "role",
    ),
    "arguments that are not JSON": (
        {
            "messages": [
                {"role": "user", "content": "q"},
                {
                    "role": "assistant",
                    "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{oops"}}],
                },
            ]
        },
        "'tool_calls' is not valid JSON",
        "tool_calls",
    ),
    "alpaca ranking output": (
        {"instruction": "q", "output": ["a", "b"]},
        "'output' must be a string, found a list: ranking data is preference data",
        "output",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_each_bad_shape_names_file_sample_field_and_fix(vl_processing, formats_folder, case):
    bad, problem, field = BAD[case]
    path = write_json(formats_folder / "bad.json", [{"instruction": "hi", "output": "hello"}, bad])
    with pytest.raises(DataErrors) as caught:
        build_dataset([str(path)], encoder_for(vl_processing), show_progress=False)
    [error] = caught.value.errors
    assert problem in error.problem
    assert error.file == str(path) and "index 1" in error.where
    assert error.field == field and error.fix


def test_unknown_fields_can_be_ignored_and_are_counted(vl_processing, formats_folder):
    records = [
        record(conversations=[{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], score=3),
        {
            "messages": [{"role": "user", "content": "q", "lang": "en"}, {"role": "assistant", "content": "a"}],
            "score": 1,
        },
    ]
    path = write_json(formats_folder / "extra.json", records)
    _, report = build_dataset([str(path)], encoder_for(vl_processing), show_progress=False, ignore_unknown_fields=True)
    assert report.usable == 2 and report.ignored_fields == {"messages[].lang": 1, "score": 2}
    assert (
        "ignored fields (--ignore_unknown_fields): messages[].lang (1 samples), score (2 samples)" in report.summary()
    )


def test_skipped_bad_shapes_are_listed_in_the_report(vl_processing, formats_folder):
    files = [
        formats_folder / n
        for n in ("llamafactory_mllm_demo.json", "swift_dpo_kto.jsonl", "llamafactory_mllm_audio_demo.json")
    ]
    _, report = build_dataset(
        [str(f) for f in files], encoder_for(vl_processing), show_progress=False, skip_bad_samples=True
    )
    assert report.usable == 2 and len(report.bad) == 3
    assert report.formats[str(files[0])] == {"messages": 2}


# -- the check command: formats per file, and no traceback for bad files ----------------------------


def check(*args: str) -> subprocess.CompletedProcess:
    return run_module("tuning.data", *args)


def test_check_command_names_each_files_format(tiny_vl, formats_folder):
    files = [
        formats_folder / n
        for n in ("llava_instruct.json", "llamafactory_alpaca_en_demo.json", "xtuner_openai_sft.jsonl")
    ]
    result = check("--model_name_or_path", str(tiny_vl), "--data_path", *map(str, files))
    assert result.returncode == 0, result.stderr
    assert f"{files[0]}: llava 2, sharegpt 1" in result.stdout
    assert f"{files[1]}: alpaca 3" in result.stdout and f"{files[2]}: message-list 2" in result.stdout


@pytest.mark.parametrize(
    "content, expected",
    [
        ('[{"conversations": [}]', "malformed JSON"),
        ("", "the file is empty"),
        ("   \n", "the file is empty"),
        ('{"a": 1}\n{"b":', "line 2: malformed JSON"),
    ],
)
def test_check_command_reports_bad_files_without_a_traceback(tiny_vl, tmp_path, content, expected):
    path = tmp_path / "bad.json"
    path.write_text(content)
    result = check("--model_name_or_path", str(tiny_vl), "--data_path", str(path))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert expected in result.stderr and str(path) in result.stderr


def test_csv_files_are_read(tiny_vl, tmp_path):
    path = tmp_path / "alpaca.csv"
    path.write_text('instruction,input,output\n"Say hi","","hi"\n"Add","2 and 3","5"\n')
    result = check("--model_name_or_path", str(tiny_vl), "--data_path", str(path))
    assert result.returncode == 0, result.stderr
    assert f"{path}: alpaca 2" in result.stdout


def test_shipped_examples_of_each_new_format_read_cleanly():
    for name in (
        "example_llava.json",
        "example_sharegpt.json",
        "example_alpaca.json",
        "example_swift.jsonl",
        "example_xtuner.jsonl",
    ):
        convs = list(iter_conversations([DATA / name]))
        assert convs and not [c for c in convs if isinstance(c, DataError)], name


def test_a_json_file_that_is_one_object_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}]}, indent=2))
    [error] = conversations(path)
    assert "holds one JSON object, not a list of samples" in error.problem and "JSON list" in error.fix


def test_jsonl_of_bare_lists_and_of_objects_mix(tmp_path):
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            {"instruction": "q", "output": "a"},
        ],
    )
    assert [c.format for c in conversations(path)] == ["message-list", "alpaca"]


@pytest.mark.slow
def test_llava_and_sharegpt_files_train_through_the_launcher(tmp_path, tiny_vl):
    out = tmp_path / "out"
    data = f"{DATA / 'example_llava.json'},{DATA / 'example_sharegpt.json'}"
    result = subprocess.run(
        ["bash", "finetune/finetune_lora_single_gpu.sh", "-d", data, "-o", str(out), "--max_steps", "2"],
        cwd=REPO,
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "data_report.json").read_text())
    assert report["formats"] == {
        str(DATA / "example_llava.json"): {"llava": 2, "sharegpt": 1},
        str(DATA / "example_sharegpt.json"): {"messages": 1, "sharegpt": 1},
    }
    assert report["images"] == 5 and report["usable"] == 5
    assert (out / "adapter_model.safetensors").is_file()
    # the log stays readable: no warning is printed once per step
    assert "Could not determine method to count non-padding tokens" not in result.stderr
    lines = result.stderr.splitlines()
    warnings = [line for line in lines if "warn" in line.lower() and not line.strip().startswith("warnings.warn(")]
    assert not [line for line in set(warnings) if warnings.count(line) > 1], warnings
