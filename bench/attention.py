"""Attention on a packed row, side by side: stock sdpa with the block-diagonal mask transformers builds from
the restarting positions, against one causal sdpa call per sample (tuning/attention.py, the default with
--packing).

    python bench/attention.py                    # Qwen2.5-0.5B's attention shapes, packs of 2k, 8k and 16k tokens
    python bench/attention.py --tokens 4096 --repeats 5

Forward and backward of the attention alone (query, key, value in; the gradient of all three out), on chats of
the throughput bench's long-tailed lengths; prints seconds per call, the mask's bytes, and the ratios.
Written to bench/results/attention-<device>.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
# the repository, not bench/, first: bench/profile.py would hide the standard library's profile module
sys.path[0] = str(REPO)

from bench.throughput import _sync, chat_lengths, device_name  # noqa: E402
from tuning.attention import packed_sdpa_attention, sample_bounds  # noqa: E402

RESULTS = REPO / "bench" / "results"


class Attention(nn.Module):
    """What the attention functions read from the module: Qwen2.5-0.5B's heads."""

    def __init__(self, heads: int, kv_heads: int):
        super().__init__()
        self.is_causal = True
        self.num_key_value_groups = heads // kv_heads


def pack_positions(total: int, seed: int) -> torch.Tensor:
    """One row of `total` tokens filled with whole chats of the throughput bench's lengths (median 200)."""
    lengths, row = chat_lengths(10_000, seed, median=200, high=4080), []
    for length in lengths:
        take = min(length, total - len(row))
        row += range(take)
        if len(row) == total:
            return torch.tensor([row])
    raise AssertionError("not enough chats")


def block_diagonal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """The packed causal mask transformers gives sdpa: (1, 1, T, T) booleans, True where a token may look."""
    from transformers.masking_utils import find_packed_sequence_indices

    indices = find_packed_sequence_indices(position_ids)  # None for a single sample
    sample = torch.zeros_like(position_ids[0]) if indices is None else indices[0]
    causal = torch.ones(len(sample), len(sample), dtype=torch.bool).tril()
    return (causal & (sample[:, None] == sample[None, :]))[None, None]


def timed(run, repeats: int) -> float:
    run()  # warm-up
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        _sync()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def measure(tokens: int, repeats: int, heads: int, kv_heads: int, head_dim: int, device: str, dtype) -> dict:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = Attention(heads, kv_heads)
    positions = pack_positions(tokens, seed=0).to(device)
    generator = torch.Generator().manual_seed(0)
    query, key, value = (
        torch.randn(1, n, tokens, head_dim, generator=generator).to(device, dtype).requires_grad_()
        for n in (heads, kv_heads, kv_heads)
    )
    mask = block_diagonal_mask(positions).to(device)

    def step(attend):
        def run():
            out, _ = attend()
            out.sum().backward()
            for t in (query, key, value):
                t.grad = None

        return run

    masked = timed(
        step(lambda: sdpa_attention_forward(module, query, key, value, mask, scaling=head_dim**-0.5)), repeats
    )
    per_sample = timed(
        step(
            lambda: packed_sdpa_attention(
                module, query, key, value, None, position_ids=positions, scaling=head_dim**-0.5
            )
        ),
        repeats,
    )
    return {
        "tokens": tokens,
        "samples": len(sample_bounds(positions)) - 1,
        "masked": masked,
        "per_sample": per_sample,
        "mask_bytes": mask.numel(),
    }


def table(rows: list[dict], heads: int, kv_heads: int, head_dim: int, dtype) -> str:
    lines = [
        f"Attention of {heads} query and {kv_heads} key/value heads of {head_dim} (Qwen2.5-0.5B), {str(dtype)[6:]}, "
        f"forward and backward, median of the timed calls. Device: {device_name()}.",
        "",
        "| packed tokens | samples | masked sdpa | per-sample sdpa | speed-up | mask |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['tokens']:,} | {r['samples']} | {r['masked']:.3f} s | {r['per_sample']:.3f} s "
            f"| {r['masked'] / r['per_sample']:.1f}x | {r['mask_bytes'] / 2**20:,.0f} MiB |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192, 16384])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    shape = {"heads": 14, "kv_heads": 2, "head_dim": 64}
    rows = [measure(n, args.repeats, **shape, device=device, dtype=dtype) for n in args.tokens]
    text = table(rows, **shape, dtype=dtype)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python bench/attention.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (args.out / f"attention-{'gpu' if cuda else 'cpu'}.md").write_text(
        f"# Packed attention\n\n`{command.strip()}`\n\n{text}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
