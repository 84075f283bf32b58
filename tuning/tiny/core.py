"""What every tiny build shares: the spec (its hash names the build), the registry of kinds, a byte-level BPE
trained on the shipped corpus, and the build itself (written beside the target, then renamed).

A kind is one family's builder: given the spec it returns the config, the tokenizer and, for a vision-language
family, the processor, in that family's own shape. Qwen's kinds live in tuning/tiny/qwen.py, other families in
tuning/tiny/text.py and tuning/tiny/vision.py; each registers itself with `kind(...)`.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

DEFAULT_ROOT = Path(__file__).resolve().parent.parent.parent / "models"

# Qwen2's pre-tokenizer split: letters, single digits, punctuation runs, newlines, spaces.
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


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
        corpus = corpus_text().encode()
        fields = {k: v for k, v in asdict(self).items() if v is not None}  # an unset option keeps older builds current
        blob = json.dumps(fields, sort_keys=True).encode() + corpus + KINDS[self.kind].fingerprint().encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class Parts:
    """What a kind's builder returns: the model is made from `config` (then `init` adjusts its random weights),
    and `processor` (or, for a text model, `tokenizer`) is saved beside it."""

    config: object
    tokenizer: object
    processor: object | None = None
    init: Callable | None = None  # e.g. a projector or gate that starts at zero, which would hide every picture
    stop_tokens: tuple[str, ...] = ()  # generation stops at these (the first is the end of a turn)
    pad_token: str | None = None


@dataclass(frozen=True)
class Kind:
    name: str
    model_class: str  # the transformers class the folder loads as
    folder: str  # under models/
    make: Callable[[TinySpec], Parts] = field(compare=False)
    template: str = ""  # the chat template text (part of the fingerprint)
    vision: bool = False
    summary: str = ""

    def fingerprint(self) -> str:
        # the builder's own source: a change to how the family is built is a new build
        source = inspect.getsource(inspect.getmodule(self.make))
        return hashlib.sha256((self.template + source).encode()).hexdigest()


KINDS: dict[str, Kind] = {}


def kind(name: str, model_class: str, folder: str, *, template: str = "", vision: bool = False, summary: str = ""):
    """Register the decorated builder as the tiny kind `name`."""

    def register(make: Callable[[TinySpec], Parts]) -> Callable[[TinySpec], Parts]:
        KINDS[name] = Kind(name, model_class, folder, make, template, vision, summary)
        return make

    return register


def corpus_text() -> str:
    return resources.files("tuning").joinpath("assets/tiny_corpus.txt").read_text(encoding="utf-8")


def train_bpe(spec: TinySpec) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE (Qwen2's split) trained on the shipped corpus: its vocabulary and merges."""
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=spec.bpe_vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus_text().splitlines(), trainer=trainer)
    trained = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    return dict(trained["vocab"]), merges


def bpe_tokenizer(spec: TinySpec, special: tuple[str, ...], template: str, **tokens):
    """A byte-level BPE tokenizer (TokenizersBackend) whose `special` tokens follow the BPE vocabulary in order,
    with `template` as its chat template; `tokens` sets bos/eos/pad/unk by name."""
    from transformers import AddedToken, PreTrainedTokenizerFast

    vocab, merges = train_bpe(spec)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=32768, **tokens)
    tokenizer.chat_template = template
    return tokenizer


def template(name: str) -> str:
    """The chat template a family's checkpoint ships, stored as tuning/assets/templates/<name>.jinja."""
    asset = resources.files("tuning").joinpath(f"assets/templates/{name}.jinja")
    return asset.read_text(encoding="utf-8").removesuffix("\n")


def decoder_fields(spec: TinySpec, tokenizer, **extra) -> dict:
    """The config fields every decoder shares, at the spec's size; `extra` adds or overrides fields."""
    return {
        "vocab_size": spec.vocab_size or padded_vocab(tokenizer),
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "max_position_embeddings": 4096,
        "initializer_range": spec.initializer_range,
        **extra,
    }


def padded_vocab(tokenizer) -> int:
    # Real checkpoints have more embedding rows than tokens (Qwen: 151936 vs 151665); keep that shape
    # so code that confuses len(tokenizer) with vocab_size fails on the tiny model too.
    return (len(tokenizer) + 63) // 64 * 64


def build(spec: TinySpec, out: Path) -> Path:
    """Build the model, tokenizer and (for vision-language kinds) processor into `out`."""
    import transformers as tf

    registered = KINDS.get(spec.kind)
    if registered is None:
        raise ValueError(f"unknown kind {spec.kind!r}; choose one of {', '.join(sorted(KINDS))}")
    parts = registered.make(spec)
    torch.manual_seed(spec.seed)
    model = getattr(tf, registered.model_class)(parts.config).eval()
    if parts.init is not None:
        with torch.no_grad():
            parts.init(model)
    ids = parts.tokenizer.convert_tokens_to_ids
    stops = [ids(t) for t in parts.stop_tokens] or [parts.tokenizer.eos_token_id]
    pad = ids(parts.pad_token) if parts.pad_token else parts.tokenizer.pad_token_id
    model.generation_config = tf.GenerationConfig(eos_token_id=stops, pad_token_id=pad, do_sample=False)

    # Write next to the target and rename, so an interrupted build never leaves a half folder.
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    model.save_pretrained(staging)
    (parts.processor or parts.tokenizer).save_pretrained(staging)
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
    return DEFAULT_ROOT / KINDS[kind].folder


def ensure_tiny(kind: str = "vl", out: Path | None = None, **sizes) -> Path:
    """Return the folder of a tiny model, building it only when missing or stale."""
    spec = TinySpec(kind=kind, **sizes)
    folder = Path(out) if out else default_folder(kind)
    if not is_current(spec, folder):
        build(spec, folder)
    return folder
