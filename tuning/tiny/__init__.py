"""Build tiny, random-weight models of every supported family offline, with a real tokenizer and processor.

    python -m tuning.tiny --kind vl --out models/tiny-qwen2.5-vl

The folders load with the Auto classes exactly like a hub checkpoint, so every launcher, the demo
and the tests run the real loading code without a download. Builds are deterministic: the same
arguments give byte-identical weight files. One module per group of families registers its kinds
(tuning/tiny/qwen.py, text.py, vision.py); tuning/tiny/core.py builds them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tuning.tiny import qwen, text, vision  # noqa: F401  (each registers its kinds)
from tuning.tiny.core import KINDS, TinySpec, build, corpus_text, default_folder, ensure_tiny, is_current
from tuning.tiny.qwen import CHAT_TEMPLATE, SPECIAL_TOKENS, build_tokenizer, chat_template

_corpus_text = corpus_text  # the name benches and tests import

__all__ = [
    "CHAT_TEMPLATE",
    "KINDS",
    "SPECIAL_TOKENS",
    "TinySpec",
    "build",
    "build_tokenizer",
    "chat_template",
    "default_folder",
    "ensure_tiny",
    "is_current",
    "main",
]


def main(argv: list[str] | None = None) -> None:
    kinds = "\n".join(f"  {name:16} {k.model_class}: {k.summary}" for name, k in sorted(KINDS.items()))
    parser = argparse.ArgumentParser(
        description=__doc__ + "\nkinds:\n" + kinds, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kind", choices=sorted(KINDS), default="vl", metavar="KIND", help="one of the kinds below")
    parser.add_argument("--out", type=Path, help="target folder (default: models/tiny-<family>)")
    parser.add_argument("--force", action="store_true", help="rebuild even if an identical build is there")
    for field in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
        parser.add_argument(f"--{field}", type=int, default=getattr(TinySpec, field), help="(default %(default)s)")
    parser.add_argument("--initializer_range", type=float, default=TinySpec.initializer_range)
    args = parser.parse_args(argv)
    sizes = {k: v for k, v in vars(args).items() if k not in ("kind", "out", "force")}
    spec = TinySpec(kind=args.kind, **sizes)
    folder = args.out or default_folder(args.kind)
    if args.force or not is_current(spec, folder):
        build(spec, folder)
        print(f"built {KINDS[args.kind].model_class} in {folder}")
    else:
        print(f"up to date: {folder}")
