"""The preference stage: the chunked log-probabilities, every --pref_loss against TRL 1.16, the reference rules and
packed against padded scoring."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tuning.loss import LogitTransform, _LinearTokenLogProbs
from tuning.preference import DPO_LOSSES, PreferenceArguments, Scores, preference_loss

FIXTURES = Path(__file__).parent / "fixtures" / "preference"


def test_chunked_token_log_probs_and_their_gradients_equal_the_full_logits():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=True).double()
    targets = torch.randint(0, 50, (37,))
    upstream = torch.randn(37, dtype=torch.float64)
    for transform in (LogitTransform(), LogitTransform(scale=0.5, cap=3.0)):
        values, means = _LinearTokenLogProbs.apply(hidden, head.weight, head.bias, targets, 8, transform)
        grads = torch.autograd.grad((values * upstream).sum(), [hidden, head.weight, head.bias])
        logits = transform(head(hidden).float()).double()
        expected = logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
        expected_grads = torch.autograd.grad((expected * upstream).sum(), [hidden, head.weight, head.bias])
        assert torch.allclose(values.double(), expected, atol=1e-5)
        assert torch.allclose(means.double(), logits.mean(-1), atol=1e-5)
        for got, want in zip(grads, expected_grads, strict=True):
            assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def scores(seed: int) -> tuple[Scores, Scores]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, 30, (2, 6), generator=g).float()
    policy = -torch.rand(2, 6, generator=g) * tokens * 2
    reference = policy + torch.randn(2, 6, generator=g)
    return Scores(policy[0], policy[1], tokens[0], tokens[1]), Scores(reference[0], reference[1], tokens[0], tokens[1])


def test_orpo_and_simpo_equal_trl_cpo_and_orpo_trainers_on_mean_log_probabilities():
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    policy, _ = scores(1)
    mean = policy.averaged()
    trl = SimpleNamespace(beta=2.0, simpo_gamma=0.5, label_smoothing=0.1, alpha=0.0, loss_type="simpo")
    trl.accelerator = SimpleNamespace(device="cpu")
    ours = preference_loss(
        PreferenceArguments(pref_loss="simpo", pref_beta=2.0, simpo_gamma=0.5, dpo_label_smoothing=0.1), policy, None
    )
    expected, chosen, rejected = CPOTrainer.cpo_loss(trl, mean.chosen, mean.rejected)
    assert torch.allclose(ours.losses, expected, atol=1e-6)
    assert torch.allclose(ours.chosen_rewards, chosen) and torch.allclose(ours.rejected_rewards, rejected)
    trl.beta = 0.1
    ours = preference_loss(PreferenceArguments(pref_loss="orpo", pref_beta=0.1), policy, None)
    losses, chosen, _, ratio, log_odds = ORPOTrainer.odds_ratio_loss(trl, mean.chosen, mean.rejected)
    assert torch.allclose(ours.losses, -losses, atol=1e-6)  # TRL subtracts its term from the NLL
    assert torch.allclose(ours.metrics["log_odds_ratio"], ratio) and torch.allclose(
        ours.metrics["log_odds_chosen"], log_odds
    )


def test_orpo_stays_finite_where_an_answer_is_certain():
    certain = Scores(torch.tensor([0.0, -1e-9]), torch.tensor([-3.0, -1e-12]), torch.ones(2), torch.ones(2))
    result = preference_loss(PreferenceArguments(pref_loss="orpo"), certain, None)
    assert torch.isfinite(result.losses).all()


def test_cdpo_label_smoothing_is_the_flipped_label_mixture():
    policy, reference = scores(2)
    options = PreferenceArguments(pref_loss="sigmoid", pref_beta=0.5, dpo_label_smoothing=0.2)
    logits = 0.5 * ((policy.chosen - reference.chosen) - (policy.rejected - reference.rejected))
    expected = -0.8 * torch.nn.functional.logsigmoid(logits) - 0.2 * torch.nn.functional.logsigmoid(-logits)
    assert torch.allclose(preference_loss(options, policy, reference).losses, expected)


# -- against TRL's DPOTrainer on the same model and batch ------------------------------------------------------


def build(argv: list[str]):
    """A run's trainer, built by finetune.py's phases."""
    from tests.helpers import run_phases

    return run_phases(argv)[2]


def dpo_argv(model: Path, data: Path, out: Path, *flags: str) -> list[str]:
    return [
        "--stage", "dpo", "--model_name_or_path", str(model), "--data_path", str(data), "--output_dir", str(out),
        "--dataset_cache_dir", "none", "--report_to", "none", "--per_device_train_batch_size", "3",
        "--save_strategy", "no", *flags,
    ]  # fmt: skip


def perturb(model, seed: int = 1) -> None:
    """The same small change of every trained weight, by name: the policy moves away from its reference."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda item: item[0]):
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def batch_of(trainer, indices=(0, 1, 2)) -> dict:
    return trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in indices]))


