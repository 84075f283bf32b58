"""The MLP a tile of tokens at a time: the same loss and gradients as the whole row at once, for full
fine-tuning, LoRA (its dropout included), gradient checkpointing and the vision tower; no tile larger than asked."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from tests.helpers import assert_same_training_step, loss_and_gradients, seed_features
from tuning.data.collate import FlatteningCollator
from tuning.families import packed_positions
from tuning.model import LoraOptions, attach_lora, set_use_cache
from tuning.tiled_mlp import is_gated_mlp, tile_mlps

TILE = 16


def assert_tiles_match_the_whole_row(load, batch):
    tiled = load()
    assert tile_mlps(tiled, TILE) > 0
    assert_same_training_step(load(), tiled, batch)


@pytest.fixture
def text_batch(text_processing):
    return FlatteningCollator()(seed_features(text_processing, ["example_chatml.jsonl", "example_pretrain.jsonl"]))


def text_model(tiny_text, checkpointing=False, lora_dropout=None):
    def load():
        torch.manual_seed(0)  # the same LoRA initialisation in both copies
        model = AutoModelForCausalLM.from_pretrained(tiny_text)
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": False})
        if lora_dropout is not None:
            model = attach_lora(model, LoraOptions(r=4, dropout=lora_dropout), [], False, checkpointing)
        return model

    return load


def test_full_fine_tuning_step_equals_the_untiled_mlp(tiny_text, text_batch):
    assert text_batch["input_ids"].shape[1] > 8 * TILE
    assert_tiles_match_the_whole_row(text_model(tiny_text), text_batch)


def test_lora_step_with_gradient_checkpointing_equals_the_untiled_mlp(tiny_text, text_batch):
    assert_tiles_match_the_whole_row(text_model(tiny_text, checkpointing=True, lora_dropout=0.0), text_batch)


def test_vl_step_equals_the_untiled_mlp_in_the_decoder_and_the_vision_tower(tiny_vl, vl_processing):
    model = AutoModelForImageTextToText.from_pretrained(tiny_vl)
    batch = FlatteningCollator(packed_positions(model))(
        seed_features(vl_processing, ["example.json", "example_openai.jsonl", "example_video.json"])
    )
    vision_mlps = [m for m in model.model.visual.modules() if is_gated_mlp(m)]
    assert vision_mlps and batch["pixel_values"].shape[0] > TILE  # the tower's MLPs are tiled too
    assert_tiles_match_the_whole_row(lambda: AutoModelForImageTextToText.from_pretrained(tiny_vl), batch)


def test_lora_dropout_gets_the_gradient_of_the_masks_it_drew(tiny_text, text_batch):
    """With dropout the tiles draw other masks than the whole row would: the backward must recompute the
    forward's own masks. The reference: the same tiles, the graph kept (autograd's own gradient)."""
    tiled = text_model(tiny_text, lora_dropout=0.5)()
    kept = text_model(tiny_text, lora_dropout=0.5)()
    tile_mlps(tiled, TILE)
    for module in kept.modules():  # tiles by hand, autograd keeps each tile's graph
        if is_gated_mlp(module):
            whole = module.forward
            module.forward = lambda x, whole=whole: torch.cat(
                [whole(part) for part in x.reshape(-1, x.shape[-1]).split(TILE)]
            ).view(*x.shape[:-1], -1)
    for model in (tiled, kept):
        set_use_cache(model, False)
        model.train()
    torch.manual_seed(1)
    kept_loss, kept_grads = loss_and_gradients(kept, text_batch)
    torch.manual_seed(1)
    tiled_loss, tiled_grads = loss_and_gradients(tiled, text_batch)
    assert tiled_loss == pytest.approx(kept_loss, abs=1e-6)
    for name, grad in kept_grads.items():
        assert torch.allclose(grad, tiled_grads[name], atol=1e-5, rtol=1e-4), name


def test_no_tile_is_longer_than_asked_and_inference_is_untouched(tiny_text, text_batch):
    model = AutoModelForCausalLM.from_pretrained(tiny_text)
    set_use_cache(model, False)
    with torch.no_grad():
        before = model(**text_batch).logits
    assert tile_mlps(model, TILE) == model.config.num_hidden_layers
    assert tile_mlps(model, TILE) == 0  # a second call does not wrap twice
    rows = []
    for layer in model.model.layers:
        layer.mlp.down_proj.register_forward_hook(lambda m, args, out: rows.append(args[0].reshape(-1, 1).shape[0]))
    model.train()
    model(**text_batch).loss.backward()
    tokens = text_batch["input_ids"].numel()
    assert rows and max(rows) == TILE * model.config.intermediate_size  # widened, never the whole row
    assert sum(rows) == 2 * tokens * model.config.intermediate_size * model.config.num_hidden_layers
    rows.clear()
    model.eval()
    with torch.no_grad():
        after = model(**text_batch).logits
    assert torch.equal(before, after)
    assert rows == [tokens * model.config.intermediate_size] * model.config.num_hidden_layers


def test_bf16_autocast_is_kept_in_the_recomputation(tiny_text, text_batch):
    load = text_model(tiny_text)
    stock, tiled = load(), load()
    tile_mlps(tiled, TILE)
    dtypes = set()
    for layer in tiled.model.layers:
        layer.mlp.down_proj.register_forward_hook(lambda m, args, out: dtypes.add(args[0].dtype))
    results = []
    for model in (stock, tiled):
        set_use_cache(model, False)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(loss_and_gradients(model, text_batch))
    assert dtypes == {torch.bfloat16}  # the forward and the backward's recomputation alike
    (loss, grads), (tiled_loss, tiled_grads) = results
    assert tiled_loss == pytest.approx(loss, rel=1e-2)
    for name, grad in grads.items():
        assert tiled_grads[name].dtype == grad.dtype
        assert torch.allclose(grad, tiled_grads[name], atol=2e-2, rtol=5e-2), name


def test_weights_that_are_not_parameters_keep_the_untiled_path(tiny_text, text_batch):
    """FSDP without use_orig_params hands the MLP plain views of its flat parameter: they still get gradients."""
    model = AutoModelForCausalLM.from_pretrained(tiny_text)
    set_use_cache(model, False)
    tile_mlps(model, TILE)
    linear = model.model.layers[0].mlp.up_proj
    view = linear.weight.detach().clone().requires_grad_()
    del linear.weight
    linear.weight = view
    model.train()
    model(**text_batch).loss.backward()
    assert view.grad is not None and view.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("tiled_mlp", "checkpointing", "zero3", "expected"),
    [(None, True, False, True), (None, False, False, False), (True, False, False, True), (None, True, True, False)],
)
def test_finetune_tiles_with_checkpointing_unless_told_and_never_under_zero3(
    tiny_text, tiled_mlp, checkpointing, zero3, expected
):
    from types import SimpleNamespace

    from tuning.recipe import mlp_tiling

    model = AutoModelForCausalLM.from_pretrained(tiny_text)
    args = SimpleNamespace(tiled_mlp=tiled_mlp, gradient_checkpointing=checkpointing, mlp_tile_tokens=None)
    for callback in mlp_tiling(args, zero3):  # as the Trainer calls it
        callback.on_train_begin(args, None, None, model=model)
    assert hasattr(model.model.layers[0].mlp, "_untiled_forward") == expected


def test_default_tiles_keep_each_intermediate_within_the_input_size():
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

    from tuning.tiled_mlp import MIN_TILE_TOKENS, default_tile_tokens

    mlp = Qwen2MLP(Qwen2Config(hidden_size=896, intermediate_size=4864))  # Qwen2.5-0.5B's MLP
    tile = default_tile_tokens(mlp, 2048)
    assert tile * 4864 <= 2048 * 896 and tile == 342  # 6 tiles
    assert default_tile_tokens(mlp, 600) == MIN_TILE_TOKENS


def test_liger_swiglu_bound_after_tiling_runs_inside_the_tiles(tiny_text, monkeypatch):
    """--use_liger_kernel: the Trainer binds Liger's SwiGLU as each MLP's forward (on a GPU it runs there only);
    tiling again wraps that kernel instead of keeping a tiled forward that is no longer called."""
    from liger_kernel.transformers.swiglu import LigerSwiGLUMLP
    from transformers.integrations.liger import apply_liger_kernel
    from transformers.models.qwen2 import modeling_qwen2

    from tuning.tiled_mlp import _tiled_forward

    for name, value in vars(modeling_qwen2).copy().items():  # Liger also swaps the module's norm, MLP and rope,
        if not name.startswith("__"):  # which every later Qwen2 of this process would build: put them back after
            monkeypatch.setattr(modeling_qwen2, name, value)
    model = AutoModelForCausalLM.from_pretrained(tiny_text)
    tile_mlps(model, TILE)
    apply_liger_kernel(model, None)  # the Trainer's own call
    mlps = [layer.mlp for layer in model.model.layers]
    assert all(mlp.forward.__func__ is LigerSwiGLUMLP.forward for mlp in mlps)  # the tiles are gone
    assert tile_mlps(model, TILE) == len(mlps)
    assert all(mlp.forward.__func__ is _tiled_forward for mlp in mlps)
    assert all(mlp._untiled_forward.__func__ is LigerSwiGLUMLP.forward for mlp in mlps)


@pytest.mark.slow
def test_finetune_tiles_the_kernel_the_trainer_binds(tmp_path, tiny_text, monkeypatch):
    """finetune.py tiles after the Trainer has applied --use_liger_kernel. Liger runs only on a GPU, so a
    stand-in binds a forward the way Liger does and counts the rows each call gets."""
    import transformers.trainer

    import finetune
    from tests.conftest import DATA

    rows = []

    def counted_swiglu(self, x):
        rows.append(x.reshape(-1, x.shape[-1]).shape[0])
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    def bind_like_liger(model, config):
        for module in model.modules():
            if is_gated_mlp(module):
                module.__dict__["forward"] = counted_swiglu.__get__(module, type(module))

    monkeypatch.setattr(transformers.trainer, "apply_liger_kernel", bind_like_liger)
    checks = finetune.argument_problems
    monkeypatch.setattr(finetune, "argument_problems", lambda *a: [p for p in checks(*a) if "liger" not in p])
    argv = ["--model_name_or_path", str(tiny_text), "--data_path", str(DATA / "example_chatml.jsonl")]
    argv += ["--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--save_strategy", "no"]
    argv += ["--use_lora", "True", "--gradient_checkpointing", "True", "--use_liger_kernel", "True"]
    finetune.train([*argv, "--mlp_tile_tokens", str(TILE), "--per_device_train_batch_size", "4"])
    assert rows and max(rows) == TILE  # the bound kernel ran, a tile at a time
