"""finetune.py on the tiny models: what should train trains, what should not stays, and the result loads."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import TrainerCallback

from finetune import train
from tests.conftest import DATA

pytestmark = pytest.mark.slow


class ParameterWatch(TrainerCallback):
    """Snapshots every parameter when training starts and compares when it ends."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        after = dict(model.named_parameters())
        self.changed = {n for n, p in after.items() if not torch.equal(p.detach(), self.before[n])}


def run(tmp_path, model, *flags, data=DATA / "example.json"):
    watch = ParameterWatch()
    argv = [
        "--model_name_or_path",
        str(model),
        "--data_path",
        str(data),
        "--output_dir",
        str(tmp_path / "out"),
        "--max_steps",
        "4",
        "--learning_rate",
        "1e-2",
        "--per_device_train_batch_size",
        "2",
        "--save_strategy",
        "no",
        "--disable_tqdm",
        "True",
        *flags,
    ]
    trainer = train(argv, callbacks=(watch,))
    return trainer, watch


def test_lora_on_vl_trains_adapters_and_projector_but_not_the_vision_tower(tmp_path, tiny_vl):
    trainer, watch = run(tmp_path, tiny_vl, "--use_lora", "True", "--lora_r", "4")
    assert watch.trainable and watch.changed == watch.trainable, watch.trainable - watch.changed
    lora = {n for n in watch.trainable if "lora_" in n}
    assert lora and all("visual" not in n for n in lora), "LoRA must not reach the vision tower by default"
    assert any("merger" in n and "modules_to_save" in n for n in watch.trainable)
    frozen_vision = [n for n in watch.before if "visual" in n and "merger" not in n]
    assert frozen_vision and not set(frozen_vision) & watch.changed

    out = tmp_path / "out"
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "processor_config.json",
        "tokenizer.json",
        "chat_template.jinja",
        "run_args.json",
        "data_report.json",
        "loss.png",
        "trainer_state.json",
    ):
        assert (out / name).is_file(), name
    report = json.loads((out / "data_report.json").read_text())
    assert report["usable"] == 3 and report["images"] == 3

    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    reloaded = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_vl), out)
    live = {n.replace(".default", ""): p for n, p in trainer.model.named_parameters() if "lora_" in n}
    saved = {n.replace(".default", ""): p for n, p in reloaded.named_parameters() if "lora_" in n}
    assert live.keys() == saved.keys()
    assert all(torch.equal(live[n].detach(), saved[n].detach()) for n in live)


def test_full_finetuning_trains_everything_but_the_frozen_vision_tower(tmp_path, tiny_vl):
    _, watch = run(tmp_path, tiny_vl)
    vision = {n for n in watch.before if "visual" in n and "merger" not in n}
    assert vision and not vision & watch.trainable
    assert watch.changed == watch.trainable
    assert any("merger" in n for n in watch.trainable) and any("language_model" in n for n in watch.trainable)


def test_vision_tower_trains_when_unfrozen(tmp_path, tiny_vl):
    _, watch = run(tmp_path, tiny_vl, "--fix_vit", "False", "--tune_projector", "False")
    assert any("visual.blocks" in n for n in watch.changed)
    assert not any("merger" in n for n in watch.trainable)


def test_qlora_nf4_trains_the_adapters(tmp_path, tiny_text):
    _, watch = run(
        tmp_path,
        tiny_text,
        "--use_lora",
        "True",
        "--q_lora",
        "True",
        "--lora_r",
        "4",
        "--tiled_mlp",  # the 4-bit MLPs in tiles too
        "True",
        "--mlp_tile_tokens",
        "16",
        data=DATA / "example_chatml.jsonl",
    )
    lora = {n for n in watch.trainable if "lora_" in n}
    assert lora and lora <= watch.changed
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_bad_argument_combinations_are_all_reported_before_loading(tmp_path):
    with pytest.raises(SystemExit) as caught:
        train(
            [
                "--model_name_or_path",
                str(tmp_path / "not-loaded"),
                "--output_dir",
                str(tmp_path / "o"),
                "--q_lora",
                "True",
                "--bf16",
                "True",
                "--fp16",
                "True",
                "--lora_r",
                "0",
                "--mlp_tile_tokens",
                "0",
                "--use_liger_kernel",
                "True",
            ]
        )
    message = str(caught.value)
    assert "--q_lora True needs --use_lora True" in message
    assert "--bf16 and --fp16 are both set" in message
    assert "--lora_r must be positive" in message
    assert "--mlp_tile_tokens must be positive" in message
    if not torch.cuda.is_available():
        assert "--use_liger_kernel True needs a CUDA GPU" in message