def our_loss(trainer, inputs, **options) -> tuple[float, dict]:
    for name, value in options.items():
        setattr(trainer.preference, name, value)
    trainer.model.train()
    with torch.no_grad():
        loss, metrics = trainer.batch_loss(trainer.model, inputs)
    return loss.item(), {k: v.item() for k, v in metrics.items()}


def trl_config(out: Path, batch: int) -> dict:
    """TRL's config for a parity check on the CPU: fp32, no checkpointing, nothing cut."""
    return dict(
        output_dir=str(out), report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False,
        per_device_train_batch_size=batch, max_length=None,
    )  # fmt: skip


def trl_trainer(trainer_class, config, model_path: Path, data: Path, model=None):
    """A TRL trainer on the records of `data`, with the model of `model_path` (or `model`) in fp32."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    records = [json.loads(line) for line in data.read_text().splitlines()]
    model = model or AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    return trainer_class(model=model, args=config, train_dataset=Dataset.from_list(records), processing_class=tokenizer)


def without_newline(trl, keys: tuple[str, ...]) -> None:
    """TRL's answers without the newline after <|im_end|>, which our rule leaves to the next context."""
    newline = trl.processing_class.convert_tokens_to_ids("Ċ")

    def cut(example):
        assert all(example[key][-1] == newline for key in keys)
        return {key: example[key][:-1] for key in keys}

    trl.train_dataset = trl.train_dataset.map(cut)


@pytest.fixture(scope="module")
def trl_and_ours(tiny_text, tmp_path_factory):
    """TRL 1.16's DPOTrainer and ours, full fine-tuning on the tiny Qwen2 (ChatML, a system prompt and history), the
    policies moved alike from their references. TRL's answers end with the newline after <|im_end|>, which our rule
    leaves to the next context (as in SFT): it is taken out of TRL's answers, so both score the same tokens."""
    from trl import DPOConfig, DPOTrainer

    out = tmp_path_factory.mktemp("dpo")
    data = FIXTURES / "trl_conversational.jsonl"
    trl = trl_trainer(DPOTrainer, DPOConfig(**trl_config(out / "trl", 3), beta=0.1), tiny_text, data)
    without_newline(trl, ("chosen_ids", "rejected_ids"))
    ours = build(dpo_argv(tiny_text, data, out / "ours"))
    for trainer in (trl, ours):
        perturb(trainer.model)
    return trl, ours


def trl_loss(trl, loss_type: str, **options) -> tuple[float, dict]:
    trl.loss_types, trl.loss_weights = [loss_type], [1.0]
    for name, value in options.items():
        setattr(trl, name, value)
    return trl_step(trl, 3)


def trl_step(trl, count: int) -> tuple[float, dict]:
    """A TRL trainer's loss and logged metrics on its first `count` items, without training."""
    inputs = trl._prepare_inputs(trl.data_collator([trl.train_dataset[i] for i in range(count)]))
    trl.model.train()  # TRL files the metrics of a model in training mode under "train"
    trl._metrics["train"].clear()
    with torch.no_grad():
        loss = trl.compute_loss(trl.model, inputs)
    return loss.item(), {k: v[-1] for k, v in trl._metrics["train"].items()}


