"""The preference stage really learns: held-out rewards/accuracies from 0 to at least 0.9, on a text rule and on a
picture task where only the pixels say which answer is right (blank pictures: chance)."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import PYTHON, REPO
from tuning import recipe

pytestmark = pytest.mark.slow


def generate(task: str, out) -> None:
    subprocess.run(
        [PYTHON, "data/make_preferences.py", "--task", task, "--out", str(out)],
        cwd=REPO,
        check=True,
        capture_output=True,
    )


def phases(argv: list[str]):
    """The run's phases as finetune.train calls them, keeping what the test evaluates with."""
    from finetune import parse_arguments

    args = parse_arguments(argv)
    resume = recipe.start(args)
    data = recipe.read_data(args)
    processing = recipe.prepare_processing(args, data)
    datasets = recipe.build_datasets(args, data, processing)
    model = recipe.build_model(args, processing)
    return args, datasets, recipe.build_trainer(args, processing, datasets, model, resume)


def pairs_of(args, datasets, path):
    """Another held-out file, encoded as the run encodes its eval data."""
    from tuning.data.dataset import PreferencePairs, encode_dataset, read_conversations

    read = read_conversations([str(path)], stage=args.data.stage)
    return PreferencePairs(encode_dataset(read, datasets.encoder, show_progress=False)[0])


def argv(model, folder, out, *flags: str) -> list[str]:
    return [
        "--stage", "dpo", "--model_name_or_path", str(model), "--data_path", str(folder / "train.jsonl"),
        "--eval_data_path", str(folder / "test.jsonl"), "--output_dir", str(out), "--use_lora", "True",
        "--lora_r", "16", "--lora_alpha", "32", "--learning_rate", "3e-3", "--dataset_cache_dir", "none",
        "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "True", "--logging_steps", "10", *flags,
    ]  # fmt: skip


def test_dpo_learns_a_rule_that_holds_for_questions_never_seen(tmp_path, tiny_text):
    folder = tmp_path / "words"
    generate("words", folder)
    _, _, trainer = phases(
        argv(tiny_text, folder, tmp_path / "out", "--num_train_epochs", "3", "--per_device_train_batch_size", "8")
    )
    before = trainer.evaluate()
    assert before["eval_rewards/accuracies"] == 0 and before["eval_loss"] == pytest.approx(0.6931, abs=1e-4)
    recipe.run(trainer, None, [])
    after = trainer.evaluate()
    assert after["eval_rewards/accuracies"] >= 0.9, after
    assert after["eval_rewards/margins"] > 0 and after["eval_loss"] < 0.5


def test_dpo_on_pictures_learns_from_the_pixels(tmp_path, tiny_vl):
    folder = tmp_path / "colours"
    generate("colours", folder)
    args, datasets, trainer = phases(
        argv(tiny_vl, folder, tmp_path / "out", "--num_train_epochs", "2", "--per_device_train_batch_size", "4")
    )
    assert trainer.evaluate()["eval_rewards/accuracies"] == 0
    recipe.run(trainer, None, [])
    assert trainer.evaluate()["eval_rewards/accuracies"] >= 0.9
    blank = trainer.evaluate(eval_dataset=pairs_of(args, datasets, folder / "test_blank.jsonl"))
    assert blank["eval_rewards/accuracies"] <= 0.7, blank  # the same pairs without the picture: chance is 0.5
