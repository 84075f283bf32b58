"""From adapter to usable model: merge equals base+adapter, and the chat command answers."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from finetune import train
from tests.conftest import DATA, PYTHON, REPO, run_env
from tuning.merge import MergeError, merge

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vl_adapter(tmp_path_factory, tiny_vl):
    out = tmp_path_factory.mktemp("adapter")
    train(
        [
            "--model_name_or_path",
            str(tiny_vl),
            "--data_path",
            str(DATA / "example.json"),
            "--output_dir",
            str(out),
            "--use_lora",
            "True",
            "--lora_r",
            "4",
            "--max_steps",
            "3",
            "--learning_rate",
            "1e-2",
            "--save_strategy",
            "no",
            "--disable_tqdm",
            "True",
        ]
    )
    return out


def test_merged_model_equals_base_plus_adapter_without_peft(vl_adapter, tiny_vl, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    result = merge(vl_adapter, tmp_path / "merged")
    assert result.max_logit_difference is not None and result.max_logit_difference < 1e-4
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged").eval()
    with_adapter = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_vl), vl_adapter).eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "merged")
    from PIL import Image

    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": Image.open(DATA / "images" / "dog.png")},
                {"type": "text", "text": "图中的狗是什么品种？"},
            ],
        }
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        assert torch.allclose(merged(**inputs).logits, with_adapter(**inputs).logits, atol=1e-4)
        greedy = {"max_new_tokens": 8, "do_sample": False}
        assert torch.equal(merged.generate(**inputs, **greedy), with_adapter.generate(**inputs, **greedy))
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_merge_is_idempotent_and_refuses_to_clobber(vl_adapter, tmp_path):
    merge(vl_adapter, tmp_path / "merged")
    assert merge(vl_adapter, tmp_path / "merged").already_done
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(MergeError, match="not empty"):
        merge(vl_adapter, tmp_path / "other")
    with pytest.raises(MergeError, match="not an adapter folder"):
        merge(tmp_path / "other", tmp_path / "x")


def chat(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "tuning.chat", *args], cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300
    )


def test_chat_answers_once_with_adapter_and_image(vl_adapter, tiny_vl):
    result = chat(
        str(tiny_vl),
        "--adapter",
        str(vl_adapter),
        "--image",
        str(DATA / "images" / "dog.png"),
        "--prompt",
        "图中的狗是什么品种？",
        "--max_new_tokens",
        "4",
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_chat_interactive_session_over_stdin(tiny_vl):
    session = f"/image {DATA / 'images' / 'dog.png'}\nwhat is this?\n/reset\nhello\n/exit\n"
    result = subprocess.run(
        [PYTHON, "-m", "tuning.chat", str(tiny_vl), "--max_new_tokens", "3"],
        cwd=REPO,
        env=run_env(),
        input=session,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(attached" in result.stdout and "(conversation cleared)" in result.stdout
    assert result.stdout.count("assistant> ") == 2


def test_qlora_adapter_merges_into_the_unquantized_base(tmp_path):
    from tuning.tiny import ensure_tiny

    # Weights of a trained model's scale: nf4 rounding of the default tiny model's wide random weights (init
    # 0.2) moves its logits by half their size, which says nothing about Q-LoRA on a real model.
    tiny_text = ensure_tiny("text", tmp_path / "base", initializer_range=0.02)
    adapter = tmp_path / "qlora"
    train(
        [
            "--model_name_or_path",
            str(tiny_text),
            "--data_path",
            str(DATA / "example_chatml.jsonl"),
            "--output_dir",
            str(adapter),
            "--use_lora",
            "True",
            "--q_lora",
            "True",
            "--lora_r",
            "4",
            "--max_steps",
            "3",
            "--learning_rate",
            "1e-2",
            "--save_strategy",
            "no",
            "--disable_tqdm",
            "True",
        ]
    )
    result = merge(adapter, tmp_path / "merged", base=str(tiny_text))
    assert result.max_logit_difference < 1e-4
    # nf4 rounding makes the 4-bit model differ a little from the 16/32-bit merge; it is reported, and small
    assert result.quantized_difference is not None and 0 < result.quantized_difference < 0.15
    assert result.quantized_top1_agreement >= 0.9
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not getattr(merged, "is_quantized", False)


def test_merge_errors_name_the_problem(vl_adapter, tiny_text, tiny_vl, tmp_path):
    from tuning.tiny import ensure_tiny

    narrow = ensure_tiny("vl", tmp_path / "narrow", hidden_size=32)
    with pytest.raises(MergeError, match="does not fit"):
        merge(vl_adapter, tmp_path / "a", base=str(narrow))
    moved = tmp_path / "moved-adapter"
    moved.mkdir()
    for f in vl_adapter.iterdir():
        if f.is_file():
            (moved / f.name).write_bytes(f.read_bytes())
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "/nowhere/base"
    (moved / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(MergeError, match=r"missing .*pass --base"):
        merge(moved, tmp_path / "b")

    from safetensors.torch import load_file

    pickled = moved / "adapter_model.safetensors"
    torch.save(load_file(pickled), moved / "adapter_model.bin")
    pickled.unlink()
    with pytest.raises(MergeError, match="only safetensors adapters are loaded"):
        merge(moved, tmp_path / "c", base=str(tiny_vl))
    from tuning.chat import load_for_chat

    with pytest.raises(FileNotFoundError, match=r"pickled adapter_model\.bin, which is not loaded"):
        load_for_chat(str(tiny_vl), str(moved))


def test_merge_refuses_a_quantized_base(vl_adapter, tiny_text, tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantized = tmp_path / "nf4"
    AutoModelForCausalLM.from_pretrained(
        tiny_text, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    ).save_pretrained(quantized)
    text_adapter = tmp_path / "text-lora"
    train(
        [
            "--model_name_or_path",
            str(tiny_text),
            "--data_path",
            str(DATA / "example_chatml.jsonl"),
            "--output_dir",
            str(text_adapter),
            "--use_lora",
            "True",
            "--lora_r",
            "4",
            "--max_steps",
            "1",
            "--save_strategy",
            "no",
            "--disable_tqdm",
            "True",
        ]
    )
    with pytest.raises(MergeError, match="quantized checkpoint"):
        merge(text_adapter, tmp_path / "c", base=str(quantized))


@pytest.mark.parametrize("bits", ["4", "8"])
def test_chat_on_a_quantized_model(tiny_text, bits):
    result = chat(str(tiny_text), "--bits", bits, "--prompt", "hello", "--max_new_tokens", "3")
    assert result.returncode == 0, result.stderr[-2000:]
