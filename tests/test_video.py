"""Real pictures and video: resolution through the model's processor, video end to end, over-long samples
explained."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from tests.conftest import DATA
from tests.helpers import run_module, write_json
from tuning.data.args import DataArguments
from tuning.data.collate import FlatteningCollator, PaddingCollator
from tuning.data.dataset import build_dataset
from tuning.data.errors import DataErrors
from tuning.data.media.resolution import MediaOptions, configure, tokens_per_picture
from tuning.data.processing import load_processing
from tuning.families import packed_positions
from tuning.model import set_use_cache
from tuning.tiny import ensure_tiny

# Qwen2.5-VL-7B-Instruct's preprocessor_config.json: min_pixels 3136, max_pixels 12845056 (patch 14, merge 2)
REAL_SIZE = {"shortest_edge": 3136, "longest_edge": 12845056}


def real_like_processing(tiny_vl):
    loaded = load_processing(str(tiny_vl))
    loaded.processor.image_processor.size = dict(REAL_SIZE)
    return loaded


def test_a_12_megapixel_photo_stays_within_the_default_budget(tiny_vl):
    _, processor, _ = real_like_processing(tiny_vl)
    assert tokens_per_picture(processor, 2000, 1500) == 3834  # the model's own setting, as a user would get it
    assert tokens_per_picture(processor, 4032, 3024) > 15000
    configure(processor, MediaOptions())
    assert tokens_per_picture(processor, 2000, 1500) == 713
    assert tokens_per_picture(processor, 4032, 3024) == 713  # the README's number
    _, fresh, _ = real_like_processing(tiny_vl)
    configure(fresh, MediaOptions(image_max_pixels=None))  # --image_max_pixels model
    assert fresh.image_processor.size["longest_edge"] == REAL_SIZE["longest_edge"]


def test_image_pixel_flags_change_the_grid_as_the_processor_documents(tiny_vl):
    _, processor, _ = real_like_processing(tiny_vl)
    configure(processor, MediaOptions(image_max_pixels=224 * 224))
    grid = processor.image_processor(images=[Image.new("RGB", (2000, 1500))], return_tensors="pt")["image_grid_thw"][0]
    assert int(grid[1]) * int(grid[2]) * 14 * 14 <= 224 * 224  # patches of 14 px, the area within the bound
    small = Image.new("RGB", (56, 56))
    before = processor.image_processor(images=[small], return_tensors="pt")["image_grid_thw"][0].tolist()
    configure(processor, MediaOptions(image_max_pixels=224 * 224, image_min_pixels=112 * 112))
    after = processor.image_processor(images=[small], return_tensors="pt")["image_grid_thw"][0].tolist()
    assert before == [1, 4, 4] and after == [1, 8, 8]  # enlarged to the minimum area
    assert DataArguments(image_max_pixels="768*768").media_options().image_max_pixels == 589824
    assert DataArguments(image_max_pixels="model").media_options().image_max_pixels is None
    assert DataArguments(image_max_pixels="big").problems() == [
        "a pixel flag: 'big' is not a pixel count: write a number such as 589824 or 768*768, or 'model'"
    ]


def test_an_overlong_sample_says_why_and_how_to_fix_it(tiny_vl, tmp_path):
    Image.new("RGB", (2000, 1500), "white").save(tmp_path / "photo.png")
    record = {
        "id": "photo",
        "image": "photo.png",
        "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A wall."}],
    }
    path = write_json(tmp_path / "d.json", [record])
    flags = ["--data_path", str(path), "--image_max_pixels", "model", "--model_max_length", "40"]
    result = run_module("tuning.data", "--model_name_or_path", str(tiny_vl), *flags)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert (
        "sample photo: " in result.stderr and "86 tokens (54 image tokens), over --model_max_length 40" in result.stderr
    )
    assert "lower --image_max_pixels or raise --model_max_length" in result.stderr


def video_batch(processing):
    encoder = DataArguments().encoder(DataArguments().processing(processing, []))
    files = [str(DATA / "example_video.json"), str(DATA / "example.json")]
    dataset, report = build_dataset(files, encoder, show_progress=False)
    return [dataset[i] for i in range(len(dataset))], report


@pytest.mark.parametrize("kind", ["vl", "qwen3-vl"])
def test_packed_loss_equals_padded_loss_with_videos_and_pictures(kind):
    folder = ensure_tiny(kind)
    processing = load_processing(str(folder))
    batch, report = video_batch(processing)
    assert report.videos == 3 and report.images == 3
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    set_use_cache(model, False)
    padded = PaddingCollator(processing[0].pad_token_id)(batch)
    flat = FlatteningCollator(packed_positions(model))(batch)
    assert flat["pixel_values_videos"].shape[0] == sum(
        int(f["video_grid_thw"].prod()) for f in batch if "video_grid_thw" in f
    )
    with torch.no_grad():
        assert abs(float(model(**padded).loss) - float(model(**flat).loss)) < 1e-4
    # and a video really reaches the model: other frames give another loss
    other = dict(batch[0])
    other["pixel_values_videos"] = torch.zeros_like(other["pixel_values_videos"])
    with torch.no_grad():
        changed = float(model(**FlatteningCollator(packed_positions(model))([other])).loss)
        assert abs(changed - float(model(**FlatteningCollator(packed_positions(model))([batch[0]])).loss)) > 1e-5


def test_video_tokens_follow_the_processor(vl_processing):
    tokenizer = vl_processing[0]
    batch, _ = video_batch(vl_processing)
    first = batch[0]
    pads = first["input_ids"].count(tokenizer.convert_tokens_to_ids("<|video_pad|>"))
    assert pads == int(first["video_grid_thw"].prod()) // 4 and first["second_per_grid_ts"] == [1.0]
    assert first["mm_token_type_ids"].count(2) == pads
    labels = [t for t, label in zip(first["input_ids"], first["labels"], strict=True) if label != -100]
    assert tokenizer.decode(labels) == "red<|im_end|>"


def test_a_corrupt_or_cut_video_is_named_and_can_be_skipped(vl_processing, tmp_path):
    shutil.copy(DATA / "videos" / "red_square.mp4", tmp_path / "good.mp4")
    (tmp_path / "garbage.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a video at all")
    whole = (DATA / "videos" / "red_square.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(whole[: len(whole) // 3])

    def sample(name):
        turns = [{"from": "human", "value": "<video>\nColour?"}, {"from": "gpt", "value": "red"}]
        return {"id": name, "video": f"{name}.mp4", "conversations": turns}

    path = write_json(tmp_path / "d.json", [sample("good"), sample("garbage"), sample("cut"), sample("missing")])
    encoder = DataArguments().encoder(DataArguments().processing(vl_processing, []))
    with pytest.raises(DataErrors) as caught:
        build_dataset([str(path)], encoder, show_progress=False)
    problems = {e.where.split()[1]: e.problem for e in caught.value.errors}
    assert set(problems) == {"garbage", "cut", "missing"}
    assert "cannot be read" in problems["garbage"] and "not found" in problems["missing"]
    _, report = build_dataset([str(path)], encoder, show_progress=False, skip_bad_samples=True)
    assert report.usable == 1 and report.videos == 1 and len(report.bad) == 3


@pytest.mark.slow
def test_the_chat_command_answers_about_a_video(tiny_vl):
    video = str(DATA / "videos" / "red_square.mp4")
    result = run_module(
        "tuning.chat", str(tiny_vl), "--video", video, "--prompt", "What colour?", "--max_new_tokens", "4"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip()


def test_the_demo_takes_an_uploaded_video(tiny_vl):
    from tuning.chat import Chat, load_for_chat
    from tuning.demo import DemoModel, history_to_messages

    history = [
        {"role": "user", "content": {"path": str(DATA / "videos" / "red_square.mp4")}},
        {"role": "user", "content": "What colour is it?"},
    ]
    messages = history_to_messages(history, [])
    assert messages[0]["content"][0] == {"type": "video", "video": str(DATA / "videos" / "red_square.mp4")}
    demo = DemoModel(Chat(*load_for_chat(str(tiny_vl))))
    *_, (shown, raw) = demo.respond(history, [], "", 4, 0.0, 1.0)
    assert len(raw) == 1 and not shown[-1]["content"].startswith("⚠️")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["vl", "qwen3-vl"])
def test_a_video_trains_with_packing_and_the_options_are_saved(tmp_path, kind):
    from finetune import train

    folder = ensure_tiny(kind)
    out = tmp_path / "out"
    train(
        [
            "--model_name_or_path", str(folder),
            "--data_path", str(DATA / "example_video.json"), str(DATA / "example.json"),
            "--output_dir", str(out),
            "--use_lora", "True",
            "--per_device_train_batch_size", "3",
            "--max_steps", "2",
            "--video_fps", "2",
            "--save_strategy", "no",
            "--disable_tqdm", "True",
        ]
    )  # fmt: skip
    state = json.loads((out / "trainer_state.json").read_text())
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in state["log_history"] if "loss" in e)
    saved = MediaOptions.saved_in(out)
    assert saved.video_fps == 2 and saved.image_max_pixels == 768 * 768
    video = json.loads((out / "processor_config.json").read_text())["video_processor"]
    assert video["fps"] == 2 and video["size"]["longest_edge"] == 256 * 256


def test_a_12mp_photo_trains_on_a_model_with_the_real_processor_settings(tiny_vl, tmp_path):
    from finetune import train

    model = tmp_path / "real-like"
    shutil.copytree(tiny_vl, model)
    config = json.loads((model / "processor_config.json").read_text())
    config["image_processor"]["size"] = dict(REAL_SIZE)
    (model / "processor_config.json").write_text(json.dumps(config))
    Image.new("RGB", (4032, 3024), (random.Random(0).randint(0, 255), 90, 30)).save(tmp_path / "phone.jpg")
    record = {
        "id": "phone",
        "image": "phone.jpg",
        "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "brown"}],
    }
    data = write_json(tmp_path / "d.json", [record])
    out = tmp_path / "out"
    train(
        ["--model_name_or_path", str(model), "--data_path", str(data), "--output_dir", str(out), "--use_lora", "True",
         "--max_steps", "1", "--save_strategy", "no", "--disable_tqdm", "True"]
    )  # fmt: skip
    report = json.loads((out / "data_report.json").read_text())
    assert report["usable"] == 1 and report["tokens"] < 713 + 40