def test_existing_checkpoints_are_never_overwritten_silently(tmp_path, tiny_text):
    (tmp_path / "out" / "checkpoint-2").mkdir(parents=True)
    with pytest.raises(SystemExit, match="already holds checkpoints"):
        run(tmp_path, tiny_text, data=DATA / "example_chatml.jsonl")


def test_arguments_from_a_yaml_file(tmp_path):
    from finetune import parse_arguments

    config = tmp_path / "run.yaml"
    config.write_text(
        "model_name_or_path: m\ndata_path: [a.json, b.jsonl]\noutput_dir: out\nuse_lora: true\n"
        "lora_r: 8\nlearning_rate: 2.0e-4\nlr_scheduler_type: cosine\n"
    )
    args = parse_arguments([str(config)])
    assert (args.model.model_name_or_path, args.data.data_path) == ("m", ["a.json", "b.jsonl"])
    assert args.training.use_lora and args.lora.lora_r == 8 and args.training.learning_rate == 2e-4
    args = parse_arguments([str(config), "--lora_r", "16", "--resume_from_checkpoint", "auto"])
    assert args.lora.lora_r == 16 and args.training.resume_from_checkpoint == "auto"  # flags after the file win
    config.write_text("output_dir: out\nlora_rank: 8\n")
    with pytest.raises(SystemExit, match=r"unknown arguments .*lora_rank"):
        parse_arguments([str(config)])


def test_run_args_keep_every_argument_but_secrets(tmp_path, tiny_text):
    """A token-budget run can be repeated from its run_args.json; an access token is never written down."""
    from finetune import parse_arguments
    from tuning.checkpoints import save_run_args

    flags = ["--max_tokens_per_batch", "512", "--mlp_tile_tokens", "300", "--hub_token", "hf_secret"]
    args = parse_arguments(["--model_name_or_path", str(tiny_text), "--output_dir", str(tmp_path), *flags])
    save_run_args(tmp_path, model=args.model, data=args.data, training=args.training, lora=args.lora)
    saved = json.loads((tmp_path / "run_args.json").read_text())
    assert saved["data"]["max_tokens_per_batch"] == 512 and saved["training"]["mlp_tile_tokens"] == 300
    assert saved["training"]["include_num_input_tokens_seen"] == "all"  # packed: every token is real
    assert "average_tokens_across_devices" in saved["training"]
    assert "hf_secret" not in (tmp_path / "run_args.json").read_text() and "hub_token" not in saved["training"]


def test_new_grounding_tokens_train_only_their_rows_and_survive_save_and_merge(tmp_path, tiny_vl):
    from tuning.merge import merge

    trainer, watch = run(tmp_path, tiny_vl, "--use_lora", "True", "--lora_r", "4", "--grounding_format", "qwen-vl")
    token_params = {n for n in watch.trainable if "token_adapter" in n}
    assert token_params and token_params <= watch.changed
    assert not any(n.endswith(("embed_tokens.weight", "lm_head.weight")) for n in watch.trainable)

    out = tmp_path / "out"
    from transformers import AutoProcessor

    tokenizer = AutoProcessor.from_pretrained(out).tokenizer
    tag_ids = tokenizer.convert_tokens_to_ids(["<ref>", "</ref>", "<box>", "</box>"])
    live = trainer.model.get_input_embeddings()
    with torch.no_grad():
        trained_rows = live(torch.tensor([tag_ids])).squeeze(0)
        other = live(torch.tensor([[0, 100, 500]])).squeeze(0)
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["trainable_token_indices"]["embed_tokens"]) == sorted(tag_ids)

    result = merge(out, tmp_path / "merged")
    assert result.max_logit_difference < 1e-4
    from transformers import AutoModelForImageTextToText

    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")
    embedding = merged.get_input_embeddings().weight
    assert torch.allclose(embedding[tag_ids], trained_rows, atol=1e-6)
    assert torch.allclose(embedding[[0, 100, 500]], other, atol=1e-6)
    base = AutoModelForImageTextToText.from_pretrained(tiny_vl).get_input_embeddings().weight
    assert torch.equal(embedding[[0, 100, 500]], base[[0, 100, 500]])  # the rows nobody trained stay as they were


