"""The data report: what the pipeline did with every sample (read, used, truncated, dropped, bad), with ids and
reasons, token and picture counts, length percentiles and where the samples are cached."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tuning.data.encode import Sample
from tuning.data.formats import Conversation


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
    preference: dict[str, int] = field(default_factory=dict)  # pairs, desirable and undesirable completions
    lengths: list[int] = field(default_factory=list, repr=False)
    added_tokens: list[str] = field(default_factory=list)
    cache: str = ""  # the entry the samples are read from
    from_cache: bool = False  # read from an entry an earlier run wrote, nothing encoded
    encode_seconds: float = 0.0

    def add(self, sample: Sample) -> None:
        self.samples += 1
        self.tokens += len(sample.input_ids)
        self.supervised_tokens += sample.num_supervised
        self.images += sample.num_images
        self.videos += sample.num_videos
        self.lengths.append(len(sample.input_ids))
        if sample.truncated:
            self.truncated.append(sample.id)
        if sample.preference is not None:
            side = sample.preference["side"]
            if side != "rejected":
                kind = "pairs" if side == "chosen" else ("desirable" if sample.preference["label"] else "undesirable")
                self.preference[kind] = self.preference.get(kind, 0) + 1

    def count_read(self, conv: Conversation) -> None:
        per_file = self.formats.setdefault(conv.file, {})
        per_file[conv.format] = per_file.get(conv.format, 0) + 1
        for key in set(conv.ignored_fields):
            self.ignored_fields[key] = self.ignored_fields.get(key, 0) + 1

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
            if self.samples > self.usable and not self.preference
            else ""
        )
        lines = [f"data: {', '.join(self.files)}"]
        if self.cache:
            how = "read from the cache at" if self.from_cache else f"encoded in {self.encode_seconds:.1f} s, cached at"
            lines.append(f"  {self.samples} samples {how} {self.cache}")
        lines += [
            f"  {file}: " + ", ".join(f"{name} {count}" for name, count in sorted(found.items()))
            for file, found in self.formats.items()
        ]
        lines += [
            f"  samples read {self.read}, usable {self.usable}{split}, truncated {len(self.truncated)}, "
            f"dropped {len(self.dropped)}, bad {len(self.bad)}",
            f"  tokens {self.tokens} (supervised {self.supervised_tokens}), images {self.images}, videos {self.videos}",
        ]
        if self.preference:
            lines.append("  preference: " + ", ".join(f"{kind} {count}" for kind, count in self.preference.items()))
        if self.lengths:
            lines.append("  length " + ", ".join(f"{k} {v}" for k, v in self.percentiles().items()))
        if self.ignored_fields:
            ignored = ", ".join(f"{key} ({count} samples)" for key, count in sorted(self.ignored_fields.items()))
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

    @classmethod
    def from_dict(cls, data: dict, lengths: list[int]) -> DataReport:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "lengths"}
        return cls(**known, lengths=lengths)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
