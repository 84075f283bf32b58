"""The main job's two tasks, as tests: a tiny model really learns, and a VL model's answer comes from the pixels."""

from __future__ import annotations

import json
import subprocess

import pytest

from finetune import train
from tests.conftest import PYTHON, REPO
from tuning.chat import Chat, GenerationSettings, load_for_chat
from tuning.evaluate import exact_match
from tuning.merge import merge

pytestmark = pytest.mark.slow
COMMON = [
    "--use_lora",
    "True",
    "--lora_r",
    "16",
    "--lora_alpha",
    "32",
    "--learning_rate",
    "3e-3",
    "--warmup_steps",
    "0.03",
    "--save_strategy",
    "no",
    "--disable_tqdm",
    "True",
    "--logging_steps",
    "10",
]


def generate(script: str, out, *args: str) -> None:
    subprocess.run([PYTHON, f"data/{script}", "--out", str(out), *args], cwd=REPO, check=True, capture_output=True)


def train_lora(model, data, adapter, epochs: int, batch: int, *flags: str) -> None:
    train(
        [
            "--model_name_or_path",
            str(model),
            "--data_path",
            str(data),
            "--output_dir",
            str(adapter),
            "--num_train_epochs",
            str(epochs),
            "--per_device_train_batch_size",
            str(batch),
            *COMMON,
            *flags,
        ]
    )


def losses(folder) -> list[float]:
    state = json.loads((folder / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def learn_identity(model, tmp_path, *generator_flags: str, max_new_tokens: int = 64):
    """Generate the identity data, train LoRA 20 epochs, merge; (the answer to learn, the merged chat, the adapter)."""
    data = tmp_path / "identity.json"
    generate("make_identity.py", data, *generator_flags)
    expected = json.loads(data.read_text())[0]["conversations"][1]["value"]
    base = Chat(*load_for_chat(str(model)), settings=GenerationSettings(max_new_tokens))
    assert base.ask("你是谁？").strip() != expected
    adapter = tmp_path / "lora"
    train_lora(model, data, adapter, epochs=20, batch=8)
    merge(adapter, tmp_path / "merged")
    return (
        expected,
        Chat(*load_for_chat(str(tmp_path / "merged")), settings=GenerationSettings(max_new_tokens)),
        adapter,
    )


def test_identity_is_learned_and_survives_the_merge(tmp_path, tiny_text):
    expected, tuned, adapter = learn_identity(tiny_text, tmp_path)
    for question in ("你是谁？", "Could you tell me who you are?"):  # the second was never trained on
        tuned.reset()
        assert tuned.ask(question).strip() == expected, question
    curve = losses(adapter)
    assert curve[-1] < curve[0] / 10 and (adapter / "loss.png").stat().st_size > 5_000


def test_qwen3_learns_an_answer_with_its_reasoning_and_survives_the_merge(tmp_path):
    """The tiny Qwen3 (official template): LoRA trains on answers with a <think> block and merges; greedy decoding
    then writes the reasoning and the answer, for a phrasing never trained on too."""
    from tuning.tiny import ensure_tiny

    expected, tuned, _ = learn_identity(ensure_tiny("qwen3"), tmp_path, "--reasoning", max_new_tokens=96)
    assert expected.startswith("<think>\n")
    for question in ("你是谁？", "Could you tell me who you are?"):
        tuned.reset()
        assert tuned.ask(question).strip() == expected, question


# LLaVA-written data on Qwen2.5-VL under the `families` marker: every CI run trains the LLaVA family on it
# (tests/test_vision_families_train.py), and test_formats reads it for Qwen.
@pytest.mark.parametrize("style", ["qwen-vl", pytest.param("llava", marks=pytest.mark.families)])
def test_vision_answers_come_from_the_pixels(tmp_path, tiny_vl, style):
    """The same pictures and answers written as Qwen-VL data or as LLaVA data: the pixels arrive either way."""
    folder = tmp_path / "shapes"
    generate("make_shapes.py", folder, "--format", style)
    test = folder / "test.json"
    base = Chat(*load_for_chat(str(tiny_vl)), settings=GenerationSettings(16))
    assert exact_match(base, test, "_colour").accuracy < 0.5

    adapter = tmp_path / "lora"
    train_lora(tiny_vl, folder / "train.json", adapter, epochs=2, batch=1)
    tuned = Chat(*load_for_chat(str(tiny_vl), str(adapter)), settings=GenerationSettings(16))
    assert exact_match(tuned, test, "_colour").accuracy >= 0.9
    # Chance is 1/3: without the right picture the colour cannot be known.
    assert exact_match(tuned, test, "_colour", picture="blank").accuracy <= 0.5
    assert exact_match(tuned, test, "_colour", picture="shuffled").accuracy <= 0.5
    curve = losses(adapter)
    assert curve[-1] < curve[0] / 10


def test_where_the_shape_is_is_read_from_the_pixels(tmp_path, tiny_vl):
    """The main job's vision recipe (scripts/main_job.py, VISION_FLAGS): LoRA on the vision tower too, 10 epochs at 8
    questions a step. "Where is the shape?" is answered with <ref>the circle</ref><box>..</box> in the model's
    convention (pixels of the picture it sees): right when the label is the shape's and the box overlaps the true one
    by IoU >= 0.5, that is, lands in its corner (chance 1/4 for the corner). Blank pictures leave nothing to find."""
    folder = tmp_path / "shapes"
    generate("make_shapes.py", folder)
    test = folder / "test.json"
    adapter = tmp_path / "lora"
    vision_recipe = ("--lora_vision", "True", "--gradient_checkpointing", "False")
    train_lora(tiny_vl, folder / "train.json", adapter, 10, 8, *vision_recipe)
    tuned = Chat(*load_for_chat(str(tiny_vl), str(adapter)), settings=GenerationSettings(32))
    held_out = exact_match(tuned, test, "_where")
    blank = exact_match(tuned, test, "_where", picture="blank")
    shuffled = exact_match(tuned, test, "_where", picture="shuffled")
    print(f"where is the shape: held-out {held_out}, blank {blank}, shuffled {shuffled}; e.g. {held_out.examples[0]}")
    assert held_out.total == 30 and held_out.correct >= 24
    assert blank.correct <= 12 and shuffled.correct <= 12


def test_the_colour_of_a_moving_square_is_learned_from_the_video(tmp_path, tiny_vl):
    """A square crosses 8 frames: only the video tells its colour. Held out: well above chance (1/3); the same
    questions over blank frames: at chance, so the answer comes from the frames."""
    folder = tmp_path / "videos"
    generate("make_videos.py", folder, "--blank")
    adapter = tmp_path / "lora"
    train_lora(tiny_vl, folder / "train.json", adapter, epochs=3, batch=1)
    tuned = Chat(*load_for_chat(str(tiny_vl), str(adapter)), settings=GenerationSettings(8))
    held_out = exact_match(tuned, folder / "test.json")
    blank = exact_match(tuned, folder / "test_blank.json")
    answers = [sample["conversations"][1]["value"] for sample in json.loads((folder / "test.json").read_text())]
    majority = max(answers.count(colour) for colour in set(answers)) / len(answers)
    print(f"video colour: held-out {held_out}, blank frames {blank}, most common colour {majority:.0%}")
    # blank frames leave nothing to see: no better than always naming the most common colour
    assert held_out.accuracy >= 0.8 and blank.accuracy <= majority + 0.05