METRICS = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen"]
METRICS += ["logps/rejected", "logits/chosen", "logits/rejected"]


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", DPO_LOSSES)
def test_each_dpo_loss_and_its_metrics_equal_trl(trl_and_ours, loss_type):
    trl, ours = trl_and_ours
    expected, trl_metrics = trl_loss(trl, loss_type)
    got, metrics = our_loss(ours, batch_of(ours), pref_loss=loss_type)
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-5)  # sppo_hard squares log-ratios of about 12
    for key in METRICS:
        assert metrics[key] == pytest.approx(trl_metrics[key], abs=1e-4), key
    assert metrics["rewards/margins"] != 0  # the policies really moved


@pytest.mark.slow
def test_ld_dpo_robust_smoothing_and_the_sft_term_equal_trl(trl_and_ours):
    trl, ours = trl_and_ours
    expected, _ = trl_loss(trl, "sigmoid", ld_alpha=0.3)
    assert our_loss(ours, batch_of(ours), pref_loss="sigmoid", ld_alpha=0.3)[0] == pytest.approx(expected, abs=1e-5)
    expected, _ = trl_loss(trl, "robust", ld_alpha=None, label_smoothing=0.2)
    got, _ = our_loss(ours, batch_of(ours), pref_loss="robust", ld_alpha=None, dpo_label_smoothing=0.2)
    assert got == pytest.approx(expected, abs=1e-5)
    trl.label_smoothing = 0.0
    sigmoid, _ = trl_loss(trl, "sigmoid")
    sft, _ = trl_loss(trl, "sft")  # TRL's rpo: ["sigmoid", "sft"] weighted [1, alpha]
    got, metrics = our_loss(ours, batch_of(ours), pref_loss="sigmoid", dpo_label_smoothing=0.0, pref_ftx=0.5)
    assert got == pytest.approx(sigmoid + 0.5 * sft, abs=1e-5)
    assert metrics["nll_loss"] == pytest.approx(sft, abs=1e-5)
    ours.preference.pref_ftx = 0.0


@pytest.mark.slow
def test_at_the_start_the_loss_is_ln2_and_the_rewards_zero(tiny_text, tmp_path):
    trainer = build(dpo_argv(tiny_text, FIXTURES / "trl_conversational.jsonl", tmp_path, "--use_lora", "True"))
    loss, metrics = our_loss(trainer, batch_of(trainer))
    assert loss == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["rewards/chosen"] == metrics["rewards/rejected"] == metrics["rewards/margins"] == 0


# -- the reference ----------------------------------------------------------------------------------------------


def sequence_scores(model, inputs) -> torch.Tensor:
    from tuning.preference import scores_of, sequence_log_probs

    with torch.no_grad():
        values, sequences, _ = sequence_log_probs(model, inputs)
    found = scores_of(values, sequences, len(inputs["margin"]))
    return torch.stack([found.chosen, found.rejected], 1)


