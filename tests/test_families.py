"""One record per model family: generic code asks it, a family without one gets generic behaviour where that is
safe, and a vision-language model without one is refused by name before anything loads."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import DATA, REPO
from tests.helpers import run_module
from tuning.families import FAMILIES, family_of, grounding_style, require_support

# llava-hf/llava-1.5-7b-hf's chat template (its chat_template.json)
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory, tiny_text) -> Path:
    """A vision-language folder of a family with no record (Aya Vision: a LLaVA-1.5 folder as llava-hf ships one,
    with the config's model type changed), without weights: the refusal comes before any weight is read."""
    from transformers import (
        AddedToken,
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaProcessor,
        Qwen2Config,
    )

    folder = tmp_path_factory.mktemp("llava") / "tiny-llava"
    tokenizer = AutoTokenizer.from_pretrained(tiny_text)
    tokenizer.add_special_tokens({"additional_special_tokens": [AddedToken("<image>", special=True)]})
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    vision.image_size, vision.patch_size = 28, 14
    text = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4)
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>")
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    config.save_pretrained(folder)
    images = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = LlavaProcessor(images, tokenizer, patch_size=14, vision_feature_select_strategy="default")
    processor.chat_template = LLAVA_TEMPLATE
    processor.save_pretrained(folder)
    saved = json.loads((folder / "config.json").read_text())
    saved.update(model_type="aya_vision", architectures=["AyaVisionForConditionalGeneration"])
    (folder / "config.json").write_text(json.dumps(saved))
    return folder


@pytest.mark.parametrize(
    ("kind", "name"),
    [("text", "Qwen2 / Qwen2.5"), ("qwen3", "Qwen3"), ("vl", "Qwen2.5-VL"), ("qwen2-vl", "Qwen2-VL")],
)
def test_each_tiny_build_finds_its_record(kind, name):
    from transformers import AutoConfig

    from tuning.tiny import ensure_tiny

    assert family_of(AutoConfig.from_pretrained(ensure_tiny(kind))).name == name


def test_the_grounding_convention_comes_from_the_record_then_the_vocabulary():
    qwen2_vl, qwen2_5_vl = (next(f for f in FAMILIES if f.name == name) for name in ("Qwen2-VL", "Qwen2.5-VL"))
    native = {"<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>"}
    assert (
        grounding_style(qwen2_5_vl, set()).name == "qwen2.5-vl" and grounding_style(qwen2_vl, set()).name == "qwen2-vl"
    )
    text = family_of(type("Config", (), {"model_type": "llama", "get_text_config": lambda self: self})())
    assert grounding_style(text, native).name == "qwen2-vl"  # a tokenizer with the tokens writes them
    assert grounding_style(text, set()).name == "qwen-vl"  # else the tags, added as tokens
    assert grounding_style(qwen2_5_vl, native, "qwen-vl").name == "qwen-vl"  # asked for


def test_a_qwen_tokenizer_ends_its_documents_with_endoftext_in_any_family(text_processing, tmp_path):
    """A {"text"} document ends with <|endoftext|>, not the eos <|im_end|>, also for a family without a record
    (Qwen3-MoE, Qwen3-Next bring Qwen's tokenizer)."""
    from tests.helpers import conversations, write_jsonl
    from tuning.data.encode import Encoder
    from tuning.families import GENERIC

    tokenizer = text_processing[0]
    [conv] = conversations(write_jsonl(tmp_path / "d.jsonl", [{"text": "a short document"}]))
    for family in (text_processing[2], GENERIC):
        [sample] = Encoder(tokenizer, family=family).encode(conv)
        assert tokenizer.convert_ids_to_tokens(sample.input_ids[-1]) == "<|endoftext|>"


def test_a_family_with_recurrent_layers_trains_without_packing(tmp_path, tiny_text):
    """Linear-attention layers carry their state from one packed sample into the next: packing is switched off
    before the model loads, with the reason in the log."""
    from transformers import Qwen3NextConfig

    from tuning.recipe import settle_arguments

    Qwen3NextConfig(num_hidden_layers=4, architectures=["Qwen3NextForCausalLM"]).save_pretrained(tmp_path / "next")
    values = {"model_name_or_path": str(tmp_path / "next"), "packing": True, "include_num_input_tokens_seen": "x"}
    changes = settle_arguments(values)
    assert values["packing"] is False
    assert any("--packing False" in c and "linear_attention layers carry their state" in c for c in changes)
    values = {"model_name_or_path": str(tiny_text), "packing": True}
    settle_arguments(values)
    assert values["packing"] is True


def test_a_vision_family_without_a_record_is_refused_by_name(tiny_llava, tmp_path, capsys):
    """Aya Vision has no record: every command says so in one line (LLaVA ended in a TypeError inside the picture
    code before it had one)."""
    from transformers import AutoConfig

    from finetune import train
    from tuning.data.encode import Encoder
    from tuning.data.processing import load_processing
    from tuning.families import UnsupportedFamily

    family = family_of(AutoConfig.from_pretrained(tiny_llava))
    with pytest.raises(UnsupportedFamily, match=r"AyaVisionForConditionalGeneration \(model_type 'aya_vision'\)"):
        require_support(family)
    tokenizer, processor, family = load_processing(str(tiny_llava))
    supported = r"Supported vision-language families: Qwen2-VL, Qwen2\.5-VL, Qwen3-VL, Qwen3\.5, GLM-4V, LLaVA-1\.5"
    with pytest.raises(UnsupportedFamily, match=supported):
        Encoder(tokenizer, processor, family=family)

    result = run_module(
        "tuning.data", "--data_path", str(DATA / "example_llava.json"), "--model_name_or_path", str(tiny_llava)
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    named = "AyaVisionForConditionalGeneration (model_type 'aya_vision')"
    assert result.stderr.startswith(f"error: {named} is a vision-language")
    from tuning.chat import main as chat

    assert chat([str(tiny_llava), "--prompt", "hi"]) == 1  # before any weight is read
    assert capsys.readouterr().err.startswith(f"error: {named}")
    with pytest.raises(SystemExit, match=rf"^finetune.py: {re.escape(named)}"):
        train(
            [
                "--model_name_or_path",
                str(tiny_llava),
                "--data_path",
                str(DATA / "example_llava.json"),
                "--output_dir",
                str(tmp_path / "out"),
            ]
        )


def test_no_generic_module_names_a_family_or_writes_its_tokens():
    """Family knowledge lives in tuning/families.py (and the tiny builder, which makes Qwen's tokenizers)."""
    tiny = REPO / "tuning" / "tiny"
    found = []
    for path in sorted((REPO / "tuning").rglob("*.py")):
        if path == REPO / "tuning" / "families.py" or tiny in path.parents:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"<\|[a-z_]+\|>|model_type\s*[!=]=|model_type\s+in\s", line):
                found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)
