"""Image loading: local paths, data URIs and URLs from a real HTTP server on 127.0.0.1, within limits."""

from __future__ import annotations

import base64
import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
from PIL import Image

from tests.helpers import picture
from tuning.data.formats import ImageRef
from tuning.data.images import ImageLimits, ImageLoadError, load_image


def png_bytes(colour="green", size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


class Handler(BaseHTTPRequestHandler):
    hits: ClassVar[dict[str, int]] = {}

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        Handler.hits[self.path] = Handler.hits.get(self.path, 0) + 1
        if self.path == "/ok.png":
            self._send(png_bytes(), "image/png")
        elif self.path == "/slow.png":
            time.sleep(3)
            self._send(png_bytes(), "image/png")
        elif self.path == "/huge.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()  # no Content-Length: the cap must hold while streaming
            try:
                for _ in range(64):
                    self.wfile.write(b"\0" * 65536)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client stopped reading at its cap, as it should
        elif self.path == "/page":
            self._send(b"<html>not a picture</html>", "text/html")
        elif self.path == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.end_headers()
        else:
            self.send_error(404)

    def _send(self, body: bytes, content_type: str):
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def limits(tmp_path, **kwargs) -> ImageLimits:
    return ImageLimits(cache_dir=str(tmp_path / "cache"), **kwargs)


def test_url_loads_and_is_cached(server, tmp_path):
    ref = ImageRef(f"{server}/ok.png", str(tmp_path))
    first = load_image(ref, limits=limits(tmp_path))
    second = load_image(ref, limits=limits(tmp_path))
    assert first.size == (40, 30) and first.getpixel((0, 0)) == (0, 128, 0)
    assert list(second.getdata()) == list(first.getdata())
    assert Handler.hits["/ok.png"] == 1  # the second epoch reads the disk cache


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
def test_bad_urls_fail_cleanly(server, tmp_path, path, message, kwargs):
    started = time.monotonic()
    with pytest.raises(ImageLoadError, match=message):
        load_image(ImageRef(f"{server}{path}", str(tmp_path)), limits=limits(tmp_path, **kwargs))
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
