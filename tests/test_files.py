"""Data files are read as streams: memory holds a record and a chunk, errors keep their line numbers, and pictures
embedded in a table stay bytes until they are loaded."""

from __future__ import annotations

import io
import json
import tracemalloc

import pytest
from PIL import Image

from tuning.data import files
from tuning.data.conversation import ImageRef
from tuning.data.errors import DataError
from tuning.data.files import estimate_records, read_records
from tuning.data.formats import iter_conversations
from tuning.data.media.images import ImageLimits, ImageLoadError, load_image


def records_of(path) -> list:
    return [record for _, record in read_records(path)]


def errors_of(path) -> list[DataError]:
    return [record for _, record in read_records(path) if isinstance(record, DataError)]


def traced_peak(read) -> tuple[object, int]:
    """What read() returns, and the most memory Python held at once while it ran."""
    tracemalloc.start()
    try:
        return read(), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def count_records(path) -> int:
    return sum(1 for _ in read_records(path))


def test_a_large_jsonl_file_is_read_in_a_small_fraction_of_its_size(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": f"short record number {i}"}) + "\n" for i in range(50_000)))
    count, peak = traced_peak(lambda: count_records(path))
    assert count == 50_000
    assert peak < path.stat().st_size / 10, f"peak {peak} bytes for a file of {path.stat().st_size}"
    lines, whole = traced_peak(lambda: len(path.read_text().splitlines()))  # the old way, to show the measure
    assert lines == 50_000 and whole > path.stat().st_size


def test_a_large_pretty_printed_json_list_is_read_a_chunk_at_a_time(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "CHUNK", 64 * 1024)
    path = tmp_path / "big.json"
    path.write_text(json.dumps([{"id": i, "text": f"record {i}"} for i in range(50_000)], indent=2))
    count, peak = traced_peak(lambda: count_records(path))
    assert count == 50_000
    assert peak < path.stat().st_size / 10, f"peak {peak} bytes for a file of {path.stat().st_size}"


@pytest.mark.parametrize("chunk", [7, 64, 1024 * 1024])  # tiny chunks cut every value, number and character
def test_a_pretty_printed_json_list_reads_as_json_load(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(files, "CHUNK", chunk)
    records = [
        {"id": "a", "conversations": [{"from": "human", "value": "héllo ☃ 😀"}, {"from": "gpt", "value": "x" * 300}]},
        {"n": 1234567890123, "f": -1.5e-7, "t": True, "none": None, "nested": {"list": [[], {}, [1, [2]]]}},
        "a bare string",
        9876543210,
    ]
    path = tmp_path / "pretty.json"
    path.write_text(json.dumps(records, indent=4, ensure_ascii=False), encoding="utf-8")
    assert records_of(path) == json.loads(path.read_text(encoding="utf-8"))
    assert [where for where, _ in read_records(path)] == [
        "sample a (index 0)",
        "sample 1 (index 1)",
        "sample 2 (index 2)",
        "sample 3 (index 3)",
    ]


@pytest.mark.parametrize("chunk", [5, 1024 * 1024])
def test_a_syntax_error_in_the_third_record_names_its_line_and_column(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(files, "CHUNK", chunk)
    good = [{"id": i, "text": f"record {i}"} for i in range(5)]
    text = json.dumps(good, indent=2).replace('"id": 2,', '"id": 2', 1)  # record 3 loses a comma
    path = tmp_path / "broken.json"
    path.write_text(text)
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(text)
    read = list(read_records(path))
    assert [r for _, r in read[:2]] == good[:2]  # the records before the error are read
    where, error = read[-1]
    assert len(read) == 3 and isinstance(error, DataError)
    assert where == error.where == f"line {expected.value.lineno}" == "line 12"
    assert f"column {expected.value.colno}" in error.problem and "malformed JSON" in error.problem


@pytest.mark.parametrize(
    "text, line, message",
    [
        ('[{"a": 1},\n {"b": 2}\n {"c": 3}]', 3, "Expecting ',' delimiter"),
        ('[{"a": 1},\n]', 2, "Expecting value"),
        ('[\n{"a": 1}]\n\n  {"b": 2}', 4, "Extra data"),
        ('[{"a": 1},\n{"b": "no end', 2, "Unterminated string starting at"),
        ('[\n  {"a": 1}', 2, "Expecting ',' delimiter"),
    ],
)
def test_json_list_errors_match_json_loads(tmp_path, monkeypatch, text, line, message):
    monkeypatch.setattr(files, "CHUNK", 4)
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(text)
    [error] = errors_of(path)
    assert error.where == f"line {line}" == f"line {expected.value.lineno}"
    assert f"{message}, column {expected.value.colno}" in error.problem


def test_malformed_jsonl_lines_are_numbered_across_blank_lines_and_line_ends(tmp_path):
    good = json.dumps({"instruction": "q", "output": "a"})
    path = tmp_path / "data.jsonl"
    path.write_bytes(f"\n{good}\r\n\r\n   \n{{oops\n{good}\n\n{good}\r[1,\n".encode())
    read = list(read_records(path))
    assert [where for where, _ in read] == ["line 2", "line 5", "line 6", "line 8", "line 9"]
    assert [type(r) for _, r in read] == [dict, DataError, dict, dict, DataError]
    assert "malformed JSON" in read[1][1].problem and read[1][1].where == "line 5"


def test_a_json_string_holding_a_line_separator_is_one_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"text": "one\u2028two\x85three"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert records_of(path) == [{"text": "one\u2028two\x85three"}]


def test_the_kind_of_a_text_file_is_decided_from_its_first_line(tmp_path, monkeypatch):
    lists = tmp_path / "xtuner.jsonl"
    lists.write_text('[{"role": "user", "content": "q"}]\n\n[{"role": "user", "content": "r"}]\n')
    assert records_of(lists) == [[{"role": "user", "content": "q"}], [{"role": "user", "content": "r"}]]
    one_line = tmp_path / "one_line.json"
    one_line.write_text(json.dumps([{"a": i} for i in range(100)]))  # no newline at all
    assert records_of(one_line) == [{"a": i} for i in range(100)]
    monkeypatch.setattr(files, "FIRST_LINE_LIMIT", 64)  # a first line longer than the limit is a JSON list
    assert records_of(one_line) == [{"a": i} for i in range(100)]
    single = tmp_path / "single.json"
    single.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}]}, indent=2))
    [error] = errors_of(single)
    assert error.where == "whole file" and "holds one JSON object" in error.problem
    for blank in ("", "\n \n\t\n"):
        (tmp_path / "empty.jsonl").write_text(blank)
        [error] = errors_of(tmp_path / "empty.jsonl")
        assert "the file is empty" in error.problem


