"""Encoded samples written once and memory-mapped, keyed by everything that shapes them.

An entry is a folder of flat arrays (numpy memory maps: token ids, a supervised mask, sample offsets) and two blob
columns (sample ids; each sample's pictures, videos and grid sizes as JSON), with the data report and a manifest.
Numpy rather than Arrow: a sample is two slices of two arrays, read without a conversion per row, and the ranks of
a node map the same pages. The key is a hash of the content of every data file, the tokenizer and processor as
the run changed them, every encoding option, and the toolkit's own data code, so a changed input is a miss and
never a stale hit. An entry is written into a temporary folder and renamed when complete: a folder that exists
under its key was written to the end.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import os
import shutil
import time
import uuid
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import xxhash

from tuning.data.conversation import ImageRef, VideoRef
from tuning.data.encode import Sample

logger = logging.getLogger(__name__)
T = TypeVar("T")

FORMAT = 1  # the layout of an entry; the code's own hash (code_fingerprint) covers what goes into it
OFF = "none"
_CHUNK = 8 * 1024 * 1024


class CacheError(OSError):
    """The cache folder cannot be used; the message names it and the fix."""


def default_root() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "qwen-tuning" / "datasets"


def cache_root(option: str | None) -> Path | None:
    """The folder of --dataset_cache_dir: the default when not given, None when 'none'."""
    if option is not None and option.strip().lower() == OFF:
        return None
    root = Path(option).expanduser() if option else default_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise CacheError(
            f"the dataset cache folder {root} cannot be written ({e.strerror or e}); give a folder you can write "
            "with --dataset_cache_dir DIR, or --dataset_cache_dir none to encode without a cache"
        ) from None
    return root


# -- keys ---------------------------------------------------------------------------------------------------------


def key_of(parts: dict) -> str:
    return xxhash.xxh3_128_hexdigest(json.dumps(parts, sort_keys=True, default=str).encode())


@functools.lru_cache(maxsize=256)
def _content_hash(path: str, size: int, mtime_ns: int) -> str:  # size and mtime only pick the memo entry
    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_fingerprint(path: str | Path) -> str:
    """A hash of a data file's content (of every file, for a saved datasets folder): about 3 GB/s."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = xxhash.xxh3_128()
    for file in files:
        stat = file.stat()
        digest.update(f"{file.relative_to(path) if path.is_dir() else ''}:".encode())
        digest.update(_content_hash(str(file), stat.st_size, stat.st_mtime_ns).encode())
    return digest.hexdigest()


@functools.cache
def code_fingerprint() -> str:
    """The toolkit's data code and family records: an entry written by other code is never read."""
    package = Path(__file__).resolve().parent.parent
    digest = xxhash.xxh3_128()
    for file in sorted([*(package / "data").rglob("*.py"), package / "families.py"]):
        digest.update(file.read_bytes())
    return digest.hexdigest()


# -- writing ------------------------------------------------------------------------------------------------------


class _Blobs:
    """A column of byte strings: one file of them end to end, and their offsets."""

    def __init__(self, folder: Path, name: str):
        self.file = open(folder / f"{name}.bin", "wb")  # noqa: SIM115 (closed by close or abandon)
        self.offsets, self.end = array("q", [0]), 0

    def add(self, data: bytes) -> None:
        self.file.write(data)
        self.end += len(data)
        self.offsets.append(self.end)

    def close(self, folder: Path, name: str) -> None:
        self.file.close()
        np.asarray(self.offsets, dtype=np.int64).tofile(folder / f"{name}.idx")