@pytest.mark.parametrize("kind", ["qwen2-vl", "qwen3-vl"])
def test_lora_on_other_qwen_vl_families(tmp_path, kind):
    from tuning.tiny import ensure_tiny

    _, watch = run(tmp_path, ensure_tiny(kind), "--use_lora", "True", "--lora_r", "4")
    assert watch.trainable and watch.changed == watch.trainable
    assert not any("visual" in n and "merger" not in n for n in watch.trainable)
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_eval_loss_and_sample_answers_during_training(tmp_path, tiny_vl):
    trainer, _ = run(
        tmp_path,
        tiny_vl,
        "--use_lora",
        "True",
        "--lora_r",
        "4",
        "--eval_data_path",
        str(DATA / "example_openai.jsonl"),
        "--eval_steps",
        "2",
        "--sample_steps",
        "2",
        "--sample_prompts",
        "你好",
        f"{DATA / 'images' / 'dog.png'}::What is this?",
    )
    history = trainer.state.log_history
    assert [e["step"] for e in history if "eval_loss" in e] == [2, 4]
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert [(s["step"], s["prompt"]) for s in samples] == [
        (2, "你好"),
        (2, "What is this?"),
        (4, "你好"),
        (4, "What is this?"),
    ]
    assert samples[1]["image"].endswith("dog.png")


def test_tensorboard_logs_when_asked(tmp_path, tiny_text):
    run(tmp_path, tiny_text, "--report_to", "tensorboard", data=DATA / "example_chatml.jsonl")
    assert list((tmp_path / "out").rglob("events.out.tfevents.*"))


def test_chatml_rows_left_at_zero_in_a_base_model_are_found_and_trained(tmp_path, tiny_text, caplog):
    """A base model whose ChatML rows never trained (here: set to zero, as in a checkpoint that reserved them):
    the rows are chosen by looking at them, not at the model's name, and only they train."""
    import logging
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tmp_path / "base-model"
    model = AutoModelForCausalLM.from_pretrained(tiny_text)
    tokenizer = AutoTokenizer.from_pretrained(tiny_text)
    chatml = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    with torch.no_grad():
        model.get_input_embeddings().weight[chatml] = 0
    model.save_pretrained(base)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny_text / name).is_file():
            shutil.copy(tiny_text / name, base / name)

    with caplog.at_level(logging.INFO):
        trainer, watch = run(tmp_path, base, "--use_lora", "True", "--lora_r", "4", data=DATA / "example_chatml.jsonl")
    assert "training the embedding rows of tokens ['<|im_start|>', '<|im_end|>']" in caplog.text
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert sorted(config["trainable_token_indices"]["embed_tokens"]) == sorted(chatml)
    rows = trainer.model.get_input_embeddings()(torch.tensor([chatml])).squeeze(0)
    assert rows.abs().sum() > 0 and any("token_adapter" in n for n in watch.changed)  # they learned something
    assert not any(n.endswith("embed_tokens.weight") for n in watch.trainable)  # only those rows, not the matrix

    caplog.clear()
    with caplog.at_level(logging.INFO):  # the same model with trained rows: nothing extra trains
        run(tmp_path / "chat", tiny_text, "--use_lora", "True", "--lora_r", "4", data=DATA / "example_chatml.jsonl")
    assert "training the embedding rows" not in caplog.text


def test_training_on_a_cpu_returns_large_freed_blocks(tmp_path, tiny_text, caplog):
    """The trainer fixes glibc's threshold on a CPU (what it does to the memory: tests/test_host_memory.py)."""
    import logging

    from tuning.runtime import is_glibc, user_set_threshold

    with caplog.at_level(logging.INFO):
        run(tmp_path, tiny_text, data=DATA / "example_chatml.jsonl")
    said = "host memory: blocks of 4 MiB and more are returned when freed" in caplog.text
    assert said == (is_glibc() and not user_set_threshold())


def test_length_grouped_sampling_with_dynamic_padding(tmp_path, tiny_text):
    trainer, watch = run(
        tmp_path,
        tiny_text,
        "--packing",
        "False",
        "--train_sampling_strategy",
        "group_by_length",
        data=DATA / "example_chatml.jsonl",
    )
    assert type(trainer._get_train_sampler()).__name__ == "LengthGroupedSampler"
    assert watch.changed == watch.trainable


