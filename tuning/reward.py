"""Score conversations with a reward model that --stage rm trained (a full model, or an adapter over its base).

    python -m tuning.reward output/rm --messages '[{"role": "user", "content": "Hi"}, {"role": "assistant", ...}]'
    python -m tuning.reward output/rm-lora --data pairs.jsonl     # each pair's chosen and rejected reward

A conversation is encoded exactly as training encoded it (tuning.data.encode: the chat template, the answer to its
end of turn and what follows it), and its reward is the score head's value at its last token, where training read
it. The folder is also a transformers sequence classifier with one label:
AutoModelForSequenceClassification.from_pretrained(folder) (an adapter: PeftModel.from_pretrained over the base).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from tuning.data.encode import Encoder
from tuning.data.errors import DataError
from tuning.data.formats import iter_conversations, parse_record
from tuning.data.processing import load_run_processing


class RewardModel:
    """A trained reward model and the encoder of its tokenizer and template."""

    def __init__(self, path: str, adapter: str | None = None):
        from transformers import AutoModelForSequenceClassification

        if adapter is None and (Path(path) / "adapter_config.json").is_file():  # the folder of a LoRA run
            adapter = path
            path = json.loads((Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"]
        model_path = path
        self.model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1)
        if adapter:
            from tuning.model import load_adapter

            self.model = load_adapter(self.model, adapter)
        self.model.eval()
        loaded = load_run_processing(model_path, adapter)
        self.encoder = Encoder(loaded.tokenizer, loaded.processor, family=loaded.family, max_length=10**9)

    @torch.no_grad()
    def score(self, messages: list[dict]) -> float:
        """The reward of a conversation that ends with the answer to judge (OpenAI-style messages)."""
        conv = parse_record({"messages": messages}, "<messages>", "conversation", 0)
        return self.score_ids(self.encoder.encode(conv)[-1].input_ids)

    @torch.no_grad()
    def score_ids(self, ids: list[int]) -> float:
        return float(self.model(input_ids=torch.tensor([ids])).logits.reshape(()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="the --output_dir of a --stage rm run (a model or an adapter)")
    parser.add_argument("--adapter", default=None, help="an adapter to put over MODEL")
    found = parser.add_mutually_exclusive_group(required=True)
    found.add_argument("--messages", help="a JSON list of messages ending with the answer to score")
    found.add_argument("--data", help="preference data (any format --stage rm reads): each pair's two rewards")
    args = parser.parse_args(argv)
    rewards = RewardModel(args.model, args.adapter)
    if args.messages:
        print(f"{rewards.score(json.loads(args.messages)):.4f}")
        return 0
    for conv in iter_conversations([args.data], stage="rm"):
        if isinstance(conv, DataError):
            print(conv, file=sys.stderr)
            return 1
        pair = [rewards.score_ids(s.input_ids) for s in rewards.encoder.encode(conv)]
        print(json.dumps({"id": conv.id, "chosen": round(pair[0], 4), "rejected": round(pair[1], 4)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