@pytest.mark.slow
def test_the_reference_is_the_starting_weights(tiny_text, tmp_path):
    from transformers import AutoModelForCausalLM

    data = FIXTURES / "trl_conversational.jsonl"
    from tuning.attention import attend_per_sample

    base = AutoModelForCausalLM.from_pretrained(tiny_text, dtype=torch.float32)
    attend_per_sample(base)  # it reads packed rows, as the policy does
    # a fresh adapter: the reference is the model with it switched off, which is the base
    fresh = build(dpo_argv(tiny_text, data, tmp_path / "fresh", "--use_lora", "True", "--lora_alpha", "64"))
    perturb(fresh.model)  # the adapter moved: the reference must not
    inputs = batch_of(fresh)
    with fresh.reference.forward_of(fresh.model) as reference:
        switched_off = sequence_scores(reference, inputs)
    assert torch.allclose(switched_off, sequence_scores(base, inputs), atol=1e-5)
    assert not torch.allclose(sequence_scores(fresh.model, inputs), switched_off)
    # continuing from an adapter: the reference is that adapter's model, computed before the first step
    fresh.model.save_pretrained(tmp_path / "adapter")
    flags = ["--use_lora", "True", "--lora_weight_path", str(tmp_path / "adapter"), "--max_steps", "1"]
    continued = build(dpo_argv(tiny_text, data, tmp_path / "continued", *flags))
    assert continued.reference.kind == "policy" and continued.reference.precompute
    starting = sequence_scores(continued.model.eval(), inputs)
    continued.train()
    assert torch.allclose(continued.train_dataset.reference_log_probs, starting, atol=1e-5)
    assert not torch.allclose(starting, sequence_scores(base, inputs), atol=1e-3)  # not the bare base
    # full fine-tuning: a frozen copy of the starting model
    full = build(dpo_argv(tiny_text, data, tmp_path / "full"))
    perturb(full.model)
    assert torch.allclose(sequence_scores(full.reference.model, inputs), sequence_scores(base, inputs), atol=1e-5)


@pytest.mark.slow
def test_precomputed_and_live_references_train_alike(tiny_text, tmp_path):
    data = FIXTURES / "trl_conversational.jsonl"
    losses = []
    for precompute in ("False", "True"):
        flags = [
            "--use_lora",
            "True",
            "--max_steps",
            "3",
            "--learning_rate",
            "1e-2",
            "--seed",
            "3",
            "--logging_steps",
            "1",
        ]
        trainer = build(
            dpo_argv(tiny_text, data, tmp_path / precompute, *flags, "--precompute_ref_log_probs", precompute)
        )
        trainer.train()
        losses.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    assert losses[0][0] == pytest.approx(math.log(2), abs=1e-5) and losses[0][-1] != losses[0][0]


# -- packed and padded ------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["text", "vl"])
def test_packed_and_padded_pairs_score_alike(tiny_text, tiny_vl, tmp_path, kind):
    model, data = (tiny_text, "trl_conversational.jsonl") if kind == "text" else (tiny_vl, "trl_vision.jsonl")
    found = []
    for packing in ("True", "False"):
        trainer = build(
            dpo_argv(model, FIXTURES / data, tmp_path / packing, "--use_lora", "True", "--packing", packing)
        )
        perturb(trainer.model)
        inputs = batch_of(trainer)
        assert (inputs["input_ids"].shape[0] == 1) == (packing == "True")
        found.append(sequence_scores(trainer.model.eval(), inputs))
    assert torch.allclose(found[0], found[1], atol=1e-5), found


# -- KTO ------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_kto_loss_kl_and_rewards_equal_trl(tiny_text, tmp_path):
    """TRL's KTOTrainer and ours on the same four unpaired completions (one batch: the KL term pairs each prompt with
    the completion before it in both), policies moved alike; TRL's newline after <|im_end|> taken out as for DPO."""
    from trl import KTOConfig, KTOTrainer

    data = FIXTURES / "trl_unpaired_conversational.jsonl"
    trl = trl_trainer(KTOTrainer, KTOConfig(**trl_config(tmp_path / "trl", 4), beta=0.1), tiny_text, data)
    without_newline(trl, ("completion_ids", "KL_completion_ids"))
    flags = ["--stage", "kto", "--per_device_train_batch_size", "4"]
    ours = build([*dpo_argv(tiny_text, data, tmp_path / "ours")[2:], *flags])
    for trainer in (trl, ours):
        perturb(trainer.model)
    expected, trl_metrics = trl_step(trl, 4)
    ours.model.train()
    with torch.no_grad():
        loss, metrics = ours.batch_loss(ours.model, batch_of(ours, range(4)))
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert metrics["kl"].item() == pytest.approx(trl_metrics["kl"], abs=1e-4)
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        total, count = metrics[key]
        assert (total / count).item() == pytest.approx(trl_metrics[key], abs=1e-4), key


