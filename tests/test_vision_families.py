"""Vision-language families other than Qwen's, each on its tiny build (tuning/tiny/vision.py): its pictures reach the
text through the toolkit's own data path (reading, the processor per size, pixels per batch, the collators), packed
rows equal padded batches where the family packs, and a family that cannot be served is refused by name."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText

from tests.conftest import REPO
from tests.helpers import loss_and_gradients, picture, write_json, write_jsonl
from tuning.attention import attend_per_sample
from tuning.data.collate import FlatteningCollator, PaddingCollator
from tuning.data.dataset import build_dataset
from tuning.data.encode import Encoder
from tuning.data.media.resolution import MediaOptions
from tuning.data.processing import load_processing, prepare_processing
from tuning.families import family_of, packed_positions
from tuning.model import set_use_cache
from tuning.tiny import KINDS, ensure_tiny

QWEN = ("vl", "qwen2-vl", "qwen3-vl")
VISION_KINDS = sorted(name for name, kind in KINDS.items() if kind.vision and name not in QWEN)


SERVED = VISION_KINDS


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """Pictures of three sizes and colours, and chats over them in the Hugging Face VLM shape (`{"type": "image"}`
    parts matched in order to an `images` list), one, two and no pictures per sample."""
    folder = tmp_path_factory.mktemp("family-pictures")
    red, blue, green = (
        picture(folder / "red.png", "red", (40, 30)),
        picture(folder / "blue.png", "blue", (90, 70)),
        picture(folder / "green.png", "green", (300, 200)),
    )

    def chat(question, answer, images):
        parts = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
        return {
            "messages": [
                {"role": "user", "content": parts},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]},
            ],
            "images": [str(p) for p in images],
        }

    lines = [
        chat("What colour is the shape?", "Red.", [red]),
        chat("Which is larger?", "The second one.", [blue, green]),
        chat("Say hello.", "Hello.", []),
    ]
    return write_jsonl(folder / "chats.jsonl", lines), (red, blue, green)


def encoded(kind: str, data, media: MediaOptions | None = None) -> tuple[Encoder, list[dict]]:
    """Every sample of `data` encoded for the kind's tiny model as a run encodes it, its pixels computed."""
    folder = ensure_tiny(kind)
    processing = prepare_processing(load_processing(str(folder)), media=media or MediaOptions())
    encoder = Encoder(processing.tokenizer, processing.processor, family=processing.family)
    dataset, _ = build_dataset([str(data)], encoder, show_progress=False)
    return encoder, [dataset[i] for i in range(len(dataset))]


def collators(encoder: Encoder, positions) -> tuple[PaddingCollator, FlatteningCollator]:
    """The padding and the flattening collator as a run builds them for the family (tuning.recipe.collator_for)."""
    types, rows = encoder.media.token_types_input, encoder.family.media_rows_per_sample
    return (
        PaddingCollator(encoder.tokenizer.pad_token_id or 0, token_types=types, rows_per_sample=rows),
        FlatteningCollator(positions, token_types=types, rows_per_sample=rows),
    )


def tiny_model(kind: str):
    model = AutoModelForImageTextToText.from_pretrained(ensure_tiny(kind)).eval()
    set_use_cache(model, False)
    return model


@pytest.mark.parametrize("kind", SERVED)
def test_every_picture_becomes_its_tokens_and_its_features(kind, pictures):
    encoder, features = encoded(kind, pictures[0])
    assert [len(f["input_ids"]) > 0 for f in features] == [True] * 3
    with_pictures = [f for f in features if any(t == 1 for t in f.get("mm_token_type_ids") or [])]
    assert len(with_pictures) == 2  # the sample without a picture has no picture tokens and no pixels
    model = tiny_model(kind)
    batch = PaddingCollator(encoder.tokenizer.pad_token_id, token_types=encoder.media.token_types_input)(with_pictures)
    with torch.no_grad():
        loss = float(model(**batch).loss)
        # grey pictures where there are pictures (Idefics3 takes an all-zero tile for padding and drops it)
        grey = {k: torch.where(v == 0, v, 0.3) if k.startswith("pixel_values") else v for k, v in batch.items()}
        grey_loss = float(model(**grey).loss)
    assert torch.isfinite(torch.tensor(loss))
    assert abs(loss - grey_loss) > 1e-4, "the pictures do not reach the text"


