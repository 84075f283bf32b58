"""Build tiny, random-weight Qwen-family models offline, with a real tokenizer and processor.

    python -m tuning.tiny --kind vl --out models/tiny-qwen2.5-vl

The folders load with the Auto classes exactly like a hub checkpoint, so every launcher, the demo
and the tests run the real loading code without a download. Builds are deterministic: the same
arguments give byte-identical weight files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

# Qwen's own special tokens, in the order Qwen2/Qwen2.5-VL number them (after the BPE vocabulary).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# The ChatML template that Qwen2-VL and Qwen2.5-VL ship in their tokenizer and processor configs:
# a default system turn, image/video parts, and "Picture N: " labels when add_vision_id is set.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3 adds these as ordinary (not special) tokens: the template writes them, the model generates them.
QWEN3_TOKENS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>")

# Qwen2's pre-tokenizer split: letters, single digits, punctuation runs, newlines, spaces.
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

KINDS = {
    "text": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen2-vl": "Qwen2VLForConditionalGeneration",
    "qwen3-vl": "Qwen3VLForConditionalGeneration",
}

TEXT_KINDS = ("text", "qwen3")

DEFAULT_ROOT = Path(__file__).resolve().parent.parent / "models"


@dataclass(frozen=True)
class TinySpec:
    """Everything a tiny build depends on; its hash names the build so a stale folder is rebuilt."""

    kind: str = "vl"
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    vision_hidden_size: int = 32
    vision_depth: int = 2
    bpe_vocab_size: int = 2048
    # Larger than the usual 0.02: with so few, so narrow layers a 0.02 model keeps near-flat logits, its
    # loss barely moves and it cannot learn a colour from a picture (measured: 37% vs 100%, chance 33%).
    initializer_range: float = 0.2
    seed: int = 0
    # Embedding rows; None: the tokenizer's size rounded up to 64. A benchmark sets Qwen's real 151,936, where the
    # logits are the memory (the rows past the tokenizer are never seen, as in the real checkpoints).
    vocab_size: int | None = None
    # Small images keep tests fast: at most 64 merged vision tokens per picture.
    min_pixels: int = 4 * 28 * 28
    max_pixels: int = 64 * 28 * 28

    def fingerprint(self) -> str:
        corpus = _corpus_text().encode()
        fields = {k: v for k, v in asdict(self).items() if v is not None}  # an unset option keeps older builds current
        blob = json.dumps(fields, sort_keys=True).encode() + corpus + chat_template(self.kind).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _corpus_text() -> str:
    return resources.files("tuning").joinpath("assets/tiny_corpus.txt").read_text(encoding="utf-8")


def chat_template(kind: str) -> str:
    """Qwen2.5-VL's ChatML template, or for the Qwen3 kind the official Qwen3 template (thinking, tools), as
    shipped in Qwen3's tokenizer_config.json."""
    if kind != "qwen3":
        return CHAT_TEMPLATE
    asset = resources.files("tuning").joinpath("assets/qwen3_chat_template.jinja")
    return asset.read_text(encoding="utf-8").rstrip("\n")


def build_tokenizer(spec: TinySpec):
    """Train a byte-level BPE on the shipped corpus and wrap it as Qwen2's tokenizer class."""
    from transformers import AddedToken, Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.bpe_vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus_text().splitlines(), trainer=trainer)
    trained = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    vocab = dict(trained["vocab"])
    for token in SPECIAL_TOKENS:  # numbered here so the ids follow Qwen's order, not the wrapper's
        vocab[token] = len(vocab)

    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
    )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]}
    )
    if spec.kind == "qwen3":
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN3_TOKENS])
    tokenizer.chat_template = chat_template(spec.kind)
    return tokenizer


def _padded_vocab(tokenizer) -> int:
    # Real Qwen checkpoints have more embedding rows than tokens (151936 vs 151665); keep that shape
    # so code that confuses len(tokenizer) with vocab_size fails on the tiny model too.
    return (len(tokenizer) + 63) // 64 * 64


def _text_fields(spec: TinySpec, tokenizer) -> dict:
    return {
        "vocab_size": spec.vocab_size or _padded_vocab(tokenizer),
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "max_position_embeddings": 4096,
        "initializer_range": spec.initializer_range,
        "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        "pad_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    }


def _vision_token_ids(tokenizer) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return {
        "image_token_id": ids("<|image_pad|>"),
        "video_token_id": ids("<|video_pad|>"),
        "vision_start_token_id": ids("<|vision_start|>"),
        "vision_end_token_id": ids("<|vision_end|>"),
    }


