"""Quiet by default: the libraries' notices that nobody can act on do not print; a real warning still does."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO, run_env

LORA_RUN = """
import logging, sys, warnings
from transformers import AutoModelForCausalLM
from tuning.model import LoraOptions, attach_lora
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
attach_lora(model, LoraOptions(r=4), [], quantized=False, checkpointing=True)
print("gptqmodel imported:", "gptqmodel" in sys.modules)
logging.getLogger("tuning.model").warning("a warning of ours")
warnings.warn("a library's own warning", FutureWarning)
"""
NOTICES = ("_pytree", "Python GIL is enabled", "gemm_4bit_forward", "PYTORCH_ALLOC_CONF", "is deprecated")


def test_a_lora_run_prints_no_library_notices_and_keeps_real_warnings(tiny_text):
    result = subprocess.run(
        [sys.executable, "-c", LORA_RUN, str(tiny_text)], cwd=REPO, env=run_env(), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "gptqmodel imported: False" in result.stdout  # nor its banner, nor its CUDA allocator options
    assert not [notice for notice in NOTICES if notice in result.stderr], result.stderr
    assert "a warning of ours" in result.stderr and "a library's own warning" in result.stderr


def test_the_data_check_prints_its_report_and_nothing_else(tiny_vl):
    from tests.conftest import DATA
    from tests.helpers import run_module

    result = run_module("tuning.data", "--data_path", str(DATA / "example.json"), "--model_name_or_path", str(tiny_vl))
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and result.stdout.startswith("data: ")