@pytest.mark.parametrize("kind", SERVED)
def test_packed_rows_train_as_padded_batches_or_packing_is_off(kind, pictures):
    family = family_of(AutoConfig.from_pretrained(ensure_tiny(kind)))
    if not family.packs_exactly:
        assert family.why_not_packed  # the run turns packing off with this reason (tuning.recipe)
        return
    encoder, features = encoded(kind, pictures[0])
    padded_model, packed_model = tiny_model(kind), tiny_model(kind)
    attend_per_sample(packed_model)  # as a packed run switches it
    padding, flattening = collators(encoder, packed_positions(packed_model))
    padded, flat = padding(features), flattening(features)
    for model in (padded_model, packed_model):
        model.train()
    torch.manual_seed(0)
    padded_loss, padded_grads = loss_and_gradients(padded_model, padded)
    torch.manual_seed(0)
    packed_loss, packed_grads = loss_and_gradients(packed_model, flat)
    assert abs(padded_loss - packed_loss) < 1e-5
    assert padded_grads.keys() == packed_grads.keys()
    for name, grad in padded_grads.items():
        assert torch.allclose(grad, packed_grads[name], atol=1e-5, rtol=1e-4), name


def test_a_reply_ends_at_every_token_generation_stops_at():
    """Gemma 3 stops at <end_of_turn>, which is not its tokenizer's eos: the reply must not carry it (a Gemma 3 that
    had learned the colour exercise scored 0/30 on 'red<end_of_turn>')."""
    from tuning.chat import Chat, GenerationSettings, load_for_chat

    chat = Chat(*load_for_chat(str(ensure_tiny("gemma3"))), settings=GenerationSettings(4))
    assert chat.tokenizer.eos_token != "<end_of_turn>" and "<end_of_turn>" in chat._stop_tokens()


@pytest.mark.parametrize("kind", SERVED)
def test_the_web_demo_answers_a_picture_as_the_chat_command_does(kind, pictures):
    """gradio's history (an upload, then the question) reaches the model as the chat command's own message: the
    same greedy reply, no warning in its place."""
    from tuning.chat import Chat, GenerationSettings, load_for_chat
    from tuning.demo import DemoModel

    red = pictures[1][0]
    chat = Chat(*load_for_chat(str(ensure_tiny(kind))), settings=GenerationSettings(6))
    history = [{"role": "user", "content": {"path": str(red)}}, {"role": "user", "content": "What colour is it?"}]
    *_, (shown, raw) = DemoModel(chat).respond(history, [], "", 6, 0.0, 1.0)
    assert not shown[-1]["content"].startswith("⚠️"), shown[-1]["content"]
    assert raw == [chat.ask("What colour is it?", [red])] and raw[0]


# How many tiles a 1200 x 300 picture becomes: the model's own setting, --image_max_tiles 1, and --image_max_tiles N
# (the tiny builds tile at most 4 x 1). InternVL: 4 patches and a thumbnail; 2 and the thumbnail with N = 2. SmolVLM:
# 3 tiles and the whole picture; with N = 4, a grid of 2 x 2 at most: 2 x 1 and the whole. Gemma 3 pans and scans
# only when asked: the whole picture and 2 crops with N = 2, as its own processor does.
TILES = {"internvl": (2, (5, 1, 3)), "smolvlm": (4, (4, 1, 3)), "gemma3": (2, (1, 1, 3))}


def tiles_of(kind: str, feature: dict) -> int:
    pixel_values = feature["pixel_values"]
    if kind == "smolvlm":  # (pictures, tiles, ...)
        return pixel_values.shape[-4]
    return pixel_values.shape[0]


@pytest.mark.parametrize("kind", sorted(TILES))
def test_image_max_tiles_bounds_the_tiles_of_a_picture_in_the_familys_own_terms(kind, tmp_path):
    wide = picture(tmp_path / "wide.png", "red", (1200, 300))
    record = {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
            {"role": "assistant", "content": "Red."},
        ],
        "images": [str(wide)],
    }
    data = write_jsonl(tmp_path / "wide.jsonl", [record])
    most, expected = TILES[kind]
    counts = tuple(tiles_of(kind, encoded(kind, data, MediaOptions(image_max_tiles=n))[1][0]) for n in (None, 1, most))
    assert counts == expected
    encoder, [feature] = encoded(kind, data, MediaOptions(image_max_tiles=most))
    batch = PaddingCollator(
        encoder.tokenizer.pad_token_id or 0,
        token_types=encoder.media.token_types_input,
        rows_per_sample=encoder.family.media_rows_per_sample,
    )([feature])
    with torch.no_grad():  # the tiles' features still fit the picture's tokens (the model checks the count)
        assert torch.isfinite(tiny_model(kind)(**batch).loss)