def test_lora_on_a_gptq_checkpoint_trains_and_merges_into_the_unquantized_base(
    tmp_path, tiny_gptq, tiny_text_trained_scale
):
    from finetune import parse_arguments
    from tuning.merge import merge

    trainer, watch = run(tmp_path, tiny_gptq, "--use_lora", "True", "--lora_r", "8", data=DATA / "example_chatml.jsonl")
    quantized = [m for m in trainer.model.modules() if "BaseQuantLinear" in {c.__name__ for c in type(m).__mro__}]
    assert quantized  # the GPTQ kernels, with the adapters on top
    lora = {n for n in watch.trainable if "lora_" in n}
    assert lora and watch.changed == lora == watch.trainable

    result = merge(tmp_path / "out", tmp_path / "merged", base=str(tiny_text_trained_scale))
    assert result.max_logit_difference < 1e-4  # merged == unquantized base + adapter
    # measured against the GPTQ model + adapter: the int4 rounding of the base is all that differs
    assert result.quantized_difference < 0.2 and result.quantized_top1_agreement > 0.8

    problems = ["--model_name_or_path", str(tiny_gptq), "--output_dir", str(tmp_path / "o"), "--bf16", "True"]
    with pytest.raises(SystemExit) as caught:
        parse_arguments(problems)
    assert "a GPTQ checkpoint computes in fp16" in str(caught.value)
    assert "cannot be fine-tuned in full: add --use_lora True" in str(caught.value)


def test_vision_tower_and_projector_learn_at_their_own_rates(tmp_path, tiny_vl):
    flags = ["--fix_vit", "False", "--learning_rate", "1e-3", "--vision_lr", "1e-5", "--projector_lr", "3e-3"]
    trainer, watch = run(tmp_path, tiny_vl, *flags)
    rates = {g["initial_lr"]: len(g["params"]) for g in trainer.optimizer.param_groups}
    assert set(rates) == {1e-3, 1e-5, 3e-3}
    assert trainer.optimizer.param_groups[0]["initial_lr"] == 1e-3  # the logged rate is the main one

    def mean_change(part: str) -> float:
        changes = [
            (p.detach() - watch.before[n]).abs().mean().item()
            for n, p in trainer.model.named_parameters()
            if part in n and n.endswith("weight") and p.dim() == 2
        ]
        return sum(changes) / len(changes)

    # Adam's steps are about the learning rate in size, whatever the gradient
    assert mean_change("visual.blocks") < 0.1 * mean_change("language_model.layers") < mean_change("visual.merger")


def test_a_chat_template_file_is_used_saved_and_answers_with_it(tmp_path, tiny_text):
    """--chat_template replaces the model's template for training, and the saved model carries it, so the chat
    command (and vLLM) render prompts the way the model was trained."""
    from tests.conftest import REPO
    from tuning.chat import Chat, GenerationSettings, load_for_chat

    template = REPO / "tests" / "fixtures" / "templates" / "qwen2.5.jinja"
    run(tmp_path, tiny_text, "--use_lora", "True", "--chat_template", str(template), data=DATA / "example_chatml.jsonl")
    out = tmp_path / "out"
    report = json.loads((out / "data_report.json").read_text())
    assert report["usable"] == 3
    model, tokenizer, processor = load_for_chat(str(tiny_text), str(out))
    assert tokenizer.chat_template == template.read_text(encoding="utf-8")
    prompt = Chat(model, tokenizer, processor, settings=GenerationSettings(4))._inputs(
        [{"role": "user", "content": "hi"}]
    )
    assert tokenizer.decode(prompt["input_ids"][0]).startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud."
    )


COMMANDS = ["finetune", "tuning.data", "tuning.merge", "tuning.chat", "tuning.demo", "tuning.evaluate", "tuning.tiny"]


@pytest.mark.parametrize("command", COMMANDS)
def test_an_unknown_flag_is_a_usage_error_of_every_command(command, capsys):
    """Exit status 2 and the usage, never a traceback (each command's own required arguments given)."""
    import importlib

    required = {
        "tuning.data": ["--model_name_or_path", "m"],
        "tuning.merge": ["--adapter", "a", "--output", "o"],
        "tuning.chat": ["m"],
        "tuning.evaluate": ["m", "--data", "d"],
    }
    argv = [*required.get(command, []), "--no_such_flag", "1"]
    if command == "finetune":
        from finetune import parse_arguments

        with pytest.raises(SystemExit) as caught:
            parse_arguments(argv)
        code = caught.value.code
    else:
        module = importlib.import_module(command if command != "tuning.data" else "tuning.data.__main__")
        try:
            code = module.main(argv)
        except SystemExit as e:
            code = e.code
    error = capsys.readouterr().err
    assert code == 2 and "usage:" in error and "--no_such_flag" in error and "Traceback" not in error
