"""The DPO bench runs end to end (--smoke) and measures every mode on the same pairs; its numbers live in bench/results."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import PYTHON, REPO, run_env


@pytest.mark.slow
def test_dpo_bench_measures_every_mode_on_the_same_pairs(tmp_path):
    result = subprocess.run(
        [PYTHON, "bench/preference.py", "--smoke", "--out", str(tmp_path)],
        cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((tmp_path / "preference-smoke.json").read_text())["results"]
    assert set(results) == {"ours", "padded", "trl"}
    for mode, r in results.items():
        assert r["real_tokens"] > 0 and r["seconds"] > 0, mode
        assert r["peak_memory_bytes"] > 0 and r["training_memory_bytes"] >= 0, mode
    # the same pairs per step and in all: the modes' steps are comparable
    assert results["ours"]["pairs"] == results["trl"]["pairs"] == results["padded"]["pairs"] > 0
    assert results["ours"]["pairs_trained"] == results["trl"]["pairs_trained"]
    # packed ours feeds no padding; padded ours and TRL pad the same sequences alike
    assert results["ours"]["positions"] == results["ours"]["real_tokens"]
    assert results["padded"]["positions"] == results["trl"]["positions"] > results["trl"]["real_tokens"]
    table = (tmp_path / "preference-smoke.md").read_text()
    for name in ("| ours (default: packed, chunked log-probs) |", "| ours, --packing False |", "| TRL DPOTrainer |"):
        row = next(line for line in table.splitlines() if line.startswith(name))
        assert " real tokens/s" not in row and " MiB |" in row
    assert "| ours / TRL |" in table and "| ours / padded |" in table and "Goal: " in table
