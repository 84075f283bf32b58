"""Records out of data files: a JSON list, JSONL, parquet, CSV or a saved `datasets` folder.

A problem with a whole file or one line is yielded as a DataError in place of the record, so that a run
reports every problem at once and `python -m tuning.data` never shows a traceback for bad input.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from tuning.data.errors import DataError

TABULAR = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv"}


def read_records(path: str | Path) -> Iterator[tuple[str, object]]:
    """Yield (where, record) for every record of a file; a record that cannot be read is a DataError."""
    path = Path(path)
    if path.is_dir():
        if not (path / "dataset_info.json").is_file() and not (path / "state.json").is_file():
            yield "whole file", _file_error(path, "is a folder, not a saved datasets folder", "give a data file")
            return
        yield from _dataset_records(path, None)
        return
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}. Check --data_path.")
    if path.suffix.lower() in TABULAR:
        yield from _dataset_records(path, TABULAR[path.suffix.lower()])
        return
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        yield "whole file", _file_error(path, f"is not UTF-8 text ({e.reason} at byte {e.start})", _FORMATS_HINT)
        return
    if not text.strip():
        yield "whole file", _file_error(path, "is empty", "point --data_path at a file with samples")
        return
    if text.lstrip().startswith("[") and not _is_jsonl_of_lists(text):
        yield from _json_list(path, text)
        return
    if _is_one_json_value(text):
        yield "whole file", _file_error(path, "holds one JSON object, not a list of samples", _FORMATS_HINT)
        return
    yield from _json_lines(path, text)


_FORMATS_HINT = "give a JSON list, JSONL, parquet or CSV file"


def _file_error(path: Path, problem: str, fix: str) -> DataError:
    return DataError(str(path), "whole file", f"the file {problem}", fix)


def _is_jsonl_of_lists(text: str) -> bool:
    """XTuner's openai_sft.jsonl: every line a bare JSON list of messages (the whole file is then not JSON)."""
    first = text.lstrip().split("\n", 1)[0]
    try:
        return isinstance(json.loads(first), list) and len(text.strip().splitlines()) > 1
    except json.JSONDecodeError:
        return False


def _is_one_json_value(text: str) -> bool:
    """A pretty-printed single object: its first line alone is not JSON, the whole text is."""
    try:
        json.loads(text.lstrip().split("\n", 1)[0])
        return False
    except json.JSONDecodeError:
        pass
    try:
        json.loads(text)
        return True
    except json.JSONDecodeError:
        return False


def _json_list(path: Path, text: str) -> Iterator[tuple[str, object]]:
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        yield (
            f"line {e.lineno}",
            DataError(
                str(path), f"line {e.lineno}", f"malformed JSON ({e.msg}, column {e.colno})", "fix the JSON syntax"
            ),
        )
        return
    if not isinstance(records, list):
        yield "whole file", _file_error(path, "holds one JSON value, not a list of samples", _FORMATS_HINT)
        return
    for i, record in enumerate(records):
        sample_id = record.get("id", i) if isinstance(record, dict) else i
        yield f"sample {sample_id} (index {i})", record


def _json_lines(path: Path, text: str) -> Iterator[tuple[str, object]]:
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"line {lineno}", json.loads(line)
        except json.JSONDecodeError as e:
            yield (
                f"line {lineno}",
                DataError(str(path), f"line {lineno}", f"malformed JSON ({e.msg})", "one JSON object per line"),
            )


def records_from_dataset(dataset) -> Iterator[tuple[str, dict]]:
    """Records of a `datasets.Dataset` (for example loaded from local JSON/JSONL/parquet files)."""
    for i, record in enumerate(dataset):
        yield f"row {i}", dict(record)


def _dataset_records(path: Path, builder: str | None) -> Iterator[tuple[str, object]]:
    import datasets

    try:
        if builder is None:
            dataset = datasets.load_from_disk(str(path))
        else:
            options = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
            dataset = datasets.load_dataset(builder, data_files=str(path), split="train", **options)
    except Exception as e:  # datasets raises many types (ArrowInvalid, DatasetGenerationError, ...) for a bad file
        yield "whole file", _file_error(path, f"cannot be read as {builder or 'a saved dataset'} ({e})", _FORMATS_HINT)
        return
    yield from records_from_dataset(dataset)