# -- reward models ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_reward_loss_with_margins_equals_trl(tiny_text, tmp_path):
    """TRL's RewardTrainer and ours on the same sequence classifier and pairs (with a margin each): the same loss,
    accuracy and margin; both read the reward at the last token (the newline after <|im_end|> in ChatML)."""
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    data = FIXTURES / "trl_reward_margin.jsonl"
    ours = build([*dpo_argv(tiny_text, data, tmp_path / "ours")[2:], "--stage", "rm", "--packing", "True"])
    model = AutoModelForSequenceClassification.from_pretrained(tiny_text, num_labels=1, dtype=torch.float32)
    model.load_state_dict(ours.model.state_dict())  # the same random score head
    config = RewardConfig(**trl_config(tmp_path / "trl", 3), center_rewards_coefficient=0.01)
    trl = trl_trainer(RewardTrainer, config, tiny_text, data, model)
    for trainer in (trl, ours):
        perturb(trainer.model)
    expected, trl_metrics = trl_step(trl, 3)
    loss, metrics = our_loss(ours, batch_of(ours), center_rewards_coefficient=0.01)
    assert loss == pytest.approx(expected, abs=1e-5)
    for key in ("accuracy", "margin", "mean_reward"):
        assert metrics[key] == pytest.approx(trl_metrics[key], abs=1e-4), key


@pytest.mark.slow
@pytest.mark.parametrize("lora", ["True", "False"])
def test_a_trained_reward_model_loads_as_a_sequence_classifier_and_scores_as_in_training(tiny_text, tmp_path, lora):
    from transformers import AutoModelForSequenceClassification

    from tuning.preference import sequence_rewards
    from tuning.reward import RewardModel

    data = FIXTURES / "trl_conversational.jsonl"
    flags = ["--stage", "rm", "--use_lora", lora, "--max_steps", "2", "--learning_rate", "1e-2"]
    from finetune import train

    trainer = train([*dpo_argv(tiny_text, data, tmp_path / "rm")[2:], *flags])  # trained and saved
    trainer.model.eval()
    inputs = batch_of(trainer)
    with torch.no_grad():
        trained = sequence_rewards(trainer.model, inputs)
    record = json.loads(data.read_text().splitlines()[1])  # a system prompt and history
    scorer = RewardModel(str(tmp_path / "rm"))
    chosen = scorer.score(record["prompt"] + record["chosen"])
    assert chosen == pytest.approx(trained[2].item(), abs=1e-4)
    if lora == "False":
        classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
        assert classifier.config.num_labels == 1 and classifier.config.pad_token_id is not None


@pytest.mark.slow
@pytest.mark.parametrize("projector", ["True", "False"])
def test_a_pairs_pictures_go_through_the_tower_once(tiny_vl, tmp_path, projector):
    """Both answers of a pair (and, with the vision side frozen, the reference too) take the features of one pass
    of the tower over the pair's pictures; the scores equal those of the answers each seeing the pixels."""
    from tuning.preference import sequence_log_probs

    flags = ["--use_lora", "True", "--tune_projector", projector]
    trainer = build(dpo_argv(tiny_vl, FIXTURES / "trl_vision.jsonl", tmp_path, *flags))
    perturb(trainer.model)
    inputs = batch_of(trainer)
    pictures = len(inputs["image_grid_thw"]) // 2
    visual = trainer.model.get_base_model().model.visual
    seen = []
    hook = visual.register_forward_hook(
        lambda module, args, kwargs, output: seen.append(len(kwargs["grid_thw"])), with_kwargs=True
    )  # the pictures of each pass
    try:
        trainer.model.eval()  # no dropout: the two ways below must see the same model
        with torch.no_grad():
            _, metrics = trainer.batch_loss(trainer.model, inputs)
    finally:
        hook.remove()
    # policy once a pair; the reference again only where the projector trains (its features then differ)
    assert seen == ([pictures] if projector == "False" else [pictures, pictures])
    with torch.no_grad():
        values, sequences, _ = sequence_log_probs(trainer.model, inputs)  # every answer through the tower
    from tuning.preference import scores_of

    alone = scores_of(values, sequences, len(inputs["margin"]))
    assert metrics["logps/chosen"].item() == pytest.approx(alone.chosen.mean().item(), abs=1e-4)
    assert metrics["logps/rejected"].item() == pytest.approx(alone.rejected.mean().item(), abs=1e-4)


