"""Load an image named in the data: a local path, an http(s) URL, a data: URI or the bytes of an image file
embedded in the data, within limits."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from tuning.data.conversation import ImageRef


class ImageLoadError(ValueError):
    pass


@dataclass(frozen=True)
class ImageLimits:
    connect_timeout: float = 5.0
    read_timeout: float = 20.0
    max_bytes: int = 20 * 1024 * 1024
    max_redirects: int = 5
    # Pillow's own bomb check warns at ~89M pixels and fails at twice that; we fail at the limit.
    max_pixels: int = 64 * 1024 * 1024
    max_video_bytes: int = 256 * 1024 * 1024
    max_video_seconds: float = 600.0
    cache_dir: str | None = None


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "qwen-tuning" / "images"


def resolve_local(ref: ImageRef, image_folder: str | None) -> Path:
    """A relative path resolves against the data file's folder first, then --image_folder."""
    path = Path(ref.source).expanduser()
    if path.is_absolute():
        candidates = [path]
    else:
        candidates = [Path(ref.base_dir) / path] + ([Path(image_folder) / path] if image_folder else [])
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = " and ".join(str(c) for c in candidates)
    hint = "" if image_folder else " or pass --image_folder"
    raise ImageLoadError(f"image file {ref.source!r} not found (looked in {tried}); fix the path{hint}")


def _decode(data: bytes, name: str, limits: ImageLimits) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > limits.max_pixels:
                raise ImageLoadError(
                    f"image {name} has {width}x{height} pixels, over the limit of {limits.max_pixels}; resize it"
                )
            image.load()  # reads every byte now, so a truncated file fails here and not mid-training
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(f"image {name} is too large to decode safely ({e})") from None
    except UnidentifiedImageError:
        raise ImageLoadError(
            f"image {name} cannot be read: it is corrupt or not an image format Pillow knows"
        ) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageLoadError(f"image {name} cannot be read: it is corrupt, truncated or not an image ({e})") from None
    return image.convert("RGB")


def fetch_url(url: str, limits: ImageLimits, kind: str = "image", max_bytes: int | None = None) -> bytes:
    """The bytes behind an http(s) URL of a picture (or video), within the time, redirect, type and size
    limits, cached on disk."""
    import requests

    max_bytes = max_bytes or limits.max_bytes
    cache_dir = Path(limits.cache_dir) if limits.cache_dir else default_cache_dir()
    cached = cache_dir / hashlib.sha256(url.encode()).hexdigest()
    if cached.is_file():
        return cached.read_bytes()
    session = requests.Session()
    session.max_redirects = limits.max_redirects
    try:
        with session.get(url, stream=True, timeout=(limits.connect_timeout, limits.read_timeout)) as response:
            response.raise_for_status()
            content_type = response.headers.get("Content-Type", "")
            if not content_type.startswith(f"{kind}/"):
                raise ImageLoadError(f"URL {url} returned content type {content_type!r}, not {_article(kind)} {kind}")
            declared = int(response.headers.get("Content-Length") or 0)
            if declared > max_bytes:
                raise ImageLoadError(f"URL {url} is {declared} bytes, over the limit of {max_bytes}")
            chunks, size = [], 0
            for chunk in response.iter_content(64 * 1024):
                size += len(chunk)
                if size > max_bytes:
                    raise ImageLoadError(f"URL {url} sent more than the limit of {max_bytes} bytes")
                chunks.append(chunk)
    except requests.TooManyRedirects:
        raise ImageLoadError(f"URL {url} redirects more than {limits.max_redirects} times") from None
    except requests.Timeout:
        raise ImageLoadError(
            f"URL {url} timed out ({limits.connect_timeout}s connect, {limits.read_timeout}s read)"
        ) from None
    except requests.RequestException as e:
        raise ImageLoadError(f"URL {url} could not be fetched ({e.__class__.__name__}: {e})") from None
    data = b"".join(chunks)
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = cached.with_suffix(".part")
    partial.write_bytes(data)
    partial.replace(cached)  # atomic: another worker never reads half a file
    return data


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _data_uri(uri: str) -> bytes:
    header, sep, payload = uri.partition(",")
    if not sep or ";base64" not in header:
        raise ImageLoadError("a data: URI must look like data:image/png;base64,<payload>")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageLoadError("the data: URI's base64 payload does not decode") from None


def _embedded(data: bytes, limits: ImageLimits) -> Image.Image:
    name = f"embedded in the data ({len(data)} bytes)"
    if len(data) > limits.max_bytes:
        raise ImageLoadError(f"image {name} is over the limit of {limits.max_bytes} bytes")
    return _decode(data, name, limits)


def load_image(ref: ImageRef, image_folder: str | None = None, limits: ImageLimits = ImageLimits()) -> Image.Image:
    source = ref.source
    if isinstance(source, bytes):
        return _embedded(source, limits)
    if source.startswith(("http://", "https://")):
        return _decode(fetch_url(source, limits), source, limits)
    if source.startswith("data:"):
        return _decode(_data_uri(source), "from a data: URI", limits)
    if "://" in source:
        raise ImageLoadError(f"image {source!r} uses an unsupported scheme; use a local path, http(s) or data:")
    path = resolve_local(ref, image_folder)
    if path.stat().st_size > limits.max_bytes:
        raise ImageLoadError(f"image file {ref.source} is over the limit of {limits.max_bytes} bytes")
    return _decode(path.read_bytes(), ref.source, limits)
