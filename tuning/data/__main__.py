"""Check and inspect training data before a run.

    python -m tuning.data --data_path data/example.json --model_name_or_path models/tiny-qwen2.5-vl --show 3

Prints what the pipeline does with every sample (read, usable, truncated, dropped, bad, with ids and
reasons), token and image counts and length percentiles. `--show K` renders K samples with the
supervised tokens marked; `--dump OUT.jsonl` writes the encoded samples.
Exit status: 0 when every sample is usable, 1 when any is not (all are listed), 2 on bad arguments.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from tuning.data.args import DataArguments, merge_repeated_flags
from tuning.data.dataset import build_dataset
from tuning.data.encode import IGNORE_INDEX
from tuning.data.errors import DataErrors


@dataclass
class CheckArguments:
    model_name_or_path: str = field(metadata={"help": "Model whose tokenizer, template and processor encode the data."})
    show: int = field(default=0, metadata={"help": "Render this many samples with the supervised tokens marked."})
    dump: str | None = field(default=None, metadata={"help": "Write one JSON line per usable sample to this file."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow the model's own Python code to run."})


def render_supervision(tokenizer, input_ids: list[int], labels: list[int], colour: bool) -> str:
    """The sample's text with supervised runs marked: green on a terminal, [[...]] otherwise."""
    out, run, run_supervised = [], [], None

    def flush():
        if not run:
            return
        text = tokenizer.decode(run)
        for token in ("<|image_pad|>", "<|video_pad|>"):  # a picture is hundreds of pads: show a count
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
    from tuning.model import load_processing

    parser = HfArgumentParser((DataArguments, CheckArguments), description=__doc__)
    try:
        data_args, check_args = parser.parse_args_into_dataclasses(merge_repeated_flags(argv or sys.argv[1:]))
    except SystemExit as e:
        return 0 if e.code == 0 else 2
    if problems := data_args.problems():
        print("\n".join(f"error: {p}" for p in problems), file=sys.stderr)
        return 2
    try:
        tokenizer, processor, model_type = load_processing(check_args.model_name_or_path, check_args.trust_remote_code)
    except (OSError, ValueError) as e:
        print(f"error: cannot load {check_args.model_name_or_path!r}: {e}", file=sys.stderr)
        return 2
    encoder = data_args.encoder(tokenizer, processor, model_type)
    try:
        dataset, report = build_dataset(
            data_args.data_path,
            encoder,
            skip_bad_samples=True,
            show_progress=sys.stderr.isatty(),
            workers=data_args.preprocessing_num_workers,
            ignore_unknown_fields=data_args.ignore_unknown_fields,
        )
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DataErrors as e:
        print(e, file=sys.stderr)
        return 1
    print(report.summary())
    for sample in dataset.samples[: check_args.show]:
        print(f"\n--- {sample.id} ({len(sample.input_ids)} tokens, {sample.num_images} images)")
        print(render_supervision(tokenizer, sample.input_ids, sample.labels, sys.stdout.isatty()))
    if check_args.dump:
        with open(check_args.dump, "w", encoding="utf-8") as f:
            for s in dataset.samples:
                line = {"id": s.id, "input_ids": s.input_ids, "labels": s.labels, "num_images": s.num_images}
                f.write(json.dumps(line) + "\n")
        print(f"\nwrote {len(dataset.samples)} samples to {check_args.dump}")
    return 0 if report.usable == report.read else 1


if __name__ == "__main__":
    sys.exit(main())