def _mrope_section(head_dim: int) -> list[int]:
    # Qwen's multimodal rope splits head_dim/2 rotary frequencies over (time, height, width)
    # in the proportions 2:3:3 (16, 24, 24 for head_dim 128).
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def build_config(spec: TinySpec, tokenizer):
    import transformers as tf

    text = _text_fields(spec, tokenizer)
    head_dim = spec.hidden_size // spec.num_heads
    mrope = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": _mrope_section(head_dim)}
    vision = {"depth": spec.vision_depth, "num_heads": 2, "initializer_range": spec.initializer_range}
    if spec.kind == "text":
        return tf.Qwen2Config(**text, tie_word_embeddings=True, rope_parameters={"rope_theta": 1000000.0})
    if spec.kind == "qwen3":
        return tf.Qwen3Config(
            **text, head_dim=head_dim, tie_word_embeddings=True, rope_parameters={"rope_theta": 1000000.0}
        )
    if spec.kind == "vl":
        vision_config = {
            **vision,
            "hidden_size": spec.vision_hidden_size,
            "intermediate_size": 2 * spec.vision_hidden_size,
            "out_hidden_size": spec.hidden_size,
            "window_size": 112,
            "fullatt_block_indexes": [spec.vision_depth - 1],
        }
        return tf.Qwen2_5_VLConfig(
            text_config={**text, "rope_parameters": mrope},
            vision_config=vision_config,
            tie_word_embeddings=True,
            **_vision_token_ids(tokenizer),
        )
    if spec.kind == "qwen2-vl":
        vision_config = {
            **vision,
            "embed_dim": spec.vision_hidden_size,
            "hidden_size": spec.hidden_size,
            "mlp_ratio": 2,
        }
        return tf.Qwen2VLConfig(
            text_config={**text, "rope_parameters": mrope},
            vision_config=vision_config,
            tie_word_embeddings=True,
            **_vision_token_ids(tokenizer),
        )
    if spec.kind == "qwen3-vl":
        text3 = {**text, "head_dim": head_dim, "rope_parameters": {**mrope, "mrope_interleaved": True}}
        text3.pop("bos_token_id")
        text3.pop("eos_token_id")
        vision_config = {
            **vision,
            "hidden_size": spec.vision_hidden_size,
            "intermediate_size": 2 * spec.vision_hidden_size,
            "out_hidden_size": spec.hidden_size,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0],
        }
        return tf.Qwen3VLConfig(
            text_config=text3, vision_config=vision_config, tie_word_embeddings=True, **_vision_token_ids(tokenizer)
        )
    raise ValueError(f"unknown kind {spec.kind!r}; choose one of {', '.join(KINDS)}")


def build_processor(spec: TinySpec, tokenizer):
    import transformers as tf

    sizes = {"min_pixels": spec.min_pixels, "max_pixels": spec.max_pixels}
    if spec.kind == "qwen3-vl":
        patch = 16
        image_processor = tf.Qwen2VLImageProcessor(**sizes, patch_size=patch)
        video_processor = tf.Qwen3VLVideoProcessor(patch_size=patch)
        return tf.Qwen3VLProcessor(image_processor, tokenizer, video_processor, chat_template=CHAT_TEMPLATE)
    image_processor = tf.Qwen2VLImageProcessor(**sizes)
    video_processor = tf.Qwen2VLVideoProcessor()
    processor_class = tf.Qwen2_5_VLProcessor if spec.kind == "vl" else tf.Qwen2VLProcessor
    return processor_class(image_processor, tokenizer, video_processor, chat_template=CHAT_TEMPLATE)


def build(spec: TinySpec, out: Path) -> Path:
    """Build the model, tokenizer and (for vision-language kinds) processor into `out`."""
    import transformers as tf

    tokenizer = build_tokenizer(spec)
    config = build_config(spec, tokenizer)
    torch.manual_seed(spec.seed)
    model_class = getattr(tf, KINDS[spec.kind])
    model = model_class(config).eval()
    eos = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    model.generation_config = tf.GenerationConfig(eos_token_id=eos, pad_token_id=eos[1], do_sample=False)

    # Write next to the target and rename, so an interrupted build never leaves a half folder.
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    model.save_pretrained(staging)
    if spec.kind in TEXT_KINDS:
        tokenizer.save_pretrained(staging)
    else:
        build_processor(spec, tokenizer).save_pretrained(staging)
    (staging / "tiny_spec.json").write_text(
        json.dumps({**asdict(spec), "fingerprint": spec.fingerprint()}, indent=2) + "\n"
    )
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return out


def is_current(spec: TinySpec, folder: Path) -> bool:
    stamp = folder / "tiny_spec.json"
    if not (stamp.is_file() and (folder / "model.safetensors").is_file()):
        return False
    return json.loads(stamp.read_text()).get("fingerprint") == spec.fingerprint()


def default_folder(kind: str) -> Path:
    names = {
        "text": "tiny-qwen2",
        "qwen3": "tiny-qwen3",
        "vl": "tiny-qwen2.5-vl",
        "qwen2-vl": "tiny-qwen2-vl",
        "qwen3-vl": "tiny-qwen3-vl",
    }
    return DEFAULT_ROOT / names[kind]


def ensure_tiny(kind: str = "vl", out: Path | None = None, **sizes) -> Path:
    """Return the folder of a tiny model, building it only when missing or stale."""
    spec = TinySpec(kind=kind, **sizes)
    folder = Path(out) if out else default_folder(kind)
    if not is_current(spec, folder):
        build(spec, folder)
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--kind", choices=sorted(KINDS), default="vl", help="text = Qwen2, qwen3 = Qwen3, vl = Qwen2.5-VL"
    )
    parser.add_argument("--out", type=Path, help="target folder (default: models/tiny-<family>)")
    parser.add_argument("--force", action="store_true", help="rebuild even if an identical build is there")
    for field in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
        parser.add_argument(f"--{field}", type=int, default=getattr(TinySpec, field), help="(default %(default)s)")
    parser.add_argument("--initializer_range", type=float, default=TinySpec.initializer_range)
    args = parser.parse_args(argv)
    sizes = {k: v for k, v in vars(args).items() if k not in ("kind", "out", "force")}
    spec = TinySpec(kind=args.kind, **sizes)
    folder = args.out or default_folder(args.kind)
    if args.force or not is_current(spec, folder):
        build(spec, folder)
        print(f"built {KINDS[args.kind]} in {folder}")
    else:
        print(f"up to date: {folder}")


if __name__ == "__main__":
    main()
