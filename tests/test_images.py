"""Image loading: local paths, data URIs and URLs from a real HTTP server on 127.0.0.1, within limits."""

from __future__ import annotations

import base64
import time

import pytest

from tests.helpers import ImageServer, picture, png_bytes
from tuning.data.formats import ImageRef
from tuning.data.media.images import ImageLimits, ImageLoadError, load_image


def limits(tmp_path, **kwargs) -> ImageLimits:
    return ImageLimits(cache_dir=str(tmp_path / "cache"), **kwargs)


def test_url_loads_and_is_cached(image_server, tmp_path):
    ref = ImageRef(f"{image_server}/ok.png", str(tmp_path))
    first = load_image(ref, limits=limits(tmp_path))
    second = load_image(ref, limits=limits(tmp_path))
    assert first.size == (40, 30) and first.getpixel((0, 0)) == (0, 128, 0)
    assert list(second.getdata()) == list(first.getdata())
    assert ImageServer.hits["/ok.png"] == 1  # the second epoch reads the disk cache


@pytest.mark.parametrize(
    ("path", "message", "kwargs"),
    [
        ("/slow.png", "timed out", {"read_timeout": 0.5}),
        ("/huge.png", "more than the limit", {"max_bytes": 1_000_000}),
        ("/page", "not an image", {}),
        ("/loop", "redirects more than", {}),
        ("/missing.png", "could not be fetched", {}),
    ],
)
def test_bad_urls_fail_cleanly(image_server, tmp_path, path, message, kwargs):
    started = time.monotonic()
    with pytest.raises(ImageLoadError, match=message):
        load_image(ImageRef(f"{image_server}{path}", str(tmp_path)), limits=limits(tmp_path, **kwargs))
    assert time.monotonic() - started < 10
    assert not any((tmp_path / "cache").glob("*")) if (tmp_path / "cache").exists() else True


def test_unreachable_host_fails_cleanly(tmp_path):
    with pytest.raises(ImageLoadError, match="could not be fetched"):
        load_image(ImageRef("http://127.0.0.1:9/x.png", str(tmp_path)), limits=limits(tmp_path, connect_timeout=1))


def test_data_uri_and_relative_paths(tmp_path):
    uri = "data:image/png;base64," + base64.b64encode(png_bytes("blue")).decode()
    assert load_image(ImageRef(uri, str(tmp_path))).getpixel((1, 1)) == (0, 0, 255)
    with pytest.raises(ImageLoadError, match="data: URI"):
        load_image(ImageRef("data:image/png;base64,@@@", str(tmp_path)))
    (tmp_path / "data").mkdir()
    (tmp_path / "images").mkdir()
    picture(tmp_path / "images" / "x.png", "red")
    with pytest.raises(ImageLoadError, match="--image_folder"):
        load_image(ImageRef("x.png", str(tmp_path / "data")))
    found = load_image(ImageRef("x.png", str(tmp_path / "data")), image_folder=str(tmp_path / "images"))
    assert found.getpixel((0, 0)) == (255, 0, 0)


def test_pixel_limit_stops_decompression_bombs(tmp_path):
    picture(tmp_path / "big.png", size=(2000, 2000))
    with pytest.raises(ImageLoadError, match="over the limit"):
        load_image(ImageRef("big.png", str(tmp_path)), limits=ImageLimits(max_pixels=1_000_000))


def test_other_schemes_are_refused(tmp_path):
    with pytest.raises(ImageLoadError, match="unsupported scheme"):
        load_image(ImageRef("file:///etc/passwd", str(tmp_path)))
