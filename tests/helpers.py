"""Small helpers shared by tests: write data files, encode, read supervised runs."""

from __future__ import annotations

import json
from pathlib import Path

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


def conversations(path: Path) -> list:
    return list(iter_conversations([path]))


def encoder_for(processing, **kwargs) -> Encoder:
    tokenizer, processor, model_type = processing
    return Encoder(tokenizer, processor, model_type=model_type, **kwargs)


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