@pytest.mark.slow
def test_an_moe_models_router_loss_trains_with_the_preference_loss(tmp_path):
    """As TRL adds it: the router's load-balancing loss at --moe_aux_loss_coef (default: the config's), logged as
    aux_loss."""
    from tuning.tiny import ensure_tiny

    flags = ["--use_lora", "True", "--lora_dropout", "0"]
    trainer = build(dpo_argv(ensure_tiny("qwen3-moe"), FIXTURES / "trl_conversational.jsonl", tmp_path, *flags))
    inputs = batch_of(trainer)
    weight = trainer.router_loss_weight
    assert weight
    with_router, metrics = our_loss(trainer, inputs)
    trainer.router_loss_weight = None
    without, plain = our_loss(trainer, inputs)
    assert "aux_loss" not in plain and metrics["aux_loss"] > 0
    assert with_router == pytest.approx(without + weight * metrics["aux_loss"], abs=1e-6)


@pytest.mark.slow
def test_kto_continuing_from_an_adapter_keeps_it_as_the_reference(tiny_text, tmp_path):
    from finetune import train
    from tuning.preference import sequence_log_probs

    start = build(dpo_argv(tiny_text, FIXTURES / "trl_conversational.jsonl", tmp_path / "start", "--use_lora", "True"))
    perturb(start.model)  # an adapter that is not the base
    start.model.save_pretrained(tmp_path / "adapter")
    data = FIXTURES / "trl_unpaired_conversational.jsonl"
    flags = ["--stage", "kto", "--per_device_train_batch_size", "4", "--use_lora", "True"]
    flags += ["--lora_weight_path", str(tmp_path / "adapter"), "--max_steps", "2", "--learning_rate", "1e-2"]
    trainer = train([*dpo_argv(tiny_text, data, tmp_path / "kto")[2:], *flags])
    inputs = batch_of(trainer, range(4))
    trainer.model.eval()
    with torch.no_grad(), trainer.reference.forward_of(trainer.model) as reference:
        values, _, _ = sequence_log_probs(reference, inputs)
    kept = build([*dpo_argv(tiny_text, data, tmp_path / "again")[2:], *flags])  # the starting adapter, untrained
    kept.model.eval()
    with torch.no_grad():
        expected, _, _ = sequence_log_probs(kept.model, inputs)
    assert torch.allclose(values, expected, atol=1e-5)
    with torch.no_grad():
        trained, _, _ = sequence_log_probs(trainer.model, inputs)
    assert not torch.allclose(trained, expected, atol=1e-3)  # the trained adapter moved; its reference did not
    assert (tmp_path / "kto" / "adapter_model.safetensors").is_file() and not (tmp_path / "kto" / "reference").exists()


@pytest.mark.slow
def test_a_reference_model_of_its_own_reads_packed_rows_as_the_policy_does(tiny_text, tmp_path):
    """--ref_model: loaded as the policy is (its attention per packed sample too), frozen; here the same weights, so
    the loss starts at ln 2."""
    flags = ["--use_lora", "True", "--ref_model", str(tiny_text)]
    trainer = build(dpo_argv(tiny_text, FIXTURES / "trl_conversational.jsonl", tmp_path, *flags))
    assert trainer.reference.kind == "model" and not any(p.requires_grad for p in trainer.reference.model.parameters())
    loss, _ = our_loss(trainer, batch_of(trainer))
    assert loss == pytest.approx(math.log(2), abs=1e-6)
