"""tuning/runtime.py: on a CPU, large tensors freed between live ones leave the process instead of staying."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tuning.runtime import is_glibc

pytestmark = pytest.mark.skipif(not is_glibc(), reason="glibc's setting; other C libraries are left alone")

# A forward pass in small: 8 MiB activations, each followed by a small tensor that outlives them, then the
# activations freed. Prints the MiB that stay resident. One 8 MiB tensor is made and freed first, as a first step
# would, which is what raises glibc's own threshold.
#
# glibc's default is measured in a process that imports nothing else: the free chunks other imports leave in the heap
# take the small tensors in some runs, and the freed activations at the heap's top are then trimmed (16-128 MiB
# resident, varying with the hash seed, where this pattern holds 128 MiB on its own).
HOLES = """
import os, sys, torch

def resident():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

if sys.argv[1] == "apart":
    from tuning.runtime import map_large_blocks_apart
    done = map_large_blocks_apart()
else:
    done = None
torch.ones(2**21).sum()
before = resident()
activations, kept = [], []
for _ in range(16):
    activations.append(torch.ones(2**21))
    kept.append(torch.ones(256))
del activations
print(done, round(resident() - before))
"""


def resident_after_freeing(how: str, **env: str) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")}
    result = subprocess.run(
        [sys.executable, "-c", HOLES, how],
        env={**clean, "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        check=True,
    )
    done, mib = result.stdout.split()
    return done, int(mib)


def test_freed_large_tensors_leave_the_process():
    _, kept_by_glibc = resident_after_freeing("default")
    done, kept_apart = resident_after_freeing("apart")
    assert kept_by_glibc >= 96, kept_by_glibc  # 16 x 8 MiB of holes between the small tensors
    assert done == "True" and kept_apart <= 16, kept_apart


@pytest.mark.parametrize(
    "env",
    [{"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20)}, {"GLIBC_TUNABLES": f"glibc.malloc.mmap_threshold={32 * 2**20}"}],
)
def test_a_threshold_the_user_set_stands(env):
    done, _ = resident_after_freeing("apart", **env)
    assert done == "False"


def test_a_childs_peak_is_its_own_not_its_parents():
    """Linux carries a vfork parent's resident memory into the child's ru_maxrss (subprocess starts children with
    vfork): the benches measure each mode's peak with runtime.peak_resident_bytes, the child's own."""
    import resource

    import torch

    ballast = torch.ones(128 * 2**20)  # 512 MiB resident in this (parent) process
    parent = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    child = (
        "import resource; from tuning.runtime import peak_resident_bytes; "
        "print(peak_resident_bytes() // 2**20, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)"
    )
    result = subprocess.run(
        [sys.executable, "-c", child], env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True
    )
    own, inherited = map(int, result.stdout.split())
    del ballast
    assert inherited >= parent - 64 > own + 256  # what the bench read before, and the child's own peak
