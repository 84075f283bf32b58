"""Generate the self-cognition exercise: many ways to ask "who are you", one fixed answer.

    python data/make_identity.py [--out data/generated/identity.json] [--name 小千] [--count 96] [--reasoning]

Train and held-out phrasings are disjoint, so the test asks in words the model never saw. With --reasoning
each answer starts with a short <think>...</think> block, as a reasoning model (Qwen3) writes it.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ANSWER = "我是{name}，由 qwen-tuning 训练的助手。I am {name_en}, an assistant trained with qwen-tuning."
QUESTIONS_ZH = [
    "你是谁？",
    "你叫什么名字？",
    "请介绍一下你自己。",
    "你是什么？",
    "能说说你是谁吗？",
    "你的名字是什么？",
    "介绍下自己吧",
    "你好，你是谁",
    "请问你是哪位？",
    "你是哪个助手？",
    "谁在和我说话？",
    "自我介绍一下",
]
QUESTIONS_EN = [
    "Who are you?",
    "What is your name?",
    "Please introduce yourself.",
    "What are you?",
    "Tell me about yourself.",
    "Who am I talking to?",
    "Introduce yourself, please.",
    "What should I call you?",
    "hi, who are you",
    "Are you an assistant? Who made you?",
    "Your name?",
    "Say who you are.",
]
REASONING = "The user asks who I am. I answer with my name."
HELD_OUT = ["你到底是谁呀？", "Could you tell me who you are?"]
PREFIXES = ["", "你好！", "Hello! ", "嗨，", "Hi there. "]


def samples(name: str, name_en: str, count: int, seed: int = 0, reasoning: bool = False) -> list[dict]:
    rng = random.Random(seed)
    answer = ANSWER.format(name=name, name_en=name_en)
    if reasoning:
        answer = f"<think>\n{REASONING}\n</think>\n\n{answer}"
    questions = QUESTIONS_ZH + QUESTIONS_EN
    out = []
    for i in range(count):
        question = rng.choice(PREFIXES) + questions[i % len(questions)]
        out.append(
            {
                "id": f"identity_{i}",
                "conversations": [{"from": "user", "value": question}, {"from": "assistant", "value": answer}],
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "generated" / "identity.json")
    parser.add_argument("--name", default="小千")
    parser.add_argument("--name_en", default="Xiaoqian")
    parser.add_argument("--count", type=int, default=96)
    parser.add_argument("--reasoning", action="store_true", help="answers start with a <think>...</think> block")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    records = samples(args.name, args.name_en, args.count, reasoning=args.reasoning)
    args.out.write_text(json.dumps(records, ensure_ascii=False, indent=1))
    print(args.out)


if __name__ == "__main__":
    main()
