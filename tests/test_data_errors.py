"""Bad input: every problem is reported with file, place and field, all at once; nothing is lost silently."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import DATA, PYTHON, REPO, run_env
from tests.helpers import encoder_for, picture, qwen_vl, write_json, write_jsonl
from tuning.data.dataset import build_dataset
from tuning.data.errors import DataErrors

BAD_CASES = {
    "unknown role": (
        {"id": "r", "conversations": [{"from": "robot", "value": "x"}, {"from": "assistant", "value": "y"}]},
        "unknown role 'robot'",
        "from",
    ),
    "empty content": (qwen_vl("e", "  ", "y"), "user message is empty", "content"),
    "missing content": (
        {"id": "m", "messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]},
        "'content' must be a string or a list",
        "content",
    ),
    "no assistant": (qwen_vl("n", "only a question"), "no assistant turn", None),
    "missing image": (qwen_vl("i", "Picture 1: <img>nowhere.png</img>\nq", "a"), "not found", "content"),
    "unclosed img": (qwen_vl("u", "Picture 1: <img>p.png\nq", "a"), "not closed", "value"),
    "box out of range": (
        qwen_vl("b", "Picture 1: <img>p.png</img>\nq", "<ref>x</ref><box>(0,0),(1000,5)</box>"),
        "outside [0,1000)",
        "content",
    ),
    "image in answer": (
        {
            "id": "ia",
            "conversations": [{"from": "user", "value": "q"}, {"from": "assistant", "value": "<img>p.png</img>"}],
        },
        "image in the assistant turn",
        "content",
    ),
    "corrupt image": (qwen_vl("c", "Picture 1: <img>corrupt.png</img>\nq", "a"), "cannot be read", "content"),
    "truncated image": (qwen_vl("t", "Picture 1: <img>truncated.png</img>\nq", "a"), "cannot be read", "content"),
    "too many images": (
        qwen_vl("many", "".join("<img>p.png</img>" for _ in range(3)) + "q", "a"),
        "3 images and videos, more than the 2 allowed",
        "content",
    ),
}


@pytest.fixture
def bad_folder(tmp_path):
    picture(tmp_path / "p.png", size=(200, 200))
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG not really")
    whole = (tmp_path / "p.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(whole[: len(whole) // 2])
    return tmp_path


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_each_bad_input_names_file_sample_and_field(vl_processing, bad_folder, case):
    record, message, field = BAD_CASES[case]
    path = write_json(bad_folder / "bad.json", [qwen_vl("good", "hi", "hello"), record])
    with pytest.raises(DataErrors) as caught:
        build_dataset([str(path)], encoder_for(vl_processing, max_images=2), show_progress=False)
    [error] = caught.value.errors
    assert message in str(error)
    assert error.file == str(path) and f"sample {record['id']}" in error.where
    assert error.field == field
    assert "--skip_bad_samples" in str(caught.value)


def test_all_problems_are_listed_at_once_and_skipping_reports_them(vl_processing, bad_folder):
    records = [qwen_vl("good", "hi", "hello")] + [BAD_CASES[c][0] for c in sorted(BAD_CASES)]
    path = write_json(bad_folder / "bad.json", records)
    encoder = encoder_for(vl_processing, max_images=2)
    with pytest.raises(DataErrors) as caught:
        build_dataset([str(path)], encoder, show_progress=False)
    assert len(caught.value.errors) == len(BAD_CASES)
    dataset, report = build_dataset([str(path)], encoder, skip_bad_samples=True, show_progress=False)
    assert len(dataset) == report.usable == 1
    assert report.read == len(records) and len(report.bad) == len(BAD_CASES)
    assert all(any(f"sample {r['id']}" in b for b in report.bad) for r in records[1:])


def test_malformed_jsonl_line_is_named(vl_processing, tmp_path):
    good = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    path = write_jsonl(tmp_path / "d.jsonl", [good, '{"messages": [', good])
    with pytest.raises(DataErrors) as caught:
        build_dataset([str(path)], encoder_for(vl_processing), show_progress=False)
    [error] = caught.value.errors
    assert error.where == "line 2" and "malformed JSON" in str(error)


def test_malformed_json_file_and_empty_file(vl_processing, tmp_path):
    (tmp_path / "broken.json").write_text('[{"id": 1,]')
    with pytest.raises(DataErrors, match="malformed JSON"):
        build_dataset([str(tmp_path / "broken.json")], encoder_for(vl_processing), show_progress=False)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataErrors, match="empty"):
        build_dataset([str(tmp_path / "empty.jsonl")], encoder_for(vl_processing), show_progress=False)


def test_mixed_formats_and_a_parquet_dataset(vl_processing, tmp_path):
    import datasets

    rows = [json.loads(line) for line in (DATA / "example_chatml.jsonl").read_text().splitlines()]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "chatml.parquet"))
    files = [
        str(DATA / "example.json"),
        str(DATA / "example_openai.jsonl"),
        str(tmp_path / "chatml.parquet"),
        str(DATA / "example_pretrain.jsonl"),
    ]
    dataset, report = build_dataset(files, encoder_for(vl_processing), show_progress=False)
    assert report.read == report.usable == len(dataset) == 3 + 2 + 3 + 3
    assert report.images == 5


def test_a_sample_whose_picture_changes_after_encoding_stops_with_its_id(vl_processing, tmp_path):
    """Pictures are read again for every batch: one that went bad since it was checked stops the run, named."""
    picture(tmp_path / "p.png")
    data = write_json(tmp_path / "d.json", [qwen_vl("s1", "Picture 1: <img>p.png</img>\nColour?", "Red.")])
    dataset, _ = build_dataset([str(data)], encoder_for(vl_processing), show_progress=False)
    assert dataset[0]["pixel_values"].shape[0] == int(dataset[0]["image_grid_thw"].prod())
    picture(tmp_path / "p.png", size=(200, 150))
    with pytest.raises(RuntimeError, match=r"sample s1 failed when its pictures were read.*d.json.*changed size"):
        dataset[0]
    (tmp_path / "p.png").write_bytes(b"gone bad")
    with pytest.raises(RuntimeError, match=r"sample s1 failed when its pictures were read.*cannot be read"):
        dataset[0]


def check_command(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "tuning.data", *args], cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_check_command_shows_dumps_and_exits_by_outcome(tiny_vl, tmp_path, bad_folder):
    dump = tmp_path / "dump.jsonl"
    ok = check_command(
        "--data_path", "data/example.json", "--model_name_or_path", str(tiny_vl), "--show", "3", "--dump", str(dump)
    )
    assert ok.returncode == 0, ok.stderr
    assert "samples read 3, usable 3" in ok.stdout and "[[我是Qwen-VL" in ok.stdout
    assert ok.stdout.count("--- identity_") == 3 and "<|image_pad|>x" in ok.stdout
    lines = [json.loads(line) for line in dump.read_text().splitlines()]
    assert [line["id"] for line in lines] == ["identity_0", "identity_1", "identity_2"]
    assert [line["num_images"] for line in lines] == [0, 1, 2]

    bad = write_json(bad_folder / "bad.json", [qwen_vl("good", "hi", "hello"), BAD_CASES["missing image"][0]])
    failed = check_command("--data_path", str(bad), "--model_name_or_path", str(tiny_vl))
    assert failed.returncode == 1 and "sample i" in failed.stdout and "not found" in failed.stdout

    assert check_command("--model_name_or_path", str(tiny_vl), "--show", "x").returncode == 2
    assert check_command("--data_path", str(bad), "--model_name_or_path", str(tmp_path / "nope")).returncode == 2


def test_worker_processes_encode_the_same_and_report_the_same(vl_processing, bad_folder, monkeypatch):
    from tuning.data import dataset

    monkeypatch.setattr(dataset, "IN_PROCESS_FIRST", 3)  # the pool starts after 3 conversations, not 512,
    monkeypatch.setattr(dataset, "POOL_WORTH_S", 0.0)  # however quick the rest would be in-process
    pools = []
    hidden = dataset._main_script_hidden
    monkeypatch.setattr(dataset, "_main_script_hidden", lambda: pools.append(1) or hidden())
    records = [qwen_vl("good", "hi", "hello")] + [BAD_CASES[c][0] for c in sorted(BAD_CASES)]
    files = [str(write_json(bad_folder / "bad.json", records)), str(DATA / "example.json")]
    encoder = encoder_for(vl_processing, max_images=2)
    one, one_report = build_dataset(files, encoder, skip_bad_samples=True, show_progress=False)
    two, two_report = build_dataset(files, encoder, skip_bad_samples=True, show_progress=False, workers=2)
    timing = ("encode_seconds", "cache")
    assert {k: v for k, v in one_report.to_dict().items() if k not in timing} == {
        k: v for k, v in two_report.to_dict().items() if k not in timing
    }
    assert [s.input_ids for s in one.samples] == [s.input_ids for s in two.samples]
    assert pools == [1]  # the second encoding did go through worker processes