def test_image_max_tiles_is_refused_where_a_family_does_not_tile_or_cannot_take_more(tmp_path):
    from finetune import train

    refusals = {
        "vl": "does not split pictures into tiles",
        "llava-onevision": "grid pinpoints",
        "mllama": "tiles are the model's own",
    }
    for kind, reason in refusals.items():
        argv = ["--model_name_or_path", str(ensure_tiny(kind)), "--data_path", "data/example_llava.json",
                "--output_dir", str(tmp_path / kind), "--image_max_tiles", "2"]  # fmt: skip
        with pytest.raises(SystemExit) as stopped:
            train(argv)
        assert reason in str(stopped.value) and not (tmp_path / kind).exists()


def test_llava_next_answers_end_at_the_eos_its_hub_template_misspells(pictures, caplog):
    """llava-v1.6-mistral-7b-hf's template closes each answer with the text '<\\s>' (for '</s>'): the answers train up
    to the end-of-sequence token, where generation stops, as LLaVA's own training ended them."""
    from tuning.data.encode import IGNORE_INDEX

    assert "'<\\s> '" in (ensure_tiny("llava-next") / "chat_template.jinja").read_text()
    with caplog.at_level("INFO"):
        encoder, features = encoded("llava-next", pictures[0])
    assert "a typo of '</s> '" in caplog.text
    for feature in features:
        answer = [t for t, label in zip(feature["input_ids"], feature["labels"], strict=True) if label != IGNORE_INDEX]
        text = encoder.tokenizer.decode(answer)
        assert text.endswith("</s>") and "<\\s>" not in text, text


def test_llava_next_multi_turn_answers_train_whole_where_context_tokens_span_turns(tmp_path):
    """After '</s>' the template writes ' ' and then '[INST]' (plain text in Mistral's vocabulary), which the tokenizer
    may join: both are context, so the conversation trains, each answer whole, and a sample cut after a turn stops
    before the joined token."""
    from tuning.data.encode import IGNORE_INDEX

    record = {
        "id": "two-turns",
        "image": str(picture(tmp_path / "p.png", "red", (60, 40))),
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"},
            {"from": "gpt", "value": "A red picture."},
            {"from": "human", "value": "What is it we see?"},
            {"from": "gpt", "value": "Red."},
        ],
    }
    encoder, features = encoded("llava-next", write_json(tmp_path / "d.json", [record]))
    runs = []
    for feature in features:
        ids, labels = feature["input_ids"], feature["labels"]
        starts = [i for i, label in enumerate(labels) if label != IGNORE_INDEX and (i == 0 or labels[i - 1] == -100)]
        for start in starts:
            end = next((i for i in range(start, len(labels)) if labels[i] == IGNORE_INDEX), len(labels))
            runs.append(encoder.tokenizer.decode(ids[start:end]).strip())
    assert runs == ["A red picture.</s>", "Red.</s>"], runs


# the others have no video processor, or refuse (SmolVLM)
VIDEO_KINDS = ("glm4v", "internvl", "llava-onevision", "qwen3.5")


@pytest.mark.parametrize("kind", VIDEO_KINDS)
def test_video_frames_reach_the_text_and_packed_rows_equal_padded(kind):
    """The repo's video samples (LLaVA and Hugging Face shapes) through each family's own video processor: the
    frames move the loss, and a packed row gives the padded batch's loss and gradients."""
    data = REPO / "data" / "example_video.json"
    encoder, features = encoded(kind, data)
    assert len(features) == 3
    padding, flattening = collators(encoder, packed_positions(tiny_model(kind)))
    batch = padding(features)
    videos = [k for k in batch if k.startswith("pixel_values")]
    assert videos, "no frames reached the batch"
    model = tiny_model(kind)
    with torch.no_grad():
        loss = float(model(**batch).loss)
        grey = float(model(**{k: torch.full_like(v, 0.3) if k in videos else v for k, v in batch.items()}).loss)
    assert abs(loss - grey) > 1e-4, "the frames do not reach the text"
    if not encoder.family.packs_exactly:
        return  # (Qwen3.5: its recurrent layers; the run turns packing off, tested above)
    padded_model, packed_model = tiny_model(kind), tiny_model(kind)
    attend_per_sample(packed_model)
    torch.manual_seed(0)
    padded_loss, padded_grads = loss_and_gradients(padded_model.train(), batch)
    torch.manual_seed(0)
    packed_loss, packed_grads = loss_and_gradients(packed_model.train(), flattening(features))
    assert abs(padded_loss - packed_loss) < 1e-5
    for name, grad in padded_grads.items():
        assert torch.allclose(grad, packed_grads[name], atol=1e-5, rtol=1e-4), name