def test_a_file_that_is_not_utf8_is_named_with_the_byte(tmp_path, monkeypatch):
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"text": "café"}\n'.encode("latin-1"))
    [error] = errors_of(latin)
    assert error.where == "whole file" and "is not UTF-8 text (invalid continuation byte at byte 13)" in error.problem
    later = tmp_path / "later.jsonl"
    later.write_bytes(b'{"a": 1}\n\n{"b": "caf\xe9"}\n{"c": 3}\n')
    read = list(read_records(later))
    assert [where for where, _ in read] == ["line 1", "line 3"]  # one error: the rest is likely the same encoding
    assert "not UTF-8 text (invalid continuation byte at byte 20)" in read[1][1].problem
    monkeypatch.setattr(files, "CHUNK", 8)
    in_a_list = tmp_path / "list.json"
    in_a_list.write_bytes(b'[\n{"a": 1},\n{"b": "caf\xe9"}]')
    read = list(read_records(in_a_list))
    assert read[0][1] == {"a": 1} and "not UTF-8 text (invalid continuation byte at byte 22)" in read[1][1].problem


def png(colour, size=(5, 3)) -> tuple[Image.Image, bytes]:
    image = Image.new("RGB", size, colour)
    image.putpixel((1, 1), (1, 2, 3))  # not one colour, so a decoding of other pixels would show
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return image, buffer.getvalue()


def image_rows(n: int) -> tuple[list[dict], list[Image.Image]]:
    pictures = [png(colour) for colour in ("red", "green", "blue")[:n]]
    rows = [
        {
            "messages": [{"role": "user", "content": "<image>what colour?"}, {"role": "assistant", "content": "c"}],
            "images": [{"bytes": data, "path": None}],
        }
        for _, data in pictures
    ]
    return rows, [image for image, _ in pictures]


def embedded_dataset(n: int):
    import datasets

    rows, originals = image_rows(n)
    features = datasets.Features(
        {
            "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
            "images": datasets.List(datasets.Image()),
        }
    )
    return datasets.Dataset.from_list(rows, features=features), originals


