"""Records out of data files: a JSON list, JSONL, parquet, CSV or a saved `datasets` folder.

Every format is read as a stream: memory holds one record (or one batch of table rows) and one read chunk, never
the whole file. A problem with a whole file or one line is yielded as a DataError in place of the record, so that
a run reports every problem at once and `python -m tuning.data` never shows a traceback for bad input.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from tuning.data.errors import DataError
from tuning.data.json_stream import CHUNK, BadJSON, NotUTF8, TextStream

TABULAR = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv"}
# The first line decides between JSONL and a JSON list; a longer first line is taken as a one-line JSON list.
FIRST_LINE_LIMIT = 16 * 1024 * 1024
# Table rows converted to Python at a time: small, because a row may carry an embedded picture of megabytes.
BATCH_ROWS = 64

_FORMATS_HINT = "give a JSON list, JSONL, parquet or CSV file"


def read_records(path: str | Path) -> Iterator[tuple[str, object]]:
    """Yield (where, record) for every record of a file; a record that cannot be read is a DataError."""
    path = Path(path)
    if path.is_dir():
        if not _is_saved_dataset(path):
            yield "whole file", _file_error(path, "is a folder, not a saved datasets folder", "give a data file")
            return
        yield from _dataset_records(path, None)
        return
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}. Check --data_path.")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _numbered_rows(path, "parquet", _parquet_rows(path))
    elif suffix in TABULAR:
        yield from _dataset_records(path, TABULAR[suffix])
    else:
        yield from _text_records(path)


def estimate_records(path: str | Path) -> int | None:
    """A quick count of a file's records, for a progress bar's total; None when it cannot be had cheaply (CSV,
    whose quoted fields may span lines, and a JSON list, whose records must be parsed to be counted)."""
    path = Path(path)
    try:
        if path.is_dir():
            import datasets

            return datasets.load_from_disk(str(path)).num_rows if _is_saved_dataset(path) else None
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
        if path.suffix.lower() in TABULAR:
            return None
        with path.open("rb") as f:
            kind = _text_kind(f)
            f.seek(0)
            return _count_nonblank_lines(f) if kind == "lines" else 0 if kind == "empty" else None
    except Exception:  # an estimate never fails a run: the reading that follows reports the file's problem
        return None


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "state.json").is_file()


def _file_error(path: Path, problem: str, fix: str) -> DataError:
    return DataError(str(path), "whole file", f"the file {problem}", fix)


def _not_utf8(path: Path, e: NotUTF8, where: str = "whole file") -> DataError:
    return DataError(str(path), where, f"the file is not UTF-8 text ({e.reason} at byte {e.offset})", _FORMATS_HINT)


# -- JSON and JSONL -------------------------------------------------------------------------------------------------


def _text_records(path: Path) -> Iterator[tuple[str, object]]:
    with path.open("rb") as f:
        try:
            kind = _text_kind(f)
        except NotUTF8 as e:
            yield "whole file", _not_utf8(path, e)
            return
        f.seek(0)
        if kind == "empty":
            yield "whole file", _file_error(path, "is empty", "point --data_path at a file with samples")
        elif kind == "one object":
            yield "whole file", _file_error(path, "holds one JSON object, not a list of samples", _FORMATS_HINT)
        elif kind == "list":
            yield from _json_list(path, f)
        else:
            yield from _json_lines(path, f)


def _text_kind(f) -> str:
    """'lines' (JSONL), 'list' (a JSON list), 'one object' (a pretty-printed single value) or 'empty', decided
    from the first non-blank line: only a file whose first line is not JSON is parsed further, up to the end of
    its first value."""
    first, complete = _first_line(f)
    if first is None:
        return "empty"
    if first.lstrip().startswith("["):
        # XTuner's openai_sft.jsonl: every line a bare JSON list of messages (the whole file is then not JSON)
        return "lines" if complete and isinstance(_parsed(first), list) and _more_content(f) else "list"
    if _parsed(first) is not _NOT_JSON:
        return "lines"
    f.seek(0)
    return "one object" if _is_one_value(f) else "lines"


def _first_line(f) -> tuple[str | None, bool]:
    """The first non-blank line (None when there is none) and whether it ended within FIRST_LINE_LIMIT."""
    offset = 0
    while raw := f.readline(FIRST_LINE_LIMIT):
        if raw.strip():
            complete = raw.endswith(b"\n") or len(raw) < FIRST_LINE_LIMIT
            try:  # incremental, so a character cut at the limit is not taken for bad UTF-8
                return codecs.getincrementaldecoder("utf-8")().decode(raw, final=complete), complete
            except UnicodeDecodeError as e:
                raise NotUTF8(e.reason, offset + e.start) from None
        offset += len(raw)
    return None, False


def _more_content(f) -> bool:
    return any(raw.strip() for raw in iter(lambda: f.readline(FIRST_LINE_LIMIT), b""))


_NOT_JSON = object()


def _parsed(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return _NOT_JSON


def _is_one_value(f) -> bool:
    """The file is one JSON value (spread over lines, as its first line alone is not JSON) and nothing else."""
    stream = TextStream(f, CHUNK)
    stream.skip_whitespace()
    try:
        stream.value()
    except BadJSON:
        return False
    return stream.skip_whitespace() is None


def _json_lines(path: Path, f) -> Iterator[tuple[str, object]]:
    for lineno, raw, offset in _lines(f):
        where = f"line {lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:  # one error for the file: its other lines are likely in the same encoding
            yield where, _not_utf8(path, NotUTF8(e.reason, offset + e.start), where)
            return
        if not line.strip():
            continue
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as e:
            yield where, DataError(str(path), where, f"malformed JSON ({e.msg})", "one JSON object per line")


def _lines(f) -> Iterator[tuple[int, bytes, int]]:
    """(line number, bytes without the line end, byte offset) of each line of a binary file. A lone \\r ends a
    line too, as str.splitlines has it; no record is cut by it, as JSON has no unescaped \\r inside a string."""
    lineno, offset = 0, 0
    for raw in f:
        body = raw.removesuffix(b"\n").removesuffix(b"\r")
        if b"\r" not in body:
            lineno += 1
            yield lineno, body, offset
        else:
            for start, piece in _pieces(body.split(b"\r"), offset):
                lineno += 1
                yield lineno, piece, start
        offset += len(raw)


def _pieces(pieces: list[bytes], offset: int) -> Iterator[tuple[int, bytes]]:
    for piece in pieces:
        yield offset, piece
        offset += len(piece) + 1


def _count_nonblank_lines(f) -> int:
    count = 0
    while chunk := f.read(CHUNK * 16):
        chunk += f.readline()  # to the end of a line, so no line is split between two chunks
        count += chunk.count(b"\n") - len(_BLANK_LINE.findall(chunk))
        if not chunk.endswith(b"\n") and chunk[chunk.rfind(b"\n") + 1 :].strip():
            count += 1  # a last line without a newline
    return count


_BLANK_LINE = re.compile(rb"^[ \t\r\f\v]*\n", re.MULTILINE)


def _json_list(path: Path, f) -> Iterator[tuple[str, object]]:
    """The records of a JSON list, decoded one at a time from a text buffer refilled a chunk at a time."""
    stream = TextStream(f, CHUNK)
    try:
        stream.expect("[")
        if stream.skip_whitespace() == "]":
            stream.pos += 1
        else:
            yield from _list_items(stream)
        if stream.skip_whitespace() is not None:
            raise stream.bad("Extra data")
    except BadJSON as e:
        where = f"line {e.line}"
        yield where, DataError(str(path), where, f"malformed JSON ({e.msg}, column {e.column})", "fix the JSON syntax")
    except NotUTF8 as e:
        yield "whole file", _not_utf8(path, e)


def _list_items(stream: TextStream) -> Iterator[tuple[str, object]]:
    """From the first item of a list through its closing bracket."""
    index = 0
    while True:
        record = stream.value()
        sample_id = record.get("id", index) if isinstance(record, dict) else index
        yield f"sample {sample_id} (index {index})", record
        index += 1
        after = stream.skip_whitespace()
        if after == "]":
            stream.pos += 1
            return
        if after != ",":
            raise stream.bad("Expecting ',' delimiter")
        stream.pos += 1
        stream.skip_whitespace()


# -- tables ---------------------------------------------------------------------------------------------------------


def records_from_dataset(dataset) -> Iterator[tuple[str, dict]]:
    """Records of a `datasets.Dataset` (for example loaded from local JSON/JSONL/parquet files), a batch of rows at
    a time. Rows come from the Arrow data as stored: an image column gives {"bytes", "path"}, not a decoded
    picture, so a picture is decoded once, by the loader and its limits."""
    for i, row in enumerate(_dataset_rows(dataset)):
        yield f"row {i}", row


def _dataset_rows(dataset) -> Iterator[dict]:
    for table in dataset.with_format("arrow").iter(batch_size=BATCH_ROWS):
        yield from table.to_pylist()


def _parquet_rows(path: Path) -> Iterator[dict]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS):
        yield from batch.to_pylist()


def _numbered_rows(path: Path, what: str, rows: Iterable[dict]) -> Iterator[tuple[str, object]]:
    """'row i' for each row; a file that cannot be read (at its start or part way) is one whole-file error."""
    i = 0
    try:
        for row in rows:
            yield f"row {i}", row
            i += 1
    except Exception as e:  # pyarrow and datasets raise many types (ArrowInvalid, OSError, ...) for a bad file
        yield "whole file", _file_error(path, f"cannot be read as {what} ({e})", _FORMATS_HINT)


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
    yield from _numbered_rows(path, builder or "a saved dataset", _dataset_rows(dataset))
