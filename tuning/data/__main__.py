"""Check and inspect training data before a run.

    python -m tuning.data --data_path data/example.json --model_name_or_path models/tiny-qwen2.5-vl --show 3

Prints what the pipeline does with every sample (read, usable, truncated, dropped, bad, with ids and
reasons), token and image counts and length percentiles. It fills the same dataset cache as finetune.py, so a run
with the same data and options after a check encodes nothing. `--show K` renders K samples with the
supervised tokens marked; `--dump OUT.jsonl` writes the encoded samples.
Exit status: 0 when every sample is usable, 1 when any is not (all are listed), 2 on bad arguments.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

from tuning.arguments import parse_groups
from tuning.data.args import DataArguments
from tuning.data.cache import CacheError
from tuning.data.dataset import encode_dataset, read_conversations
from tuning.data.encode import IGNORE_INDEX
from tuning.data.errors import DataErrors
from tuning.families import UnsupportedFamily


@dataclass
class CheckArguments:
    model_name_or_path: str = field(metadata={"help": "Model whose tokenizer, template and processor encode the data."})
    show: int = field(
        default=0,
        metadata={
            "help": "Render this many samples with the supervised tokens marked (preference data: this many pairs, "
            "each prompt with its chosen and its rejected answer)."
        },
    )
    dump: str | None = field(default=None, metadata={"help": "Write one JSON line per usable sample to this file."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow the model's own Python code to run."})


def render_supervision(
    tokenizer, input_ids: list[int], labels: list[int], colour: bool, media_tokens: tuple[str, ...] = ()
) -> str:
    """The sample's text with supervised runs marked: green on a terminal, [[...]] otherwise; a picture's or
    video's run of `media_tokens` is shown as the token and its count."""
    out, run, run_supervised = [], [], None

    def flush():
        if not run:
            return
        text = tokenizer.decode(run)
        for token in media_tokens:  # a picture is hundreds of pads: show a count
            count = text.count(token)
            if count > 1:
                text = text.replace(token * count, f"{token}x{count}")
        if run_supervised:
            text = f"\033[42;30m{text}\033[0m" if colour else f"[[{text}]]"
        out.append(text)

    for token, label in zip(input_ids, labels, strict=True):
        supervised = label != IGNORE_INDEX
        if supervised != run_supervised:
            flush()
            run, run_supervised = [], supervised
        run.append(token)
    flush()
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    from tuning.data.processing import load_processing

    argv = sys.argv[1:] if argv is None else argv
    try:
        built, _ = parse_groups(
            (DataArguments, CheckArguments),
            argv,
            "python -m tuning.data",
            check=lambda data_args, _: data_args.problems(),
            description=__doc__,
        )
    except SystemExit as e:  # --help (0), a usage error (2), or the bad arguments listed
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return 2
        return e.code or 0
    data_args, check_args = built
    try:
        root = data_args.cache_root()
        read = read_conversations(
            data_args.data_path, data_args.ignore_unknown_fields, root, False, sys.stderr.isatty(), data_args.stage
        )
    except (FileNotFoundError, CacheError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        loaded = load_processing(check_args.model_name_or_path, check_args.trust_remote_code)
        processing = data_args.processing(loaded, read.uses_grounding)
        encoder = data_args.encoder(processing)
    except (OSError, ValueError) as e:  # UnsupportedFamily is a ValueError
        what = "" if isinstance(e, UnsupportedFamily) else f"cannot load {check_args.model_name_or_path!r}: "
        print(f"error: {what}{e}", file=sys.stderr)
        return 2
    try:
        dataset, report = encode_dataset(
            read,
            encoder,
            cache_root=root,
            skip_bad_samples=True,
            show_progress=sys.stderr.isatty(),
            workers=data_args.preprocessing_num_workers,
        )
    except DataErrors as e:
        print(e, file=sys.stderr)
        return 1
    report.added_tokens = processing.added_tokens
    print(report.summary())
    media_tokens = tuple(t for t in (encoder.image_token, encoder.video_token) if t)
    shown = check_args.show * (2 if report.preference.get("pairs") else 1)
    for sample in dataset.samples[:shown]:
        side = f" {sample.preference['side']}" if sample.preference else ""
        print(f"\n--- {sample.id}{side} ({len(sample.input_ids)} tokens, {sample.num_images} images)")
        print(render_supervision(encoder.tokenizer, sample.input_ids, sample.labels, sys.stdout.isatty(), media_tokens))
    if check_args.dump:
        with open(check_args.dump, "w", encoding="utf-8") as f:
            for s in dataset.samples:
                line = {"id": s.id, "input_ids": s.input_ids, "labels": s.labels, "num_images": s.num_images}
                f.write(json.dumps(line) + "\n")
        print(f"\nwrote {len(dataset.samples)} samples to {check_args.dump}")
    return 0 if report.usable == report.read else 1


if __name__ == "__main__":
    sys.exit(main())