def test_a_parquet_image_is_kept_as_bytes_and_loads_to_the_same_pixels(tmp_path):
    dataset, originals = embedded_dataset(3)
    dataset.to_parquet(str(tmp_path / "pictures.parquet"))
    convs = list(iter_conversations([tmp_path / "pictures.parquet"]))
    assert [c.where for c in convs] == ["row 0", "row 1", "row 2"]
    for conv, original in zip(convs, originals, strict=True):
        [ref] = conv.images
        assert isinstance(ref.source, bytes) and ref.source.startswith(b"\x89PNG")
        assert load_image(ref).tobytes() == original.tobytes()
        assert "bytes>" in repr(ref) and len(repr(ref)) < 100


def test_a_saved_datasets_folder_keeps_images_as_bytes(tmp_path):
    dataset, originals = embedded_dataset(2)
    dataset.save_to_disk(str(tmp_path / "saved"))
    convs = list(iter_conversations([tmp_path / "saved"]))
    assert [load_image(c.images[0]).tobytes() for c in convs] == [o.tobytes() for o in originals]
    assert all(isinstance(c.images[0].source, bytes) for c in convs)


def test_parquet_rows_are_read_in_batches_with_their_numbers(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setattr(files, "BATCH_ROWS", 3)
    rows = [{"instruction": f"q{i}", "output": f"a{i}", "n": i} for i in range(10)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet", row_group_size=4)
    assert list(read_records(tmp_path / "rows.parquet")) == [(f"row {i}", row) for i, row in enumerate(rows)]
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    [(where, error)] = read_records(tmp_path / "bad.parquet")
    assert where == "whole file" and "cannot be read as parquet" in error.problem


def test_csv_rows_are_read_in_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "BATCH_ROWS", 2)
    path = tmp_path / "alpaca.tsv"
    path.write_text("instruction\tinput\toutput\n" + "".join(f"q{i}\t\ta{i}\n" for i in range(5)))
    assert list(read_records(path)) == [
        (f"row {i}", {"instruction": f"q{i}", "input": None, "output": f"a{i}"}) for i in range(5)
    ]


def test_embedded_bytes_are_loaded_within_the_limits():
    _, data = png("red", size=(40, 30))
    with pytest.raises(ImageLoadError, match=rf"image embedded in the data \({len(data)} bytes\) is over the limit"):
        load_image(ImageRef(data, ""), limits=ImageLimits(max_bytes=len(data) - 1))
    with pytest.raises(ImageLoadError, match=r"embedded in the data \(\d+ bytes\) has 40x30 pixels, over the limit"):
        load_image(ImageRef(data, ""), limits=ImageLimits(max_pixels=1000))
    with pytest.raises(ImageLoadError, match=r"image embedded in the data \(8 bytes\) cannot be read"):
        load_image(ImageRef(b"\x89PNG not", ""))


def test_estimate_records_counts_cheaply(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text('{"a": 1}\n\n  \n{"a": 2}\r\n{"a": 3}')  # blank lines skipped, no newline at the end
    assert estimate_records(jsonl) == 3
    lists = tmp_path / "lists.jsonl"
    lists.write_text("[1]\n[2]\n")
    assert estimate_records(lists) == 2
    pq.write_table(pa.Table.from_pylist([{"a": i} for i in range(7)]), tmp_path / "t.parquet", row_group_size=3)
    assert estimate_records(tmp_path / "t.parquet") == 7
    dataset, _ = embedded_dataset(2)
    dataset.save_to_disk(str(tmp_path / "saved"))
    assert estimate_records(tmp_path / "saved") == 2
    (tmp_path / "list.json").write_text('[{"a": 1},\n {"a": 2}]')
    (tmp_path / "t.csv").write_text("a\n1\n")
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "bad.parquet").write_bytes(b"nope")
    assert [estimate_records(tmp_path / n) for n in ("list.json", "t.csv", "empty.jsonl", "bad.parquet")] == [
        None,
        None,
        0,
        None,
    ]


def test_estimate_records_counts_lines_across_its_read_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "CHUNK", 1)  # estimate reads 16 chunks at a time: 16 bytes, mid-line
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"text": "x" * (i % 40)}) + ("\n\n" if i % 3 else "\n") for i in range(200)))
    assert estimate_records(path) == 200 == len(records_of(path))
