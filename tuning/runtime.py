"""The process a run lives in: its process group, DeepSpeed on a machine without GPUs, leaving torchrun cleanly, on a
CPU the host allocator, and quiet libraries.

Quiet. Importing peft imports torchao (through transformers' quantizers) and bitsandbytes, which log deprecation and
missing-kernel notices on every command, and peft imports gptqmodel whenever it adds a LoRA layer, which prints a
banner and sets this process's CUDA allocator options (PYTORCH_ALLOC_CONF) where they are unset. Those notices are
filtered by their exact text at their loggers (quiet_libraries), and gptqmodel is hidden from peft unless the model is
a GPTQ checkpoint (gptqmodel_only_for); every other warning shows as it is.

Host memory. Training on a CPU, blocks of LARGE_BLOCK_BYTES and more get a mapping of their own, so freeing one
returns it. There the tensors live in the process's heap. glibc maps a block of 128 KiB or more on its own at first,
but each such block freed raises that threshold to its size (up to 32 MiB), so from the first step on a step's
activations, a few MiB each, come from the heap; freed between blocks still alive, their pages stay with the process.
On the real-vocabulary bench that was 200-300 MiB of the peak RSS, and it varied from run to run. Fixing the
threshold stops the raising. It costs time, since each mapping takes page faults when it is first written: the
real-vocabulary bench ran 11-21 % slower for its 190-250 MiB lower peak, and at 1 MiB the small-vocabulary bench
ran 25-40 % slower (at 4 MiB it does not). A threshold the user set stands. Not on a GPU, whose tensors are not in
this heap.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
import warnings
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

LARGE_BLOCK_BYTES = 4 * 2**20
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h


def is_glibc() -> bool:
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # not a GNU libc (macOS, Windows, musl)
        return False


def user_set_threshold() -> bool:
    """The user chose glibc's threshold already, through its environment variable or tunable: theirs stands."""
    return "MALLOC_MMAP_THRESHOLD_" in os.environ or "mmap_threshold" in os.environ.get("GLIBC_TUNABLES", "")


def map_large_blocks_apart(threshold: int = LARGE_BLOCK_BYTES) -> bool:
    """Have glibc map every block of `threshold` bytes or more on its own from now on; whether it was done (not
    where the C library is not glibc or the user set the threshold)."""
    if not is_glibc() or user_set_threshold():
        return False
    return ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, threshold) == 1


def peak_resident_bytes() -> int:
    """The peak resident memory of this process's own address space (VmHWM). Not getrusage's ru_maxrss: Linux carries
    that across exec, so a child started with vfork (as subprocess does) reports its parent's resident memory at the
    start when that was higher than its own peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource  # not Linux: the best there is

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def prepare_host_memory(device: torch.device) -> None:
    """On a CPU: have freed activations leave the process (see the module's docstring), said once in the log."""
    if device.type == "cpu" and map_large_blocks_apart():
        mib = LARGE_BLOCK_BYTES // 2**20
        logger.info("host memory: blocks of %d MiB and more are returned when freed (tuning/runtime.py)", mib)


def deepspeed_state_on_cpu() -> dict:
    """Set up accelerate's state for DeepSpeed over gloo, for TrainingArguments to use as it is
    (its `accelerator_config`).

    Left to itself, TrainingArguments gives accelerate no backend for DeepSpeed on a machine without GPUs;
    accelerate then counts every rank as rank 0 of 1, and ZeRO fails its batch-size check with 2 ranks."""
    from accelerate import PartialState

    if "LOCAL_RANK" not in os.environ:  # plain `python finetune.py --deepspeed ...`: a one-process group
        defaults = {
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29511",
        }
        for key, value in defaults.items():
            os.environ.setdefault(key, value)
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    return {"use_configured_state": True}


def is_zero3(training_args) -> bool:
    from transformers.integrations import is_deepspeed_zero3_enabled

    return bool(training_args.deepspeed) and is_deepspeed_zero3_enabled()


def prepare_process_group(training_args) -> None:
    """ZeRO-3 on a CPU checks its batch size inside from_pretrained: the gloo group must exist before the model
    loads (with 2 ranks it fails there otherwise). Elsewhere the Trainer's own setup is enough."""
    if is_zero3(training_args) and not torch.cuda.is_available():
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")


def leave_distributed(exit_code: int) -> None:
    """Under torchrun: all ranks meet at a barrier and then exit at once, skipping interpreter teardown.

    Tearing down gloo's threads at exit now and then aborted a rank after its work was saved ("terminate called
    without an active exception", SIGABRT: 3 aborts over 3 full test runs, DDP and ZeRO-3 alike, and
    with destroy_process_group at the end too). Past the barrier every file is written and closed."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)


# (logger, the start of a notice it logs on every command that is nothing a user can act on)
LIBRARY_NOTICES = (
    # torchao registers its enums with torch.compile the old way, at import
    ("torch.utils._pytree", "is an Enum subclass and is now natively supported by torch.compile"),
    # bitsandbytes on a CPU without the optional `kernels` package (and hub access): its own kernels run instead
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
)
# transformers 5.24 renamed gradient checkpointing to activation checkpointing; peft still calls the old name
LIBRARY_WARNINGS = (r"`is_gradient_checkpointing` is deprecated", r"`gradient_checkpointing_enable` is deprecated")


class _DropNotice(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_libraries() -> None:
    """Filter the libraries' notices listed above, by their text, where they are logged."""
    for name, text in LIBRARY_NOTICES:
        logger_ = logging.getLogger(name)
        if not any(isinstance(f, _DropNotice) and f.text == text for f in logger_.filters):
            logger_.addFilter(_DropNotice(text))
    for message in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)


@contextlib.contextmanager
def gptqmodel_only_for(gptq: bool):
    """While peft adapts or loads adapters on a model: gptqmodel hidden from it unless the model is GPTQ (or
    gptqmodel is imported already), so that its import, banner and allocator options stay off other runs."""
    if gptq or "gptqmodel" in sys.modules:
        yield
        return
    from peft.import_utils import is_gptqmodel_available  # cached per process: asked again after

    sys.modules["gptqmodel"] = None  # `import gptqmodel` fails and find_spec finds nothing, for peft's check
    is_gptqmodel_available.cache_clear()
    try:
        yield
    finally:
        del sys.modules["gptqmodel"]
        is_gptqmodel_available.cache_clear()