def test_smolvlm_videos_are_refused_with_the_reason():
    from tuning.data.errors import DataErrors

    with pytest.raises(DataErrors, match="its frames and timestamps"):
        encoded("smolvlm", REPO / "data" / "example_video.json")


# The repo's example files in every format the toolkit reads, pictures given by <img> tags (with grounding), <image>
# placeholders and file lists, OpenAI image_url parts, ms-swift and XTuner records, and text-only formats.
FORMATS = [
    "example.json",
    "example_llava.json",
    "example_sharegpt.json",
    "example_openai.jsonl",
    "example_swift.jsonl",
    "example_xtuner.jsonl",
    "example_alpaca.json",
    "example_chatml.jsonl",
]


# Conversations a family's own template refuses, in its own words: LLaVA-NeXT's has no system role, Llama 3.2
# Vision's takes no system message beside a picture.
TEMPLATE_RULES = {
    "llava-next": "Only user and assistant roles are supported!",
    "mllama": "Prompting with images is incompatible with system messages.",
}


def read_every_format(kind: str):
    folder = ensure_tiny(kind)
    processing = prepare_processing(load_processing(str(folder)), media=MediaOptions(), uses_grounding=True)
    encoder = Encoder(processing.tokenizer, processing.processor, family=processing.family)
    paths = [str(REPO / "data" / name) for name in FORMATS]
    _, report = build_dataset(paths, encoder, show_progress=False, skip_bad_samples=True)
    return report


@pytest.mark.parametrize("kind", SERVED)
def test_every_data_format_reads_for_the_family_as_for_qwen(kind):
    """Every sample the tiny Qwen2.5-VL trains on trains here too, pictures and boxes included, unless the family's
    own template refuses it, with its own words."""
    qwen, family = read_every_format("vl"), read_every_format(kind)
    assert not qwen.bad and not family.dropped and not family.truncated
    rule = TEMPLATE_RULES.get(kind)
    assert all(rule and rule in message for message in family.bad), family.bad
    assert (family.read, family.usable + len(family.bad)) == (qwen.read, qwen.usable)
    assert family.images > 0 and (family.images >= qwen.images or family.bad)


@pytest.mark.parametrize("kind", SERVED)
def test_the_freezing_flags_act_on_the_familys_tower_and_projector(kind):
    """--fix_vit and --tune_projector freeze exactly the record's tower and projector; LoRA reaches the tower only
    with --lora_vision."""
    import re

    from tuning.model import lora_targets, set_trainable, vision_parts

    model = tiny_model(kind)
    towers, projectors = vision_parts(model)
    assert towers and projectors, "the record names no tower or projector this model has"

    def vision(name: str) -> bool:
        return any(name.startswith(prefix + ".") for prefix in towers + projectors)

    set_trainable(model, fix_vit=True, tune_projector=False)
    trainable = {name: p.requires_grad for name, p in model.named_parameters() if p.is_floating_point()}
    assert any(vision(n) for n in trainable) and any(not vision(n) for n in trainable)
    assert all(flag == (not vision(name)) for name, flag in trainable.items())
    set_trainable(model, fix_vit=False, tune_projector=True)
    assert all(p.requires_grad for p in model.parameters() if p.is_floating_point())

    def adapted(include_vision: bool) -> list[str]:
        pattern = lora_targets(model, None, include_vision).modules
        return [n for n, _ in model.named_modules() if isinstance(pattern, str) and re.fullmatch(pattern, n)]

    assert adapted(False) and not any(vision(n + ".") for n in adapted(False))
    assert any(vision(n + ".") for n in adapted(True))
