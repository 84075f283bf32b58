"""Eager and lazy datasets of encoded samples, and the report of what happened to every sample."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch.utils.data import Dataset
from tqdm.auto import tqdm

from tuning.data.encode import DroppedSample, Encoder, Sample
from tuning.data.errors import DataError, DataErrors
from tuning.data.formats import Conversation, iter_conversations


@dataclass
class DataReport:
    """What the pipeline did with every sample: read, used, truncated, dropped, skipped as bad."""

    files: list[str]
    read: int = 0
    usable: int = 0  # conversations that gave at least one training sample
    samples: int = 0  # training samples: more than `usable` where a template rewrites history
    truncated: list[str] = field(default_factory=list)
    dropped: list[dict] = field(default_factory=list)  # {"id", "reason"}
    bad: list[str] = field(default_factory=list)  # messages of samples skipped by --skip_bad_samples
    tokens: int = 0
    supervised_tokens: int = 0
    images: int = 0
    videos: int = 0
    formats: dict[str, dict[str, int]] = field(default_factory=dict)  # file -> detected format -> records
    ignored_fields: dict[str, int] = field(default_factory=dict)  # --ignore_unknown_fields: key -> samples
    lengths: list[int] = field(default_factory=list, repr=False)
    added_tokens: list[str] = field(default_factory=list)

    def add(self, sample: Sample) -> None:
        self.samples += 1
        self.tokens += len(sample.input_ids)
        self.supervised_tokens += sample.num_supervised
        self.images += sample.num_images
        self.videos += sample.num_videos
        self.lengths.append(len(sample.input_ids))
        if sample.truncated:
            self.truncated.append(sample.id)

    def count_read(self, conversations: list[Conversation]) -> None:
        for conv in conversations:
            per_file = self.formats.setdefault(conv.file, {})
            per_file[conv.format] = per_file.get(conv.format, 0) + 1
        ignored = Counter(key for conv in conversations for key in set(conv.ignored_fields))
        self.ignored_fields = dict(sorted(ignored.items()))

    def percentiles(self) -> dict[str, int]:
        if not self.lengths:
            return {}
        ordered = sorted(self.lengths)
        pick = {p: ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))] for p in (50, 90, 99)}
        return {"min": ordered[0], "p50": pick[50], "p90": pick[90], "p99": pick[99], "max": ordered[-1]}

    def summary(self) -> str:
        split = (
            f" -> {self.samples} training samples (the chat template rewrites earlier turns, so some "
            "conversations train in several samples)"
            if self.samples > self.usable
            else ""
        )
        lines = [f"data: {', '.join(self.files)}"]
        lines += [
            f"  {file}: " + ", ".join(f"{name} {count}" for name, count in sorted(found.items()))
            for file, found in self.formats.items()
        ]
        lines += [
            f"  samples read {self.read}, usable {self.usable}{split}, truncated {len(self.truncated)}, "
            f"dropped {len(self.dropped)}, bad {len(self.bad)}",
            f"  tokens {self.tokens} (supervised {self.supervised_tokens}), images {self.images}, videos {self.videos}",
        ]
        if self.lengths:
            lines.append("  length " + ", ".join(f"{k} {v}" for k, v in self.percentiles().items()))
        if self.ignored_fields:
            ignored = ", ".join(f"{key} ({count} samples)" for key, count in self.ignored_fields.items())
            lines.append(f"  ignored fields (--ignore_unknown_fields): {ignored}")
        lines += [f"  truncated: {sample_id}" for sample_id in self.truncated]
        lines += [f"  dropped: {d['id']}: {d['reason']}" for d in self.dropped]
        lines += [f"  bad (skipped): {message}" for message in self.bad]
        if self.added_tokens:
            lines.append(f"  added tokens for grounding: {' '.join(self.added_tokens)}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("lengths")
        data["length_percentiles"] = self.percentiles()
        return data

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def sample_to_features(sample: Sample) -> dict:
    features = {"input_ids": sample.input_ids, "labels": sample.labels, **sample.media}
    if sample.mm_token_type_ids is not None:
        features["mm_token_type_ids"] = sample.mm_token_type_ids
    return features


class EagerDataset(Dataset):
    """Every sample encoded up front: fastest to train from, memory grows with the data."""

    def __init__(self, samples: list[Sample]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        return sample_to_features(self.samples[index])

    @property
    def lengths(self) -> list[int]:
        return [len(s.input_ids) for s in self.samples]


class LazyDataset(Dataset):
    """Samples encoded on access and not kept; validated in full before training all the same.

    `entries` holds (conversation, which of its samples) for every training sample, in order. A conversation that
    trains in several samples (a template that rewrites history) is encoded once for all of its samples that are read
    together: in one batch (`__getitems__`, which the DataLoader calls with a batch's indices), or one after another
    (the last conversation's samples are kept until another one is read)."""

    def __init__(self, entries: list[tuple[Conversation, int]], encoder: Encoder, lengths: list[int]):
        self.entries = entries
        self.encoder = encoder
        self._lengths = lengths
        self._last: tuple[Conversation, list[Sample]] | None = None

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        features, batch = [], {}  # id(conversation) -> its samples, for this batch
        for index in indices:
            conv, part = self.entries[index]
            try:
                if id(conv) not in batch:
                    batch[id(conv)] = self._samples_of(conv)
                features.append(sample_to_features(batch[id(conv)][part]))
            except (DataError, DroppedSample, IndexError) as e:
                # It passed validation before training, so its file or image changed since: stop loudly.
                raise RuntimeError(
                    f"sample {conv.id} ({conv.origin}) failed on access after passing validation: {e}"
                ) from e
        return features

    def _samples_of(self, conv: Conversation) -> list[Sample]:
        if self._last is None or self._last[0] is not conv:
            self._last = (conv, self.encoder.encode(conv))
        return self._last[1]

    @property
    def lengths(self) -> list[int]:
        return self._lengths


@dataclass
class ReadData:
    """The conversations of some files, read and checked, before any is encoded; the records that could not be
    read are kept as errors, to be reported with the encoding errors."""

    report: DataReport
    conversations: list[Conversation]
    errors: list[DataError]


def read_conversations(paths: Iterable[str], ignore_unknown_fields: bool = False) -> ReadData:
    read = ReadData(DataReport(files=[str(p) for p in paths]), [], [])
    for item in iter_conversations(paths, ignore_unknown_fields):
        read.report.read += 1
        (read.errors if isinstance(item, DataError) else read.conversations).append(item)
    read.report.count_read(read.conversations)
    return read


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


def _encode_all(conversations: list[Conversation], encoder: Encoder, workers: int, show_progress: bool):
    if workers <= 1:
        results = (_encode(conv, encoder) for conv in conversations)
        yield from tqdm(results, total=len(conversations), desc="encoding", disable=not show_progress, leave=False)
        return
    import multiprocessing

    # spawn, not fork: a forked child inherits torch's thread pools mid-state and can hang in the image processor
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_set_worker_encoder, initargs=(encoder,)) as pool:
        results = pool.imap(_encode, conversations, chunksize=16)
        yield from tqdm(results, total=len(conversations), desc="encoding", disable=not show_progress, leave=False)


def encode_dataset(
    read: ReadData,
    encoder: Encoder,
    *,
    lazy: bool = False,
    skip_bad_samples: bool = False,
    show_progress: bool = True,
    workers: int = 1,
) -> tuple[Dataset, DataReport]:
    """Validate and encode every conversation read. Raises DataErrors listing every bad sample (those that could not
    be read too), unless skipping them."""
    report, conversations, errors = read.report, read.conversations, list(read.errors)
    entries, samples = [], []
    for conv, (outcome, value) in zip(
        conversations, _encode_all(conversations, encoder, workers, show_progress), strict=True
    ):
        if outcome == "bad":
            errors.append(DataError(**value))
            continue
        kept, dropped = value
        report.dropped += [{"id": sample_id, "reason": reason} for sample_id, reason in dropped]
        report.usable += bool(kept)
        for part, sample in enumerate(kept):
            report.add(sample)
            entries.append((conv, part))
            if not lazy:
                samples.append(sample)
    if errors and not skip_bad_samples:
        raise DataErrors(errors)
    report.bad = [str(e) for e in errors]
    if not entries:
        reasons = [DataError(", ".join(report.files), f"sample {d['id']}", d["reason"]) for d in report.dropped]
        raise DataErrors(errors + reasons or [DataError(", ".join(report.files), "all samples", "no usable sample")])
    dataset = LazyDataset(entries, encoder, report.lengths[:]) if lazy else EagerDataset(samples)
    return dataset, report


def build_dataset(
    paths: list[str],
    encoder: Encoder,
    *,
    lazy: bool = False,
    skip_bad_samples: bool = False,
    show_progress: bool = True,
    workers: int = 1,
    ignore_unknown_fields: bool = False,
) -> tuple[Dataset, DataReport]:
    """Read, validate and encode every sample of the files (read_conversations, then encode_dataset)."""
    read = read_conversations(paths, ignore_unknown_fields)
    return encode_dataset(
        read, encoder, lazy=lazy, skip_bad_samples=skip_bad_samples, show_progress=show_progress, workers=workers
    )
