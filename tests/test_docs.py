"""The docs stay true: the flag tables of docs/training.md are the dataclasses' own help texts, and every link
between the README and docs/ points at a file that exists."""

from __future__ import annotations

import importlib.util
import re

from tests.conftest import REPO


def flags_doc():
    spec = importlib.util.spec_from_file_location("flags_doc", REPO / "scripts" / "flags_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_flag_tables_are_the_dataclasses_help_texts():
    module = flags_doc()
    current = module.DOC.read_text(encoding="utf-8")
    assert module.with_tables(current) == current, "docs/training.md drifted: run python scripts/flags_doc.py"
    for flag in ("--model_max_length", "--lora_r", "--loss_impl", "--fix_vit", "--image_max_pixels"):
        assert f"| `{flag}` |" in current


def test_a_changed_help_text_is_caught(monkeypatch):
    import finetune

    module = flags_doc()
    current = module.DOC.read_text(encoding="utf-8")
    field = finetune.LoraArguments.__dataclass_fields__["lora_r"]
    monkeypatch.setattr(field, "metadata", {"help": "a new help text"})
    assert module.with_tables(current) != current


def test_links_between_the_readme_and_the_docs_point_at_files():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert not broken
    assert len((REPO / "README.md").read_bytes()) <= 20_000  # the reference lives in docs/
