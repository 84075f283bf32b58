"""The preference stage really learns: held-out rewards/accuracies from 0 to at least 0.9, on a text rule and on a
picture task where only the pixels say which answer is right (blank pictures: chance)."""

from __future__ import annotations

import subprocess
from contextlib import nullcontext

import pytest

from tests.conftest import PYTHON, REPO
from tests.helpers import run_phases
from tuning import recipe

pytestmark = pytest.mark.slow


def generate(task: str, out, *flags: str) -> None:
    command = [PYTHON, "data/make_preferences.py", "--task", task, "--out", str(out), *flags]
    subprocess.run(command, cwd=REPO, check=True, capture_output=True)


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
        "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "True", "--logging_steps", "10",
        "--eval_strategy", "no", *flags,
    ]  # fmt: skip


def test_dpo_learns_a_rule_that_holds_for_questions_never_seen(tmp_path, tiny_text):
    folder = tmp_path / "words"
    generate("words", folder)
    _, _, trainer = run_phases(
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
    args, datasets, trainer = run_phases(
        argv(tiny_vl, folder, tmp_path / "out", "--num_train_epochs", "2", "--per_device_train_batch_size", "4")
    )
    assert trainer.evaluate()["eval_rewards/accuracies"] == 0
    recipe.run(trainer, None, [])
    assert trainer.evaluate()["eval_rewards/accuracies"] >= 0.9
    blank = trainer.evaluate(eval_dataset=pairs_of(args, datasets, folder / "test_blank.jsonl"))
    assert blank["eval_rewards/accuracies"] <= 0.7, blank  # the same pairs without the picture: chance is 0.5


def held_out_accuracy(trainer, pairs) -> float:
    """The share of held-out pairs whose chosen answer gains more log-probability over the reference than the
    rejected one (DPO's rewards/accuracies, for a trainer of another stage)."""
    import torch

    from tuning.data.collate import PairCollator
    from tuning.preference import scores_of, sequence_log_probs

    inputs = trainer._prepare_inputs(PairCollator(trainer.data_collator.inner)([pairs[i] for i in range(len(pairs))]))
    found = []
    trainer.model.eval()
    for forward in ("policy", "reference"):
        with (
            torch.no_grad(),
            trainer.reference.forward_of(trainer.model)
            if forward == "reference"
            else nullcontext(trainer.model) as model,
        ):
            values, sequences, _ = sequence_log_probs(model, inputs)
        found.append(scores_of(values, sequences, len(pairs)))
    policy, reference = found
    return ((policy.chosen - reference.chosen) > (policy.rejected - reference.rejected)).float().mean().item()


def test_kto_learns_the_rule_from_unpaired_answers(tmp_path, tiny_text):
    folder = tmp_path / "words"
    generate("words", folder)
    flags = ["--stage", "kto", "--data_path", str(folder / "train_unpaired.jsonl"), "--num_train_epochs", "2"]
    flags += ["--per_device_train_batch_size", "8"]
    args, datasets, trainer = run_phases([*argv(tiny_text, folder, tmp_path / "out")[2:], *flags])
    held_out = pairs_of(args, datasets, folder / "test.jsonl")
    assert held_out_accuracy(trainer, held_out) == 0
    recipe.run(trainer, None, [])
    assert held_out_accuracy(trainer, held_out) >= 0.9
    assert trainer.evaluate()["eval_rewards/margins"] > 0


def test_a_reward_model_learns_the_rule_for_questions_never_seen(tmp_path, tiny_text):
    """The reward is read at one token, the last, so the tiny model needs more of the same pairs than DPO does
    (measured: 240 pairs gave 0.65 held out; 800 pairs at rank 64, 8 epochs 0.975 and 1.0 for seeds 1 and 7)."""
    folder = tmp_path / "words"
    generate("words", folder, "--train", "800")
    flags = ["--stage", "rm", "--num_train_epochs", "8", "--per_device_train_batch_size", "16"]
    flags += ["--lora_r", "64", "--lora_alpha", "128"]
    _, _, trainer = run_phases([*argv(tiny_text, folder, tmp_path / "out")[2:], *flags])
    assert trainer.evaluate()["eval_accuracy"] < 0.8  # a random score head
    recipe.run(trainer, None, [])
    after = trainer.evaluate()
    assert after["eval_accuracy"] >= 0.9, after