class EntryWriter:
    """Samples appended one by one to a temporary folder; `commit` renames it into place when complete."""

    def __init__(self, root: Path, key: str):
        self.root, self.key = root, key
        _remove_abandoned(root)
        self.folder = root / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.folder.mkdir()
        self.tokens = open(self.folder / "input_ids.bin", "wb")  # noqa: SIM115 (closed by commit or abandon)
        self.supervised = open(self.folder / "supervised.bin", "wb")  # noqa: SIM115
        self.offsets, self.total = array("q", [0]), 0
        self.ids, self.media = _Blobs(self.folder, "ids"), _Blobs(self.folder, "media")

    def add(self, sample) -> None:
        ids = np.asarray(sample.input_ids, dtype=np.int32)
        labels = np.asarray(sample.labels, dtype=np.int64)
        supervised = labels != -100
        if not np.array_equal(labels[supervised], ids[supervised]):  # the mask keeps a label only where it is the id
            raise ValueError(f"sample {sample.id}: a label that is neither -100 nor its token cannot be cached")
        self.tokens.write(ids.tobytes())
        self.supervised.write(supervised.astype(np.uint8).tobytes())
        self.total += len(ids)
        self.offsets.append(self.total)
        self.ids.add(sample.id.encode())
        self.media.add(_media_record(sample))

    def commit(self, manifest: dict) -> Path:
        """Closes the files, writes the manifest last, and renames the folder to its key; where another process
        finished the same key first, its entry is kept and this one let go."""
        for file in (self.tokens, self.supervised):
            file.close()
        np.asarray(self.offsets, dtype=np.int64).tofile(self.folder / "offsets.bin")
        self.ids.close(self.folder, "ids")
        self.media.close(self.folder, "media")
        manifest = {**manifest, "format": FORMAT, "samples": len(self.offsets) - 1, "tokens": self.total}
        (self.folder / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str), encoding="utf-8")
        final = self.root / self.key
        try:
            os.rename(self.folder, final)
        except OSError:  # the same key was completed by another process (another node on a shared file system)
            shutil.rmtree(self.folder, ignore_errors=True)
        return final

    def abandon(self) -> None:
        for file in (self.tokens, self.supervised, self.ids.file, self.media.file):
            file.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def _remove_abandoned(root: Path, older_than_s: float = 24 * 3600) -> None:
    """Temporary folders of runs that stopped mid-write a day ago or more (a running write is younger)."""
    for folder in [*root.glob(".tmp-*"), *root.glob("*.failed-*")]:
        try:
            if time.time() - folder.stat().st_mtime > older_than_s:
                shutil.rmtree(folder, ignore_errors=True) if folder.is_dir() else folder.unlink()
        except OSError:
            pass


def _media_record(sample: Sample) -> bytes:
    if not (sample.images or sample.videos or sample.preference):
        return b""
    record = {
        "images": [_ref_record(ref) for ref in sample.images],
        "videos": [_ref_record(ref) for ref in sample.videos],
        "origin": list(sample.origin),
        "truncated": sample.truncated,
        "preference": sample.preference,
    }
    for key, value in sample.media.items():
        record[key] = value.tolist() if hasattr(value, "tolist") else value
    return json.dumps(record).encode()


def _ref_record(ref: ImageRef | VideoRef) -> dict:
    kind = "image" if isinstance(ref, ImageRef) else "video"
    source = ref.source
    if isinstance(source, bytes):
        return {"kind": kind, "bytes": base64.b64encode(source).decode(), "base_dir": ref.base_dir}
    if isinstance(source, tuple):
        return {"kind": kind, "frames": list(source), "base_dir": ref.base_dir}
    return {"kind": kind, "source": source, "base_dir": ref.base_dir}


def _with_media_record(sample: Sample, data: bytes) -> Sample:
    """The sample with what _media_record wrote for it: its pictures and videos, their grids, where it was read."""
    if not data:
        return sample
    record = json.loads(data)
    sample.images = [_ref_from_record(r) for r in record["images"]]
    sample.videos = [_ref_from_record(r) for r in record["videos"]]
    sample.origin, sample.truncated = tuple(record["origin"]), record["truncated"]
    sample.preference = record.get("preference")
    for key in ("image_grid_thw", "video_grid_thw"):
        if key in record:
            sample.media[key] = torch.tensor(record[key])
    if "second_per_grid_ts" in record:
        sample.media["second_per_grid_ts"] = record["second_per_grid_ts"]
    return sample


