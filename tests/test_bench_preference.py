"""The DPO bench (bench/preference.py) runs end to end and measures every mode on the same pairs; its numbers live in
bench/results."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import PYTHON, REPO, run_env

MODES = {"ours": "ours (default: packed, chunked log-probs)", "padded": "ours, --packing False"}
MODES["trl"] = "TRL DPOTrainer"


def cells(table: str, first: str) -> list[str]:
    row = next(line for line in table.splitlines() if line.startswith(f"| {first} |"))
    return [cell.strip() for cell in row.strip("|").split("|")]


def number(cell: str) -> float:
    """The median of a cell ("1,234 MiB", "56 (50-60)")."""
    return float(cell.split()[0].replace(",", ""))


@pytest.mark.slow
def test_dpo_bench_measures_every_mode_on_the_same_pairs(tmp_path):
    result = subprocess.run(
        [PYTHON, "bench/preference.py", "--smoke", "--out", str(tmp_path)],
        cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((tmp_path / "preference-smoke.json").read_text())["results"]
    assert set(results) == set(MODES)
    for mode, r in results.items():
        assert r["real_tokens"] > 0 and r["seconds"] > 0 and r["peak_memory_bytes"] > 0, mode
    ours, padded, trl = results["ours"], results["padded"], results["trl"]
    # the same pairs in every step: as many in the timed steps and in all, and the very same tokens
    assert ours["pairs"] == padded["pairs"] == trl["pairs"] > 0
    assert ours["pairs_trained"] == padded["pairs_trained"] == trl["pairs_trained"] > ours["pairs"]
    assert ours["real_tokens"] == padded["real_tokens"] == trl["real_tokens"]
    # ours packs without padding; padded ours and TRL pad the same sequences to the same lengths
    assert ours["positions"] == ours["real_tokens"] < padded["positions"] == trl["positions"]

    table = (tmp_path / "preference-smoke.md").read_text()
    header = cells(table, "mode")
    rate, peak = header.index("real tokens/s"), header.index("peak memory")
    for name in MODES.values():
        row = cells(table, name)
        assert number(row[rate]) > 0 and number(row[peak]) > 0 and row[peak].endswith(" MiB"), row
    assert cells(table, "ours / TRL")[1].endswith("x") and cells(table, "ours / padded")[1].endswith("x")
    assert "Goal: ours at least 1.3x TRL's real tokens/s at most 0.8x its peak memory" in table
