"""Session fixtures: the tiny offline models (built once, reused from models/ when current)."""

from __future__ import annotations

import os
import sys
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"
PYTHON = sys.executable

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test must never reach a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_text() -> Path:
    from tuning.tiny import ensure_tiny

    return ensure_tiny("text")


@pytest.fixture(scope="session")
def tiny_text_trained_scale(tmp_path_factory) -> Path:
    """The tiny text model with weights of a trained model's scale (init 0.02): 4-bit rounding of the default
    tiny model's wide random weights (init 0.2) moves its logits by half their size."""
    from tuning.tiny import ensure_tiny

    return ensure_tiny("text", tmp_path_factory.mktemp("init002") / "tiny-qwen2", initializer_range=0.02)


@pytest.fixture(scope="session")
def tiny_gptq(tiny_text_trained_scale, tmp_path_factory) -> Path:
    """tiny_text_trained_scale quantized to GPTQ int4 by gptqmodel, calibrated on the tiny corpus (about 30 s)."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "4")  # with 2 cores its default worker split fails
    from gptqmodel import GPTQModel, QuantizeConfig

    from tuning.tiny import _corpus_text

    out = tmp_path_factory.mktemp("gptq") / "tiny-qwen2-gptq"
    texts = [line for line in _corpus_text().splitlines() if line.strip()][:64]
    model = GPTQModel.load(str(tiny_text_trained_scale), QuantizeConfig(bits=4, group_size=32))
    model.quantize(texts, batch_size=4)
    model.save(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_vl() -> Path:
    from tuning.tiny import ensure_tiny

    return ensure_tiny("vl")


@pytest.fixture(scope="session")
def text_processing(tiny_text):
    from tuning.data.processing import load_processing

    return load_processing(str(tiny_text))


@pytest.fixture(scope="session")
def vl_processing(tiny_vl):
    from tuning.data.processing import load_processing

    return load_processing(str(tiny_vl))


def run_env() -> dict:
    """Environment for subprocesses: offline, quiet, the repo importable."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    return env


@pytest.fixture(scope="session")
def image_server():
    """tests.helpers.ImageServer on 127.0.0.1: http://127.0.0.1:PORT/ok.png, /page, /loop, ..."""
    from tests.helpers import ImageServer

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), ImageServer)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
