"""The encoded-data cache: a hit encodes nothing and gives the same samples; every input of the key is a miss when it
changes; an interrupted write is never read; ranks share one encoding; pictures are never held for a whole set."""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import DATA, PYTHON, REPO
from tests.helpers import free_port, qwen_vl, run_module, small_run_args, torchrun_finetune, write_json
from tuning.data import cache
from tuning.data.args import DataArguments
from tuning.data.collate import FlatteningCollator
from tuning.data.dataset import dataset_key, encode_dataset, read_conversations
from tuning.data.encode import Encoder
from tuning.data.processing import load_processing
from tuning.families import packed_positions

FILES = [str(DATA / "example.json"), str(DATA / "example_chatml.jsonl"), str(DATA / "example_video.json")]


def prepared(model: Path, root: Path | None, files=FILES, **options):
    """(dataset, report, encoder) as a run prepares them: read, process, encode (or read the cache)."""
    args = DataArguments(data_path=list(files), **options)
    read = read_conversations(args.data_path, args.ignore_unknown_fields, root)
    encoder = args.encoder(args.processing(load_processing(str(model)), read.uses_grounding))
    dataset, report = encode_dataset(read, encoder, cache_root=root, show_progress=False)
    return dataset, report, encoder


def key(model: Path, files=FILES, **options) -> str:
    args = DataArguments(data_path=list(files), **options)
    read = read_conversations(args.data_path, args.ignore_unknown_fields)
    return dataset_key(read, args.encoder(args.processing(load_processing(str(model)), read.uses_grounding)))


def test_a_second_run_encodes_nothing_and_gives_the_same_samples(tiny_vl, tmp_path, monkeypatch):
    first, first_report, _ = prepared(tiny_vl, tmp_path)
    assert not first_report.from_cache and first_report.cache.startswith(str(tmp_path))

    def refuse(*_):
        raise AssertionError("a cached run encoded a conversation")

    monkeypatch.setattr(Encoder, "encode_parts", refuse)
    again, report, _ = prepared(tiny_vl, tmp_path)
    assert report.from_cache and report.cache == first_report.cache
    assert "read from the cache at" in report.summary() and "encoded in" in first_report.summary()
    keep = ("from_cache", "encode_seconds")
    assert {k: v for k, v in report.to_dict().items() if k not in keep} == {
        k: v for k, v in first_report.to_dict().items() if k not in keep
    }
    assert again.lengths == first.lengths and len(again) == len(first) == 9
    for i in range(len(first)):
        a, b = first.sample(i), again.sample(i)
        assert (a.id, a.input_ids, a.labels, a.images, a.videos) == (b.id, b.input_ids, b.labels, b.images, b.videos)
    # the same first loss: the same batch, pictures and videos computed from the files again
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(tiny_vl))
    collate = FlatteningCollator(positions=packed_positions(model))
    batches = [collate([d[i] for i in range(len(d))]) for d in (first, again)]
    assert batches[0]["pixel_values"].shape[0] > 0 and batches[0]["pixel_values_videos"].shape[0] > 0
    losses = [model(**batch, use_cache=False).loss.item() for batch in batches]
    assert losses[0] == losses[1]


def test_the_check_command_fills_the_cache_the_run_reads(tiny_vl, tmp_path):
    flags = ["--data_path", *FILES, "--model_name_or_path", str(tiny_vl), "--dataset_cache_dir", str(tmp_path)]
    checked = run_module("tuning.data", *flags)
    assert checked.returncode == 0, checked.stderr
    assert "9 samples encoded in" in checked.stdout
    _, report, _ = prepared(tiny_vl, tmp_path)
    assert report.from_cache


def test_each_input_of_the_key_changed_alone_is_a_miss(tiny_vl, tiny_text, tmp_path):
    base = key(tiny_vl)
    assert key(tiny_vl) == base  # loaded afresh: the same key
    template = tmp_path / "t.jinja"
    template.write_text(load_processing(str(tiny_vl)).tokenizer.chat_template + "{# house #}")
    changed = {
        "model_max_length": {"model_max_length": 1024},
        "overlong": {"overlong": "drop"},
        "image_max_pixels": {"image_max_pixels": "100*100"},  # under the tiny model's own maximum
        "image_min_pixels": {"image_min_pixels": "64*64"},
        "video_max_pixels": {"video_max_pixels": "128*128"},
        "video_fps": {"video_fps": 1.0},
        "video_maxlen": {"video_maxlen": 8},
        "grounding_format": {"grounding_format": "qwen-vl"},
        "train_on_last_turn_only": {"train_on_last_turn_only": True},
        "image_folder": {"image_folder": str(tmp_path)},
        "max_images_per_sample": {"max_images_per_sample": 4},
        "max_image_pixels": {"max_image_pixels": 10**7},
        "enable_thinking": {"enable_thinking": False},
        "ignore_unknown_fields": {"ignore_unknown_fields": True},
        "chat_template": {"chat_template": str(template)},
    }
    keys = {name: key(tiny_vl, **options) for name, options in changed.items()}
    assert all(k != base for k in keys.values()), [name for name, k in keys.items() if k == base]
    # the tokenizer: another model's, and the same model's with one token more
    model = tmp_path / "more-tokens"
    shutil.copytree(tiny_vl, model)
    loaded = load_processing(str(model))
    loaded.tokenizer.add_tokens(["<extra>"])
    loaded.processor.save_pretrained(str(model))
    assert key(model) != base
    # a data file's content: one character
    data = tmp_path / "d.jsonl"
    data.write_text((DATA / "example_chatml.jsonl").read_text())
    before = key(tiny_vl, files=[str(data)])
    data.write_text((DATA / "example_chatml.jsonl").read_text().replace("a", "b", 1))
    assert key(tiny_vl, files=[str(data)]) != before