def _ref_from_record(record: dict) -> ImageRef | VideoRef:
    make = ImageRef if record["kind"] == "image" else VideoRef
    if "bytes" in record:
        return make(base64.b64decode(record["bytes"]), record["base_dir"])
    if "frames" in record:
        return make(tuple(record["frames"]), record["base_dir"])
    return make(record["source"], record["base_dir"])


# -- reading ------------------------------------------------------------------------------------------------------


class Entry:
    """A complete entry, memory-mapped: reading a sample touches only its own pages."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        try:
            self.manifest = json.loads((self.folder / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CacheError(f"the cached dataset {self.folder} cannot be read ({e}); delete the folder") from None
        self.num_samples, self.num_tokens = self.manifest["samples"], self.manifest["tokens"]
        self.offsets = self._array("offsets.bin", np.int64, self.num_samples + 1)
        self.tokens = self._array("input_ids.bin", np.int32, self.num_tokens)
        self.supervised = self._array("supervised.bin", np.uint8, self.num_tokens)
        self._id_offsets = self._array("ids.idx", np.int64, self.num_samples + 1)
        self._media_offsets = self._array("media.idx", np.int64, self.num_samples + 1)
        self._id_blob = self._array("ids.bin", np.uint8, int(self._id_offsets[-1]))
        self._media_blob = self._array("media.bin", np.uint8, int(self._media_offsets[-1]))

    def __getstate__(self) -> dict:  # a DataLoader worker started by spawn maps the files again, it copies nothing
        return {"folder": self.folder}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["folder"])

    def _array(self, name: str, dtype, length: int) -> np.ndarray:
        path = self.folder / name
        expected = length * np.dtype(dtype).itemsize
        if not path.is_file() or path.stat().st_size != expected:
            raise CacheError(f"the cached dataset {self.folder} is incomplete ({name}); delete the folder")
        return np.memmap(path, dtype=dtype, mode="r", shape=(length,)) if length else np.zeros(0, dtype)

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sample(self, index: int) -> Sample:
        """One sample as it was encoded, pictures and videos as references (no pixel values)."""
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        ids = np.asarray(self.tokens[start:end], dtype=np.int64)
        labels = np.where(self.supervised[start:end].astype(bool), ids, -100)
        sample = Sample(self._bytes(self._id_blob, self._id_offsets, index).decode(), ids.tolist(), labels.tolist())
        return _with_media_record(sample, self._bytes(self._media_blob, self._media_offsets, index))

    @staticmethod
    def _bytes(blob: np.ndarray, offsets: np.ndarray, index: int) -> bytes:
        return bytes(blob[offsets[index] : offsets[index + 1]])


def find(root: Path | None, key: str) -> Entry | None:
    """The complete entry of a key, or None. A folder that cannot be read is reported and encoded again."""
    if root is None or not (root / key).is_dir():
        return None
    try:
        return Entry(root / key)
    except CacheError as e:
        logger.warning("%s: encoding again", e)
        shutil.rmtree(root / key, ignore_errors=True)
        return None


# -- ranks --------------------------------------------------------------------------------------------------------


def _failure_marker(root: Path, name: str) -> Path:
    # named by the launcher's pid, which every local rank of one run shares (torchrun, deepspeed): an older run's
    # failure is never taken for this one's
    return root / f"{name}.failed-{os.getppid()}"


def shared(root: Path, name: str, ready: Callable[[], T | None], make: Callable[[], T], wait: bool, poll_s=0.5) -> T:
    """`ready()` where it is; else the node's writer runs `make()` and the other ranks (`wait`) poll until it is
    ready, without a collective (so an encoding of hours meets no process-group timeout), or until the writer
    leaves the reason it failed."""
    found = ready()
    if found is not None:
        return found
    marker = _failure_marker(root, name)
    if not wait:
        marker.unlink(missing_ok=True)
        try:
            return make()
        except BaseException as e:
            first_line = str(e).split("\n", 1)[0] or type(e).__name__
            marker.write_text(f"the data cannot be used: {first_line} (the first rank of this node says why)", "utf-8")
            raise
    while (found := ready()) is None:
        if marker.is_file():
            raise SystemExit(marker.read_text(encoding="utf-8"))
        time.sleep(poll_s)
    return found
