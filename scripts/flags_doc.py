"""Write the flag tables of docs/training.md from finetune.py's argument dataclasses and their help texts.

    python scripts/flags_doc.py           # rewrite the tables between the markers in docs/training.md
    python scripts/flags_doc.py --check   # exit 1 when docs/training.md differs from the dataclasses

The prose around the markers is written by hand; tests/test_docs.py fails when the tables and the dataclasses
drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "training.md"
BEGIN = "<!-- flags: written by scripts/flags_doc.py from the dataclasses; edit their help texts, not this -->"
END = "<!-- end of flags -->"


def _default(field: dataclasses.Field) -> str:
    if field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    elif field.default is dataclasses.MISSING:
        return "required"
    else:
        value = field.default
    if value is None:
        return "—"
    if isinstance(value, list):
        return " ".join(map(str, value)) or "—"
    return f"`{value}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def flag_table(fields: list[dataclasses.Field]) -> str:
    rows = ["| flag | default | what it does |", "| --- | --- | --- |"]
    for field in fields:
        meaning = field.metadata.get("help", "")
        if "choices" in field.metadata:
            meaning += f" One of: {', '.join(map(str, field.metadata['choices']))}."
        rows.append(f"| `--{field.name}` | {_cell(_default(field))} | {_cell(meaning)} |")
    return "\n".join(rows)


def own_fields(group: type) -> list[dataclasses.Field]:
    """The fields a class defines itself, not those it inherits (transformers' TrainingArguments has its own docs)."""
    own = vars(group).get("__annotations__", {})
    return [f for f in dataclasses.fields(group) if f.name in own and f.init]


def tables() -> str:
    sys.path.insert(0, str(REPO))
    import finetune

    sections = [
        ("Model", dataclasses.fields(finetune.ModelArguments)),
        ("Data (also `python -m tuning.data`)", dataclasses.fields(finetune.DataArguments)),
        ("LoRA and Q-LoRA", dataclasses.fields(finetune.LoraArguments)),
        ("Preference stages (`--stage dpo`; docs/preference.md)", dataclasses.fields(finetune.PreferenceArguments)),
        ("Training: the toolkit's own flags and the defaults it changes", own_fields(finetune.TrainingArguments)),
    ]
    parts = [BEGIN]
    for title, fields in sections:
        parts += [f"### {title}", flag_table(list(fields))]
    parts.append(END)
    return "\n\n".join(parts)


def with_tables(text: str) -> str:
    before, _, rest = text.partition(BEGIN)
    _, _, after = rest.partition(END)
    return before + tables() + after


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 when the file differs, write nothing")
    args = parser.parse_args(argv)
    current = DOC.read_text(encoding="utf-8")
    if BEGIN not in current or END not in current:
        print(f"{DOC}: the markers {BEGIN!r} and {END!r} are missing", file=sys.stderr)
        return 1
    wanted = with_tables(current)
    if args.check:
        if wanted != current:
            print(f"{DOC} differs from the argument dataclasses: run python scripts/flags_doc.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(wanted, encoding="utf-8")
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
