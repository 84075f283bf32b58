"""The MLP of a transformer block, a tile of tokens at a time, so that its intermediate activations
never exist for the whole sequence.

A gated MLP (Qwen2/2.5/3, Llama, the Qwen2.5-VL vision blocks) widens each token to the intermediate size (4,864
for Qwen2.5-0.5B, 18,944 for 7B) and keeps gate, up, their activation and product for the backward: for a packed
row of T tokens that is several T x intermediate tensors, the largest activations of the layer once the loss no
longer holds the logits (tuning/loss.py). Every token goes through the MLP on its own, so the row can be cut into
tiles: the forward runs tile by tile without keeping a graph and saves only its input; the backward computes each
tile's forward again and its gradients, and sums the weight gradients over the tiles. The MLP's forward runs once
more than without tiling (with gradient checkpointing: three times instead of two); the result is the same up to
the order of the floating-point sums. The idea is ALST's TiledMLP (Arctic Long Sequence Training). DeepSpeed's
version accumulates the weight gradients by one backward per tile inside the backward, which it has to hide from
ZeRO's hooks (and notes that DDP and FSDP would need the same); this one returns the summed gradients as the
autograd Function's outputs, so every engine sees each weight's gradient once.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable

import torch
from torch import nn

from tuning.families import GATED_MLP


def is_gated_mlp(module: nn.Module, projections: tuple[str, str, str] = GATED_MLP) -> bool:
    """Whether the module has the gate, up and down projections of a gated MLP, by the names of its family."""
    return all(isinstance(getattr(module, name, None), nn.Module) for name in projections)


MIN_TILE_TOKENS = 256  # below this a tile's matrix products lose speed, and a row this short holds little


def default_tile_tokens(module: nn.Module, tokens: int, gate_name: str = GATED_MLP[0]) -> int:
    """As many tiles as the MLP widens its input (intermediate / hidden: 6 for Qwen2.5), so that no tile's
    intermediate is larger than the MLP's input for the whole row; tiles of at least MIN_TILE_TOKENS."""
    gate = getattr(module, gate_name)  # in_features: also on 4-bit and LoRA layers, whose weight has another shape
    hidden = getattr(gate, "in_features", None) or gate.weight.shape[-1]
    intermediate = getattr(gate, "out_features", None) or gate.weight.shape[0]
    tiles = math.ceil(intermediate / hidden)
    return max(MIN_TILE_TOKENS, math.ceil(tokens / tiles))


class _TiledMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, forward: Callable, tile: int, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.forward, ctx.tile, ctx.params = forward, tile, params
        # LoRA's dropout draws random numbers: the backward's recomputation must draw the same ones
        ctx.rng = torch.get_rng_state(), torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        ctx.autocast = x.device.type, torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type)
        ctx.save_for_backward(x)
        rows = x.reshape(-1, x.shape[-1])
        with torch.no_grad():
            out = torch.cat([forward(part) for part in rows.split(tile)])
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        rows = x.detach().reshape(-1, x.shape[-1])
        grads_out = grad_out.reshape(-1, grad_out.shape[-1])
        wants_x = ctx.needs_input_grad[2]
        grad_x = torch.empty_like(rows) if wants_x else None
        # the weight gradients summed over tiles in fp32: bf16 sums of many tiles would lose what one matmul keeps
        sums = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in ctx.params]
        device_type, autocast_on, autocast_dtype = ctx.autocast
        cpu_rng, device_rng = ctx.rng
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else [], device_type=device_type):
            torch.set_rng_state(cpu_rng)
            if device_rng is not None:
                torch.cuda.set_rng_state(device_rng, x.device)
            for start in range(0, rows.shape[0], ctx.tile):
                part = rows[start : start + ctx.tile].detach().requires_grad_(wants_x)
                with torch.enable_grad(), torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_on):
                    out = ctx.forward(part)
                inputs = ([part] if wants_x else []) + list(ctx.params)
                grads = torch.autograd.grad(out, inputs, grads_out[start : start + ctx.tile], allow_unused=True)
                if wants_x:
                    grad_x[start : start + ctx.tile] = grads[0]
                    grads = grads[1:]
                for total, grad in zip(sums, grads, strict=True):
                    if grad is not None:
                        total += grad
        param_grads = [total.to(p.dtype) for total, p in zip(sums, ctx.params, strict=True)]
        return None, None, None if grad_x is None else grad_x.view_as(x), *param_grads


def _weights_outside_parameters(module: nn.Module) -> bool:
    """Trainable weights that are not registered parameters (FSDP without use_orig_params puts views of its
    flat parameter there): the Function would not know them and they would get no gradient."""
    return any(
        isinstance(value, torch.Tensor) and value.requires_grad and not isinstance(value, nn.Parameter)
        for part in module.modules()
        for value in vars(part).values()
    )


def _tiled_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    stock = self._untiled_forward
    if not torch.is_grad_enabled():  # generation and evaluation: nothing to save, no parameters to look at
        return stock(x)
    params = [p for p in self.parameters() if p.requires_grad]
    tokens = x.numel() // x.shape[-1]
    tile = self._tile_tokens or default_tile_tokens(self, tokens, self._mlp_gate)
    if tokens <= tile or not (params or x.requires_grad):
        return stock(x)
    if _weights_outside_parameters(self):
        return stock(x)
    return _TiledMLP.apply(stock, tile, x, *params)


def tile_mlps(model: nn.Module, tile_tokens: int | None = None, projections: tuple[str, str, str] = GATED_MLP) -> int:
    """Run every gated MLP of `model` a tile of `tile_tokens` tokens at a time in training (default: see
    default_tile_tokens). Inference and inputs of one tile take the MLP's forward as it is now: a kernel bound
    before (Liger's SwiGLU) runs inside the tiles. Returns how many MLPs."""
    count = 0
    for module in model.modules():
        if not is_gated_mlp(module, projections) or getattr(module.forward, "__func__", None) is _tiled_forward:
            continue
        module._untiled_forward = module.forward
        module._tile_tokens = tile_tokens
        module._mlp_gate = projections[0]
        module.forward = types.MethodType(_tiled_forward, module)
        count += 1
    return count