def test_an_interrupted_write_is_never_read(tiny_vl, tmp_path, monkeypatch):
    seen = []
    encode = Encoder.encode_parts

    def stop_on_the_third(self, conv):
        seen.append(conv.id)
        if len(seen) == 3:
            raise KeyboardInterrupt
        return encode(self, conv)

    monkeypatch.setattr(Encoder, "encode_parts", stop_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        prepared(tiny_vl, tmp_path)
    assert list(tmp_path.glob(".tmp-*")) == [] and not any(p.is_dir() and len(p.name) == 32 for p in tmp_path.iterdir())
    monkeypatch.undo()
    # a process killed mid-write leaves its temporary folder: it is never read, the next run encodes
    args = DataArguments(data_path=FILES)
    read = read_conversations(FILES, False, tmp_path)
    encoder = args.encoder(args.processing(load_processing(str(tiny_vl)), read.uses_grounding))
    writer = cache.EntryWriter(tmp_path, dataset_key(read, encoder))
    writer.add(next(iter(encoder.encode_parts(next(read.conversations()))[0])))
    _, report, _ = prepared(tiny_vl, tmp_path)
    assert not report.from_cache and report.samples == 9
    # an entry whose arrays were cut short is reported and encoded again
    entry = Path(report.cache)
    (entry / "input_ids.bin").write_bytes((entry / "input_ids.bin").read_bytes()[:-4])
    _, again, _ = prepared(tiny_vl, tmp_path)
    assert not again.from_cache and again.samples == 9


def test_an_unusable_cache_folder_is_a_clear_error(tiny_vl, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    check = ["--data_path", FILES[0], "--model_name_or_path", str(tiny_vl), "--dataset_cache_dir"]
    result = run_module("tuning.data", *check, str(blocker / "cache"))
    assert result.returncode == 2
    assert f"the dataset cache folder {blocker / 'cache'} cannot be written" in result.stderr
    assert "--dataset_cache_dir none" in result.stderr
    off = run_module("tuning.data", *check, "none")  # encodes into a folder of its own, removed at exit
    assert off.returncode == 0 and "cached at" not in off.stdout and "samples read 3" in off.stdout


PEAK_SCRIPT = textwrap.dedent(
    """
    import sys
    from tuning.data.args import DataArguments
    from tuning.data.dataset import encode_dataset, read_conversations
    from tuning.data.processing import load_processing
    from tuning.runtime import peak_resident_bytes

    model, data, root = sys.argv[1:]
    args = DataArguments(data_path=[data])
    read = read_conversations(args.data_path, False, None)
    encoder = args.encoder(args.processing(load_processing(model), False))
    dataset, report = encode_dataset(read, encoder, show_progress=False)
    pixels = sum(dataset[i]["pixel_values"].numel() * 4 for i in range(len(dataset)))  # every batch, as training reads
    print(report.images, pixels, peak_resident_bytes())
    """
)


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_pictures(tiny_vl, tmp_path):
    """With the real Qwen2.5-VL pixel limits, 20 and 200 photos (1024x768 JPEGs, three sizes): the peak grows by far
    less than the 180 photos' pixel values (about 19 MB each), preparing and reading every sample once."""
    model = tmp_path / "real-like"
    shutil.copytree(tiny_vl, model)
    config = json.loads((model / "processor_config.json").read_text())
    config["image_processor"]["size"] = {"shortest_edge": 3136, "longest_edge": 12845056}
    (model / "processor_config.json").write_text(json.dumps(config))
    sizes = [(1024, 768), (1000, 750), (960, 720)]
    for i in range(200):
        Image.effect_noise(sizes[i % 3], 40 + i % 50).convert("RGB").save(tmp_path / f"p{i}.jpg", quality=80)

    def peak(count: int) -> tuple[int, int, int]:
        records = [
            {
                "id": f"s{i}",
                "image": f"p{i}.jpg",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat is it?"},
                    {"from": "gpt", "value": "noise"},
                ],
            }
            for i in range(count)
        ]
        data = write_json(tmp_path / f"d{count}.json", records)
        out = subprocess.run(
            [PYTHON, "-c", PEAK_SCRIPT, str(model), str(data), str(tmp_path)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        return tuple(map(int, out.stdout.split()[-3:]))

    (images_n, pixels_n, peak_n), (images_10n, pixels_10n, peak_10n) = peak(20), peak(200)
    assert (images_n, images_10n) == (20, 200)
    held = pixels_10n - pixels_n  # what holding the 180 more photos' pixel values would take
    assert held > 180 * 10 * 2**20
    assert peak_10n - peak_n < 180 * 2**20, (peak_n, peak_10n)  # under 1 MiB a photo
    assert peak_10n - peak_n < held / 10


def test_a_bad_sample_is_listed_once_by_the_first_rank_before_any_rank_trains(tiny_text, tmp_path):
    data = write_json(
        tmp_path / "d.json", [qwen_vl("fine", "hi", "hello"), {"id": "broken", "conversations": [{"from": "human"}]}]
    )
    out = tmp_path / "out"
    args = small_run_args(tiny_text, out, [data], "--dataset_cache_dir", str(tmp_path / "cache"))
    port = str(free_port())
    result = run_module("torch.distributed.run", "--nproc_per_node", "2", "--master_port", port, "finetune.py", *args)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert output.count("broken") == 1, output[-4000:]  # the second rank did not encode (nor list) it again
    assert "the first rank of this node says why" in output
    assert not (out / "trainer_state.json").exists()


@pytest.mark.slow
def test_two_ranks_share_one_encoding(tiny_vl, tmp_path):
    root = tmp_path / "cache"
    out = tmp_path / "out"
    args = small_run_args(tiny_vl, out, [Path(f) for f in FILES], "--dataset_cache_dir", str(root), "--max_steps", "2")
    torchrun_finetune(2, args, timeout=900)
    entries = [p for p in root.iterdir() if p.is_dir()]
    assert len(entries) == 1 and list(root.glob(".tmp-*")) == []  # one encoding, no second copy written
    report = json.loads((out / "data_report.json").read_text())
    assert report["cache"] == str(entries[0]) and not report["from_cache"] and report["samples"] == 9
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and all(e["loss"] == e["loss"] for e in state["log_history"] if "loss" in e)


def test_pixels_computed_in_dataloader_workers_train_the_same(tiny_vl, tmp_path):
    from tests.conftest import run_env

    def losses(workers: int) -> list[float]:
        out = tmp_path / f"w{workers}"
        args = small_run_args(tiny_vl, out, FILES, "--max_steps", "3", "--per_device_train_batch_size", "3")
        args += ["--dataloader_num_workers", str(workers), "--dataset_cache_dir", str(tmp_path / "cache")]
        result = subprocess.run(
            [PYTHON, "finetune.py", *args], cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, result.stderr[-3000:]
        state = json.loads((out / "trainer_state.json").read_text())
        return [e["loss"] for e in state["log_history"] if "loss" in e]

    in_workers, in_process = losses(2), losses(0)
    assert in_workers == in_process and len(in_process) == 3


def test_the_same_content_at_another_path_is_another_entry(tiny_vl, tmp_path):
    """Errors name the file and relative pictures resolve against its folder: a copy elsewhere is a miss."""
    copies = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        copies.append(str(shutil.copy(DATA / "example_chatml.jsonl", tmp_path / folder / "d.jsonl")))
    root = tmp_path / "cache"
    root.mkdir()
    _, first, _ = prepared(tiny_vl, root, files=[copies[0]])
    _, second, _ = prepared(tiny_vl, root, files=[copies[1]])
    assert not second.from_cache and second.cache != first.cache
    assert list(second.formats) == [str(copies[1])]


def test_length_grouping_reads_the_lengths_not_every_sample(tiny_vl, tmp_path, monkeypatch):
    """The stock sampler measures samples by reading them, which now computes their pixels: it gets the cache's
    lengths instead, and one step reads its batch and the next (accelerate's loader reads one ahead), not all 9."""
    from finetune import train
    from tuning.data.dataset import EncodedDataset

    read = []
    features = EncodedDataset.features
    monkeypatch.setattr(EncodedDataset, "features", lambda self, i: read.append(i) or features(self, i))
    args = small_run_args(tiny_vl, tmp_path / "out", FILES, "--max_steps", "1", "--per_device_train_batch_size", "2")
    train([*args, "--train_sampling_strategy", "group_by_length", "--dataset_cache_dir", str(tmp_path / "cache")])
    assert len(read) <= 4, read
