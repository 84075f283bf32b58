"""Argument dataclasses from the command line, or from a YAML/JSON file whose values flags after it override.

Every problem is collected (the dataclasses' own checks, the values the file names but no group knows, the caller's
checks of combinations) and reported at once, before anything is loaded. An unknown flag is a usage error: exit 2
with the usage, never a traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

from transformers import HfArgumentParser

LIST_FLAGS = ("--data_path", "--eval_data_path")


def merge_repeated_flags(argv: list[str], flags=LIST_FLAGS) -> list[str]:
    """`--data_path a --data_path b` means both files (argparse alone would keep only the last)."""
    merged: dict[str, list[str]] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] in flags:
            values = merged.setdefault(argv[i], [])
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                values.append(argv[i])
                i += 1
        else:
            rest.append(argv[i])
            i += 1
    for flag, values in merged.items():
        rest += [flag, *values]
    return rest


def parse_groups(
    groups: tuple[type, ...],
    argv: list[str],
    prog: str,
    adjust: Callable[[dict], list[str]] | None = None,
    check: Callable[..., list[str]] | None = None,
    description: str | None = None,
) -> tuple[list, list[str]]:
    """(one instance per group, what `adjust` changed). `adjust(values)` may change the parsed values before the
    groups are built and returns each change with its reason; `check(*groups)` returns the combinations that
    cannot work. Any problem raises SystemExit with all of them; an unknown flag exits 2."""
    parser = HfArgumentParser(groups, prog=prog, description=description)
    config_file = None
    if argv and argv[0].endswith((".yaml", ".yml", ".json")):
        import yaml

        # the file's values are defaults that flags after it override: `finetune.py run.yaml --learning_rate 1e-4`
        config_file = argv[0]
        parser.set_defaults(**(yaml.safe_load(Path(config_file).read_text()) or {}))  # JSON is YAML too
        argv = argv[1:]
    namespace, unknown = parser.parse_known_args(merge_repeated_flags(argv))
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    values = vars(namespace)
    adjustments = adjust(values) if adjust else []
    built, problems = [], []
    for group in groups:
        names = {f.name for f in fields(group) if f.init}
        inputs = {k: v for k, v in values.items() if k in names}
        try:
            built.append(group(**inputs))
        except (ValueError, TypeError) as e:
            problems.append(str(e).splitlines()[0])
            defaults = {f.name: f.default for f in fields(group) if f.init}
            built.append(SimpleNamespace(**{**defaults, **inputs}))
    unused = set(values) - {f.name for group in groups for f in fields(group)}
    if unused:
        problems.append(f"unknown arguments in {config_file}: {', '.join(sorted(unused))}")
    if check:
        problems += check(*built)
    if problems:
        raise SystemExit(f"{prog}: bad arguments:\n" + "\n".join(f"  - {p}" for p in problems))
    return built, adjustments
