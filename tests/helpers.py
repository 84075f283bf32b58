"""Small helpers shared by tests: write data files, encode, read supervised runs."""

from __future__ import annotations

import io
import json
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import ClassVar

from PIL import Image

from tuning.data.encode import IGNORE_INDEX, Encoder
from tuning.data.formats import iter_conversations


def write_json(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x, ensure_ascii=False) for x in lines) + "\n")
    return path


def picture(path: Path, colour: str = "red", size=(96, 72)) -> Path:
    Image.new("RGB", size, colour).save(path)
    return path


def qwen_vl(sample_id: str, *turns: str, roles=("user", "assistant")) -> dict:
    return {"id": sample_id, "conversations": [{"from": roles[i % 2], "value": t} for i, t in enumerate(turns)]}


def reference_ids(processing, conv, encoder: Encoder) -> list[int]:
    """What apply_chat_template gives at inference for the same messages (grounding already converted), the
    pictures passed to the processor."""
    from tuning.data.media.images import load_image

    tokenizer, processor, _ = processing
    messages = encoder.template_messages(conv)
    images = iter(load_image(r) for r in conv.images)
    for m in messages:
        if isinstance(m["content"], list):
            m["content"] = [
                {"type": "image", "image": next(images)} if p["type"] == "image" else p for p in m["content"]
            ]
    owner = processor if conv.images else tokenizer
    out = owner.apply_chat_template(
        messages, tools=conv.tools, tokenize=True, return_dict=True, add_vision_id=conv.add_vision_id
    )
    ids = out["input_ids"]
    return ids[0] if isinstance(ids[0], list) else ids


def conversations(path: Path) -> list:
    return list(iter_conversations([path]))


def encoder_for(processing, **kwargs) -> Encoder:
    tokenizer, processor, family = processing
    return Encoder(tokenizer, processor, family=family, **kwargs)


def seed_features(processing, files: list[str]) -> list[dict]:
    """Every sample of the given seed example files (data/), encoded for the model of `processing`."""
    from tests.conftest import DATA
    from tuning.data.dataset import build_dataset

    dataset, _ = build_dataset([str(DATA / f) for f in files], encoder_for(processing), show_progress=False)
    return [dataset[i] for i in range(len(dataset))]


def loss_and_gradients(model, batch: dict) -> tuple[float, dict]:
    """One forward and backward: the loss and a copy of every parameter's gradient."""
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_training_step(reference, changed, batch: dict) -> None:
    """`changed` gives `reference`'s loss and the gradient of every parameter (fp32: 1e-5), both in training
    mode without a cache."""
    import torch

    from tuning.model import set_use_cache

    for model in (reference, changed):
        set_use_cache(model, False)
        model.train()
    loss, grads = loss_and_gradients(reference, batch)
    changed_loss, changed_grads = loss_and_gradients(changed, batch)
    assert abs(loss - changed_loss) < 1e-5
    assert grads.keys() == changed_grads.keys() and grads
    for name, grad in grads.items():
        assert torch.allclose(grad, changed_grads[name], atol=1e-5, rtol=1e-4), name


def supervised_runs(tokenizer, input_ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
    """The sample as decoded runs of (text, supervised?): a golden layout that does not depend on ids."""
    runs: list[tuple[list[int], bool]] = []
    for token, label in zip(input_ids, labels, strict=True):
        supervised = label != IGNORE_INDEX
        if runs and runs[-1][1] == supervised:
            runs[-1][0].append(token)
        else:
            runs.append(([token], supervised))
    return [(tokenizer.decode(ids), supervised) for ids, supervised in runs]


def small_run_args(model, out, data: list[str], *flags: str) -> list[str]:
    """finetune.py arguments of a short, exactly logged run: batch 1, learning rate 1e-3, a loss every step."""
    return [
        "--model_name_or_path",
        str(model),
        "--data_path",
        *map(str, data),
        "--output_dir",
        str(out),
        "--per_device_train_batch_size",
        "1",
        "--learning_rate",
        "1e-3",
        "--logging_steps",
        "1",
        "--disable_tqdm",
        "True",
        *flags,
    ]


def run_module(module: str, *args: str, timeout: int = 300):
    """`python -m MODULE ARGS` from the repository, as a user runs it: the completed process, output captured."""
    import subprocess

    from tests.conftest import PYTHON, REPO, run_env

    command = [PYTHON, "-m", module, *args]
    return subprocess.run(command, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_finetune(processes: int, args: list[str], timeout: int = 900) -> None:
    """finetune.py under torchrun with `processes` ranks; fails the test with the end of stderr."""
    import subprocess

    from tests.conftest import PYTHON, REPO, run_env

    command = [
        PYTHON,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(processes),
        "--master_port",
        str(free_port()),
        "finetune.py",
        *args,
    ]
    result = subprocess.run(command, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]


def trainer_state(out: Path) -> dict:
    return json.loads((out / "trainer_state.json").read_text())


def png_bytes(colour="green", size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


class ImageServer(BaseHTTPRequestHandler):
    """Answers with a picture, a slow or endless one, a web page, a redirect loop or 404, by path."""

    hits: ClassVar[dict[str, int]] = {}

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        ImageServer.hits[self.path] = ImageServer.hits.get(self.path, 0) + 1
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


def run_phases(argv: list[str]):
    """finetune.py's phases up to its trainer, as finetune.train calls them: (arguments, datasets, trainer)."""
    from finetune import parse_arguments
    from tuning import recipe

    args = parse_arguments(argv)
    resume = recipe.start(args)
    data = recipe.read_data(args)
    processing = recipe.prepare_processing(args, data)
    datasets = recipe.build_datasets(args, data, processing)
    model = recipe.build_model(args, processing)
    return args, datasets, recipe.build_trainer(args, processing, datasets, model, resume)
