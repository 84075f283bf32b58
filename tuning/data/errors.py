"""One error type for bad data, carrying where the problem is and what to do about it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataError(Exception):
    """A problem with one sample. `where` is "line N" for JSONL or "sample <id>" for JSON lists."""

    file: str
    where: str
    problem: str
    fix: str = ""
    message_index: int | None = None
    field: str | None = None

    def __str__(self) -> str:
        location = f"{self.file}, {self.where}"
        if self.message_index is not None:
            location += f", message {self.message_index}"
        if self.field:
            location += f", field '{self.field}'"
        text = f"{location}: {self.problem}"
        return f"{text}. Fix: {self.fix}" if self.fix else text


class DataErrors(Exception):
    """Every problem found in a pass over the data, raised once so the user sees them all."""

    def __init__(self, errors: list[DataError], limit: int = 50):
        self.errors = errors
        shown = "\n".join(f"  - {e}" for e in errors[:limit])
        more = f"\n  ... and {len(errors) - limit} more" if len(errors) > limit else ""
        skip = "\nFix the samples, or pass --skip_bad_samples True to drop them (they are listed in the data report)."
        super().__init__(f"{len(errors)} bad sample(s):\n{shown}{more}{skip}")
