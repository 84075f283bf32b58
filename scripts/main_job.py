"""The main job on the embedded tiny models: prove that fine-tuning teaches them something.

    python scripts/main_job.py            # run by scripts/demo.sh after the set-up

1. Identity: LoRA-train the tiny Qwen2 on many phrasings of "who are you" with one fixed answer,
   through finetune/finetune_lora_ds.sh; merge; ask before and after (a seen and an unseen phrasing).
2. Vision: LoRA-train the tiny Qwen2.5-VL (its vision tower too) on synthetic shape pictures through
   the same launcher; merge; accuracy on held-out pictures before and after, with blank and shuffled
   pictures as controls (if the answers come from the pixels they fall to chance); one grounded answer
   drawn.
3. Preference: DPO on the tiny Qwen2 through the same launcher (--stage dpo): pairs whose chosen answer is a word
   of the kind the question asks for; held-out rewards/accuracies (questions phrased as never in training) at the
   start and at the end.
Every step prints the command it runs; a summary closes.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
OUT = Path(os.environ.get("DEMO_OUTPUT", REPO / "output" / "demo"))
IDENTITY_QUESTIONS = ("你是谁？", "Could you tell me who you are?")  # the second phrasing is never trained on
TRAIN_FLAGS = [
    "--overwrite_output_dir",
    "True",
    "--save_strategy",
    "no",
    "--gradient_accumulation_steps",
    "1",
    "--lora_r",
    "16",
    "--lora_alpha",
    "32",
    "--learning_rate",
    "3e-3",
    "--warmup_steps",
    "0.03",
    "--gradient_checkpointing",
    "False",
    "--model_max_length",
    "512",
    "--disable_tqdm",
    "True",
]
# Where the shape is has to come from the vision tower: Qwen2.5-VL has no absolute position embedding, and the
# language model's rope turns with the picture's rows and columns at most 1e6 ** -1/4 and 1e6 ** -5/8 radians a
# token, too slowly to tell its four picture tokens apart by place. A frozen random tower gives the colour and the
# shape but not the corner (5/30 held out, chance 1/4); LoRA on the tower learns it at 8 questions a step: 10 epochs
# of the 600 questions gave 30/30 for four seeds, 6 epochs 21 and 30/30, 4 epochs 19 and 23/30.
VISION_FLAGS = ["--lora_vision", "True", "--num_train_epochs", "10", "--per_device_train_batch_size", "8"]
QUESTIONS = (("colour", "_colour"), ("where", "_where"))


def run(title: str, *command: str, capture: bool = False) -> str:
    print(f"\n== {title}\n+ {shlex.join(str(c) for c in command)}", flush=True)
    result = subprocess.run(
        [str(c) for c in command], cwd=REPO, text=True, check=False, stdout=subprocess.PIPE if capture else None
    )
    if result.returncode != 0:
        raise SystemExit(f"step failed with exit status {result.returncode}: {title}")
    if capture:
        print(result.stdout, end="")
    return result.stdout or ""


def ask(model: str, question: str, *extra: str) -> str:
    lines = (
        run(
            f"asking {Path(model).name}",
            PY,
            "-m",
            "tuning.chat",
            model,
            "--prompt",
            question,
            "--max_new_tokens",
            "64",
            *extra,
            capture=True,
        )
        .strip()
        .splitlines()
    )
    return lines[-1] if lines else ""


def accuracy(model: str, data: Path, suffix: str, picture: str = "real") -> dict:
    output = run(
        f"accuracy of {Path(model).name} on {suffix[1:]} questions, {picture} pictures",
        PY,
        "-m",
        "tuning.evaluate",
        model,
        "--data",
        data,
        "--id_suffix",
        suffix,
        "--picture",
        picture,
        "--json",
        capture=True,
    )
    return json.loads(output.strip().splitlines()[-1])


def identity_task(text_model: str) -> dict:
    data = OUT / "identity.json"
    run("generating the identity data", PY, "data/make_identity.py", "--out", data)
    before = {q: ask(text_model, q) for q in IDENTITY_QUESTIONS}
    adapter, merged = OUT / "identity-lora", OUT / "identity-merged"
    run(
        "LoRA fine-tuning the tiny Qwen2 (DeepSpeed ZeRO-2 launcher)",
        "bash",
        "finetune/finetune_lora_ds.sh",
        "-m",
        text_model,
        "-d",
        data,
        "-o",
        adapter,
        *TRAIN_FLAGS,
        "--num_train_epochs",
        "20",
        "--per_device_train_batch_size",
        "8",
    )
    run("merging the adapter", PY, "merge_lora.py", "--adapter", adapter, "--output", merged, "--overwrite")
    after = {q: ask(str(merged), q) for q in IDENTITY_QUESTIONS}
    expected = json.loads(data.read_text())[0]["conversations"][1]["value"]
    return {
        "before": before,
        "after": after,
        "expected": expected,
        "loss_curve": str(adapter / "loss.png"),
        "merged": str(merged),
    }


def vision_task(vl_model: str) -> dict:
    folder = OUT / "shapes"
    run("drawing the shape pictures", PY, "data/make_shapes.py", "--out", folder)
    test = folder / "test.json"
    before = {name: accuracy(vl_model, test, suffix) for name, suffix in QUESTIONS}
    adapter, merged = OUT / "shapes-lora", OUT / "shapes-merged"
    started = time.monotonic()
    run(
        "LoRA fine-tuning the tiny Qwen2.5-VL and its vision tower (DeepSpeed ZeRO-2 launcher)",
        "bash",
        "finetune/finetune_lora_ds.sh",
        "-m",
        vl_model,
        "-d",
        folder / "train.json",
        "-o",
        adapter,
        *TRAIN_FLAGS,
        *VISION_FLAGS,
    )
    train_seconds = round(time.monotonic() - started)
    run("merging the adapter", PY, "merge_lora.py", "--adapter", adapter, "--output", merged, "--overwrite")
    after = {name: accuracy(str(merged), test, suffix) for name, suffix in QUESTIONS}
    controls = {
        name: {picture: accuracy(str(merged), test, suffix, picture) for picture in ("blank", "shuffled")}
        for name, suffix in QUESTIONS
    }
    drawn = OUT / "grounded-answer.png"
    run(
        "one grounded answer, drawn on its picture",
        PY,
        "-m",
        "tuning.evaluate",
        merged,
        "--data",
        test,
        "--id_suffix",
        "_where",
        "--draw",
        drawn,
        capture=True,
    )
    return {
        "before": before,
        "after": after,
        "controls": controls,
        "train_seconds": train_seconds,
        "drawn": str(drawn),
        "loss_curve": str(adapter / "loss.png"),
        "merged": str(merged),
    }


def preference_task(text_model: str) -> dict:
    folder = OUT / "preferences"
    run("generating the preference pairs", PY, "data/make_preferences.py", "--task", "words", "--out", folder)
    adapter = OUT / "dpo-lora"
    started = time.monotonic()
    run(
        "DPO on the tiny Qwen2 (DeepSpeed ZeRO-2 launcher, --stage dpo)",
        "bash",
        "finetune/finetune_lora_ds.sh",
        "-m",
        text_model,
        "-d",
        folder / "train.jsonl",
        "--eval-data",
        folder / "test.jsonl",
        "-o",
        adapter,
        *TRAIN_FLAGS,
        "--stage",
        "dpo",
        "--num_train_epochs",
        "3",
        "--per_device_train_batch_size",
        "8",
        "--eval_strategy",
        "epoch",
        "--eval_on_start",
        "True",
    )
    evaluations = [
        e for e in json.loads((adapter / "trainer_state.json").read_text())["log_history"] if "eval_loss" in e
    ]
    return {
        "before": evaluations[0]["eval_rewards/accuracies"],
        "after": evaluations[-1]["eval_rewards/accuracies"],
        "margin_after": evaluations[-1]["eval_rewards/margins"],
        "train_seconds": round(time.monotonic() - started),
        "adapter": str(adapter),
    }


def percent(score: dict) -> str:
    return f"{score['correct']}/{score['total']} ({score['accuracy']:.0%})"


def main() -> int:
    started = time.monotonic()
    OUT.mkdir(parents=True, exist_ok=True)
    # The tiny models' layers are too small to gain from a second thread, and where another process holds a core
    # OpenMP's waits take over: the vision training's loop took 36-41 s with one thread and 634 s with two on a shared
    # 2-core machine. OMP_NUM_THREADS set by the caller wins.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    models = (
        run(
            "building the tiny models (reused when current)",
            PY,
            "-c",
            "from tuning.tiny import ensure_tiny; print(ensure_tiny('text')); print(ensure_tiny('vl'))",
            capture=True,
        )
        .strip()
        .splitlines()[-2:]
    )
    identity = identity_task(models[0])
    vision = vision_task(models[1])
    preference = preference_task(models[0])
    (OUT / "summary.json").write_text(
        json.dumps({"identity": identity, "vision": vision, "preference": preference}, indent=2, ensure_ascii=False)
    )
    print(f"\n== Summary ({time.monotonic() - started:.0f} s), outputs in {OUT}")
    print(f"identity, expected answer: {identity['expected']}")
    for question in IDENTITY_QUESTIONS:
        print(
            f"  {question}\n    before: {identity['before'][question]!r}\n    after:  {identity['after'][question]!r}"
        )
    print(f"vision, trained in {vision['train_seconds']} s; held-out pictures (chance: colour 1/3, where 1/4):")
    for name, _ in QUESTIONS:
        controls = vision["controls"][name]
        print(
            f"  {name}: before {percent(vision['before'][name])}, after {percent(vision['after'][name])}; "
            f"blank pictures {percent(controls['blank'])}, shuffled pictures {percent(controls['shuffled'])}"
        )
    print(f"  grounded answer drawn: {vision['drawn']}")
    print(
        f"preference (DPO, {preference['train_seconds']} s): held-out rewards/accuracies {preference['before']:.2f} "
        f"before, {preference['after']:.2f} after (margin {preference['margin_after']:.2f})"
    )
    print(f"loss curves: {identity['loss_curve']} {vision['loss_curve']}")
    print(f"merged models: {identity['merged']} {vision['merged']}")
    learned = all(identity["after"][q] == identity["expected"] for q in IDENTITY_QUESTIONS)
    seen = vision["after"]["colour"]["accuracy"] >= 0.9 and vision["after"]["where"]["accuracy"] >= 0.8
    preferred = preference["after"] >= 0.9
    return 0 if learned and seen and preferred else 1


if __name__ == "__main__":
    sys.exit(main())
