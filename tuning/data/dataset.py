"""Datasets over the encoded-data cache, and the report of what happened to every sample.

Reading streams the files twice: once to count and check the records (and to learn whether the data uses grounding,
which the processing step needs), once to encode them into a cache entry (tuning.data.cache). Neither pass keeps the
conversations, and neither runs again while the files, the tokenizer and the options stay the same. Pixel values are
computed per batch, from each sample's pictures, when the DataLoader reads it.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch.utils.data import Dataset
from tqdm.auto import tqdm

from tuning.data import cache
from tuning.data.encode import Encoder, Sample
from tuning.data.errors import DataError, DataErrors
from tuning.data.files import estimate_records
from tuning.data.formats import Conversation, iter_conversations
from tuning.data.grounding import uses_grounding
from tuning.data.report import DataReport

__all__ = [
    "DataReport",
    "EncodedDataset",
    "PreferencePairs",
    "ReadData",
    "UnpairedExamples",
    "build_dataset",
    "encode_dataset",
    "read_conversations",
]

logger = logging.getLogger(__name__)


def sample_to_features(sample: Sample, pixels: dict | None = None) -> dict:
    """What the collators take: token lists, and the media features (with pixel values where computed)."""
    features = {"input_ids": sample.input_ids, "labels": sample.labels, **(sample.media if pixels is None else pixels)}
    if sample.mm_token_type_ids is not None:
        features["mm_token_type_ids"] = sample.mm_token_type_ids
    return features


class EncodedDataset(Dataset):
    """The samples of a cache entry, memory-mapped: a sample's tokens are read when it is, and its pixel values
    computed then (in the DataLoader's workers, where there are any) by the encoder's processor."""

    def __init__(self, entry: cache.Entry, encoder: Encoder):
        self.entry, self.encoder = entry, encoder
        self._lengths: list[int] | None = None

    def __len__(self) -> int:
        return self.entry.num_samples

    @property
    def lengths(self) -> list[int]:
        if self._lengths is None:
            self._lengths = self.entry.lengths().tolist()
        return self._lengths

    def sample(self, index: int) -> Sample:
        """The sample as encoded (no pixel values: `features` computes them)."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        sample = self.entry.sample(index)
        if sample.images or sample.videos:
            sample.mm_token_type_ids = self.encoder.token_types(sample.input_ids)
        return sample

    @property
    def samples(self) -> Sequence[Sample]:
        """Every sample, read on access (for inspection and tests)."""
        return _Samples(self)

    def features(self, index: int) -> dict:
        return self.features_of(self.sample(index))

    def features_of(self, sample: Sample) -> dict:
        """A sample's features, its pixel values computed now."""
        return sample_to_features(sample, self.pixels_of(sample))

    def pixels_of(self, sample: Sample, same_as: dict | None = None) -> dict:
        """A sample's media features, its pixel values computed now (or `same_as`'s: Encoder.pixels)."""
        try:
            return self.encoder.pixels(sample, same_as)
        except DataError as e:
            # It passed validation before training, so a picture changed or went since: stop loudly.
            raise RuntimeError(f"sample {sample.id} failed when its pictures were read for training: {e}") from e

    def __getitem__(self, index: int) -> dict:
        return self.features(index)

    def __getitems__(self, indices: list[int]) -> list[dict]:
        return [self.features(i) for i in indices]


class PreferencePairs(Dataset):
    """Pairs of an encoded preference set (tuning.data.encode writes each pair as its chosen, then its rejected
    sample): item i is {"chosen": features, "rejected": features, "margin"} and, once computed
    (`reference_log_probs`), the reference model's log-probabilities of both answers."""

    def __init__(self, samples: EncodedDataset):
        self.samples = samples
        self.reference_log_probs = None  # (pairs, 2) float array: chosen, rejected; set by the preference trainer
        if len(samples) % 2:
            raise ValueError(f"{len(samples)} samples cannot be pairs: the cache entry is not of preference pairs")

    def __len__(self) -> int:
        return len(self.samples) // 2

    @property
    def lengths(self) -> list[int]:
        """Both answers' tokens of each pair: the two sequences train in the same batch."""
        lengths = self.samples.lengths
        return [a + b for a, b in zip(lengths[::2], lengths[1::2], strict=True)]

    def __getitem__(self, index: int) -> dict:
        chosen, rejected = self.samples.sample(2 * index), self.samples.sample(2 * index + 1)
        sides = (chosen.preference or {}).get("side"), (rejected.preference or {}).get("side")
        if sides != ("chosen", "rejected"):
            raise ValueError(f"samples {2 * index} and {2 * index + 1} are {sides}, not a chosen and a rejected answer")
        # both answers follow the same pictures (not ms-swift's rejected_images): computed once, and the tower may
        # see them once (tuning.preference.shared_pictures)
        same = chosen.images == rejected.images and chosen.videos == rejected.videos
        pixels = self.samples.pixels_of(chosen)
        item = {
            "chosen": sample_to_features(chosen, pixels),
            "rejected": sample_to_features(rejected, self.samples.pixels_of(rejected, pixels if same else None)),
            "margin": float(chosen.preference.get("margin", 0.0)),
            "same_pictures": same and bool(chosen.images) and not chosen.videos,
            "pictures": len(chosen.images),
        }
        if self.reference_log_probs is not None:
            item["reference"] = tuple(float(v) for v in self.reference_log_probs[index])
        return item

    def __getitems__(self, indices: list[int]) -> list[dict]:
        return [self[i] for i in indices]


class UnpairedExamples(Dataset):
    """Completions with a desirable label (KTO), from an encoded preference set: unpaired records with their label,
    and each pair's chosen answer (desirable) and rejected answer (not). Item i is {"completion": features,
    "label": bool}."""

    def __init__(self, samples: EncodedDataset):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def lengths(self) -> list[int]:
        return self.samples.lengths

    def __getitem__(self, index: int) -> dict:
        sample = self.samples.sample(index)
        preference = sample.preference or {}
        label = preference.get("label", preference.get("side") == "chosen")
        return {"completion": self.samples.features_of(sample), "label": bool(label)}

    def __getitems__(self, indices: list[int]) -> list[dict]:
        return [self[i] for i in indices]


class _Samples(Sequence):
    def __init__(self, dataset: EncodedDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self.dataset.sample(i) for i in range(*index.indices(len(self)))]
        return self.dataset.sample(index if index >= 0 else len(self) + index)


@dataclass
class ReadData:
    """Data files counted and checked: the report of what was read, the records that could not be read (reported
    with the encoding errors), whether any sample uses grounding. `conversations()` reads the files again."""

    report: DataReport
    errors: list[DataError]
    paths: list[str]
    ignore_unknown_fields: bool = False
    uses_grounding: bool = False
    fingerprints: list[str] = field(default_factory=list)
    stage: str = "sft"  # which records train (tuning.data.formats.parse_record)

    def conversations(self) -> Iterator[Conversation]:
        found = iter_conversations(self.paths, self.ignore_unknown_fields, self.stage)
        return (c for c in found if isinstance(c, Conversation))

    @property
    def usable_records(self) -> int:
        return self.report.read - len(self.errors)

    def key(self) -> dict:
        return {"files": self.fingerprints, "ignore_unknown_fields": self.ignore_unknown_fields, "stage": self.stage}


def read_conversations(
    paths: Iterable[str],
    ignore_unknown_fields: bool = False,
    cache_root: Path | None = None,
    wait: bool = False,
    show_progress: bool = False,
    stage: str = "sft",
) -> ReadData:
    """Count and check every record of the files, streaming them; where `cache_root` holds the count of these very
    files, it is read instead. `stage` says which records train (sft: supervised ones; dpo, kto, rm: preference
    ones). Raises FileNotFoundError for a missing file."""
    paths = [str(p) for p in paths]
    for path in paths:
        if not Path(path).exists():
            raise FileNotFoundError(f"data file not found: {path}. Check --data_path.")
    # the path is in the key too: errors name it, and relative picture paths resolve against its folder
    fingerprints = [f"{Path(p).resolve()}:{cache.file_fingerprint(p)}" for p in paths]
    key = "scan-" + cache.key_of(
        {"files": fingerprints, "ignore": ignore_unknown_fields, "stage": stage, "code": cache.code_fingerprint()}
    )

    def scanned() -> ReadData:
        read = _scan(paths, ignore_unknown_fields, show_progress, stage)
        read.fingerprints = fingerprints
        if cache_root is not None:
            _save_scan(cache_root / f"{key}.json", read)
        return read

    if cache_root is None:
        return scanned()
    return cache.shared(cache_root, key, lambda: _load_scan(cache_root / f"{key}.json", paths), scanned, wait)


def _scan(paths: list[str], ignore_unknown_fields: bool, show_progress: bool, stage: str) -> ReadData:
    read = ReadData(DataReport(files=paths), [], paths, ignore_unknown_fields, stage=stage)
    counts = [estimate_records(p) for p in paths] if show_progress else []
    total = sum(counts) if counts and None not in counts else None
    items = iter_conversations(paths, ignore_unknown_fields, stage)
    for item in tqdm(items, total=total, desc="reading", unit=" records", delay=2, disable=not show_progress):
        read.report.read += 1
        if isinstance(item, DataError):
            read.errors.append(item)
            continue
        read.report.count_read(item)
        read.uses_grounding = read.uses_grounding or uses_grounding([item])
    return read


def _save_scan(path: Path, read: ReadData) -> None:
    data = {
        "report": read.report.to_dict(),
        "errors": [asdict(e) for e in read.errors],
        "uses_grounding": read.uses_grounding,
        "fingerprints": read.fingerprints,
        "ignore_unknown_fields": read.ignore_unknown_fields,
        "stage": read.stage,
    }
    partial = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    partial.write_text(json.dumps(data), encoding="utf-8")
    partial.replace(path)  # whole or absent: a reader never sees half of it


def _load_scan(path: Path, paths: list[str]) -> ReadData | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    report = DataReport.from_dict(data["report"], [])
    report.files = paths
    errors = [DataError(**e) for e in data["errors"]]
    ignore, grounding, fingerprints = data["ignore_unknown_fields"], data["uses_grounding"], data["fingerprints"]
    return ReadData(report, errors, paths, ignore, grounding, fingerprints, data["stage"])


_worker_encoder: Encoder | None = None


def _set_worker_encoder(encoder: Encoder) -> None:
    global _worker_encoder  # one encoder per worker process, set once by the pool's initializer
    _worker_encoder = encoder


def _encode(conv: Conversation, encoder: Encoder | None = None) -> tuple[str, object]:
    """("ok", ([Sample], [(id, reason) dropped])) | ("bad", DataError fields): plain values cross processes."""
    try:
        samples, dropped = (encoder or _worker_encoder).encode_parts(conv)
    except DataError as e:
        return "bad", asdict(e)
    return "ok", (samples, [(d.sample_id, d.reason) for d in dropped])


IN_PROCESS_FIRST = 512  # conversations encoded in-process first, to time them
POOL_WORTH_S = 10.0  # the rest goes to worker processes where it would take longer than this in-process: starting
# them costs 3-5 s (each imports transformers and takes the encoder)
WINDOW = 4096  # conversations handed to the pool at a time (Pool.imap would read the whole iterable at once)


def _encode_all(conversations: Iterator[Conversation], encoder: Encoder, workers: int, remaining: int):
    """(outcome, value) for every conversation, in order: the first ones here, the rest across `workers` processes
    where they would take long enough to repay starting the processes."""
    started = time.perf_counter()
    first = list(itertools.islice(conversations, IN_PROCESS_FIRST))
    yield from (_encode(conv, encoder) for conv in first)
    seconds_left = (time.perf_counter() - started) / max(1, len(first)) * (remaining - len(first))
    if workers <= 1 or seconds_left < POOL_WORTH_S:
        yield from (_encode(conv, encoder) for conv in conversations)
        return
    import multiprocessing

    # spawn, not fork: a forked child inherits torch's thread pools mid-state and can hang in the image processor
    context = multiprocessing.get_context("spawn")
    with _main_script_hidden():
        pool = context.Pool(workers, initializer=_set_worker_encoder, initargs=(encoder,))
    with pool:
        while window := list(itertools.islice(conversations, WINDOW)):
            yield from pool.imap(_encode, window, chunksize=16)


@contextlib.contextmanager
def _main_script_hidden():
    """A spawned worker runs the parent's main script's imports again before its task (finetune.py's: the model,
    trainer and PEFT code, measured 4 s and 330 MiB more a worker); the encoder needs none of them, so the
    workers start without it, as from an interactive session."""
    main = sys.modules["__main__"]
    script = main.__dict__.pop("__file__", None) if getattr(main, "__spec__", None) is None else None
    try:
        yield
    finally:
        if script is not None:
            main.__file__ = script


def default_workers() -> int:
    """The cores this process may run on (the other ranks of a node wait while its first rank encodes)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def dataset_key(read: ReadData, encoder: Encoder) -> str:
    return cache.key_of({"data": read.key(), "encoder": encoder.fingerprint(), "code": cache.code_fingerprint()})


def encode_dataset(
    read: ReadData,
    encoder: Encoder,
    *,
    cache_root: Path | None = None,
    skip_bad_samples: bool = False,
    show_progress: bool = True,
    workers: int | None = 1,
    wait: bool = False,
) -> tuple[EncodedDataset, DataReport]:
    """Validate and encode every conversation read into a cache entry, or read the entry an earlier run wrote for the
    same files, tokenizer, processor and options. Raises DataErrors listing every bad sample (those that could not be
    read too), unless skipping them. `wait`: another rank of this node encodes; wait for its entry."""
    root = cache_root or Path(tempfile.mkdtemp(dir=_temporary_root()))  # no cache: this call's own folder
    key = dataset_key(read, encoder)

    written = []

    def made() -> cache.Entry:
        written.append(key)
        return _write_entry(read, encoder, root, key, skip_bad_samples, show_progress, workers or default_workers())

    entry = cache.shared(root, key, lambda: cache.find(root, key), made, wait)
    report = _report_of(entry, read, from_cache=not written)
    if cache_root is None:
        report.cache = ""  # a temporary folder, gone at exit: nothing to tell
    errors = [DataError(**e) for e in entry.manifest["errors"]]
    if errors and not skip_bad_samples:  # an entry written under --skip_bad_samples, read without it
        raise DataErrors(errors)
    return EncodedDataset(entry, encoder), report


def _report_of(entry: cache.Entry, read: ReadData, from_cache: bool) -> DataReport:
    report = DataReport.from_dict(entry.manifest["report"], entry.lengths().tolist())
    report.files = read.report.files
    report.cache, report.from_cache = str(entry.folder), from_cache
    return report


def _write_entry(read: ReadData, encoder, root, key, skip_bad_samples, show_progress, workers) -> cache.Entry:
    started = time.perf_counter()
    report = DataReport(**{k: v for k, v in asdict(read.report).items() if k in ("files", "read", "formats")})
    report.ignored_fields = dict(read.report.ignored_fields)
    errors = list(read.errors)
    writer = cache.EntryWriter(root, key)
    try:
        outcomes = _encode_all(read.conversations(), encoder, workers, read.usable_records)
        bar = tqdm(
            outcomes, total=read.usable_records, desc="encoding", unit=" samples", delay=2, disable=not show_progress
        )
        for outcome, value in bar:
            if outcome == "bad":
                errors.append(DataError(**value))
                continue
            kept, dropped = value
            report.dropped += [{"id": sample_id, "reason": reason} for sample_id, reason in dropped]
            report.usable += bool(kept)
            for sample in kept:
                report.add(sample)
                writer.add(sample)
        if errors and not skip_bad_samples:
            raise DataErrors(errors)
        report.bad = [str(e) for e in errors]
        if not report.samples:
            reasons = [DataError(", ".join(report.files), f"sample {d['id']}", d["reason"]) for d in report.dropped]
            raise DataErrors(
                errors + reasons or [DataError(", ".join(report.files), "all samples", "no usable sample")]
            )
    except BaseException:
        writer.abandon()
        raise
    report.encode_seconds = time.perf_counter() - started
    manifest = {"report": report.to_dict(), "errors": [asdict(e) for e in errors]}
    return cache.Entry(writer.commit(manifest))


_temporary: Path | None = None


def _temporary_root() -> Path:
    """Where entries go under --dataset_cache_dir none: a folder of this process, removed when it exits."""
    global _temporary
    if _temporary is None:
        _temporary = Path(tempfile.mkdtemp(prefix="qwen-tuning-data-"))
        atexit.register(shutil.rmtree, _temporary, ignore_errors=True)
    return _temporary


def build_dataset(
    paths: list[str],
    encoder: Encoder,
    *,
    skip_bad_samples: bool = False,
    show_progress: bool = True,
    workers: int = 1,
    ignore_unknown_fields: bool = False,
    cache_root: Path | None = None,
    stage: str = "sft",
) -> tuple[EncodedDataset, DataReport]:
    """Read, validate and encode every sample of the files (read_conversations, then encode_dataset)."""
    read = read_conversations(paths, ignore_unknown_fields, cache_root, stage=stage)
    return encode_dataset(
        read,
        encoder,
        cache_root=cache_root,
        skip_bad_samples=skip_bad_samples,
        show_progress=show_progress,
        workers=workers,
    )
