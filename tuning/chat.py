"""Talk to a model, with or without an adapter, in the terminal.

    python -m tuning.chat output/merged --prompt "你好"
    python -m tuning.chat models/tiny-qwen2.5-vl --adapter output/finetune_lora_ds --image data/images/dog.png

Interactive commands: /image PATH attaches a picture to the next message, /reset forgets the
conversation, /exit leaves. Generation here is the one the web demo and training callbacks use.
"""

from __future__ import annotations

import argparse
import base64
import io
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image

from tuning.data import grounding
from tuning.data.conversation import Conversation, ImageRef, Message, VideoRef
from tuning.data.encode import Encoder
from tuning.data.errors import DataError
from tuning.data.media.images import ImageLoadError, load_image
from tuning.data.media.resolution import MediaOptions, configure, pixels
from tuning.data.processing import load_run_processing
from tuning.families import DATA_TAGS, UnsupportedFamily, end_of_text, family_of, is_vision_language, require_support
from tuning.model import LoadOptions, load_adapter, load_model, resize_for_tokenizer, set_use_cache


@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0

    def kwargs(self) -> dict:
        if self.temperature <= 0:
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False}
        return {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
        }


def load_for_chat(
    model_path: str,
    adapter: str | None = None,
    bits: int | None = None,
    cpu_only: bool = False,
    media: MediaOptions | None = None,
):
    """(model, tokenizer, processor or None): the base, optionally quantized, with the adapter on top. Pictures
    and videos are resized as the model was trained (the options saved with it), else with the default budget."""
    tokenizer, processor, family = load_run_processing(model_path, adapter)
    require_support(family)  # before any weight is read: a vision family without a record is refused by name
    if processor is not None:
        options = media or MediaOptions.saved_in(adapter, model_path) or MediaOptions()
        configure(processor, options, family.resolution, family.tiles)
    model = load_model(LoadOptions(model_path, q_lora=bits == 4, load_in_8bit=bits == 8))
    resize_for_tokenizer(model, tokenizer)  # the rows of tokens added in training (the adapter holds them)
    if adapter:
        model = load_adapter(model, adapter)
    if torch.cuda.is_available() and not cpu_only and bits is None:
        model = model.to("cuda")
    set_use_cache(model, True)
    return model.eval(), tokenizer, processor


Picture = str | Path | ImageRef | Image.Image


def picture_ref(picture: Picture) -> ImageRef:
    """A picture as training names one: a path (relative to the working folder), an http(s) URL or a data URI; a
    picture already in memory travels as a PNG data URI, so it goes through the same loader and limits."""
    if isinstance(picture, ImageRef):
        return picture
    if isinstance(picture, Image.Image):
        buffer = io.BytesIO()
        picture.convert("RGB").save(buffer, format="PNG")
        return ImageRef("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode(), "")
    return ImageRef(str(picture), "")


def _parts(content) -> list:
    if isinstance(content, str):
        return [content]
    parts = []
    for part in content:
        if part["type"] == "image":
            parts.append(picture_ref(part["image"]))
        elif part["type"] == "video":
            parts.append(part["video"] if isinstance(part["video"], VideoRef) else VideoRef(str(part["video"]), ""))
        else:
            parts.append(part["text"])
    return parts


@dataclass
class Chat:
    """A multi-turn conversation with a model; images attach to the user turn they are sent with. Prompts are built
    by the training encoder (tuning.data.encode), so a model is asked exactly as it was trained."""

    model: object
    tokenizer: object
    processor: object | None = None
    system: str | None = None
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    messages: list[dict] = field(default_factory=list)
    # Qwen-VL data labels its pictures "Picture N:", so a model tuned on it is asked the same way.
    add_vision_id: bool = True
    template_kwargs: dict = field(default_factory=dict)  # e.g. {"enable_thinking": False} for Qwen3
    encoder: Encoder | None = None  # a training run's own encoder; by default one for the model's family

    def __post_init__(self):
        if self.encoder is None:
            # (its max_length is training's: a prompt is never cut; _check_length holds it to the model's limit)
            family = family_of(self.model.config)
            self.encoder = Encoder(self.tokenizer, self.processor, family=family, template_kwargs=self.template_kwargs)

    def reset(self) -> None:
        self.messages = []

    def conversation(self, messages: list[dict]) -> Conversation:
        """Chat messages (content a string, or parts: {"type": "image", "image": path, URL, data URI or picture},
        {"type": "video", "video": path}, {"type": "text", "text": ...}) as the Conversation training reads."""
        full = ([{"role": "system", "content": self.system}] if self.system else []) + messages
        conv = Conversation(id="chat", origin="the chat", file="the chat", where="this message")
        conv.messages = [Message(m["role"], _parts(m["content"])) for m in full]
        conv.add_vision_id = self.add_vision_id
        if (conv.images or conv.videos) and self.processor is None:
            raise ValueError("this model is text-only: it cannot take pictures or videos")
        return conv

    def _inputs(self, messages: list[dict]) -> dict:
        conv = self.conversation(messages)
        try:
            inputs = self.encoder.prompt(conv)
        except DataError as e:  # a picture that cannot be read, a bad box: said as the training data would say it
            raise ValueError(e.problem) from None
        return {k: v.to(self.model.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}

    def _check_length(self, prompt_tokens: int) -> None:
        limit = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        if limit and prompt_tokens + self.settings.max_new_tokens > limit:
            raise ValueError(
                f"the conversation is {prompt_tokens} tokens and {self.settings.max_new_tokens} more may be "
                f"generated, over the model's {limit}: clear the history or send less"
            )

    def user_message(self, text: str, images: list[Picture] | None = None, videos: list[str] | None = None) -> dict:
        if not images and not videos:
            return {"role": "user", "content": text}
        media = [{"type": "image", "image": img} for img in images or []]
        media += [{"type": "video", "video": path} for path in videos or []]
        return self.as_labelled_data({"role": "user", "content": [*media, {"type": "text", "text": text}]})

    def as_labelled_data(self, message: dict) -> dict:
        """A user message laid out as Qwen-VL data writes it when pictures are labelled: each picture or video ends
        its line ("Picture 1: <img>..</img>\\n", as Qwen-VL's from_list_format writes it), so a model tuned on
        that data is asked with the same newlines. Unlabelled, the parts are left as they are."""
        content = message["content"]
        if not self.add_vision_id or isinstance(content, str):
            return message
        laid_out: list[dict] = []
        for part in [*content, None]:
            if laid_out and laid_out[-1]["type"] in ("image", "video"):
                if part is not None and part["type"] == "text":
                    part = {**part, "text": part["text"] if part["text"].startswith("\n") else "\n" + part["text"]}
                else:
                    laid_out.append({"type": "text", "text": "\n"})
            if part is not None:
                laid_out.append(part)
        return {**message, "content": laid_out}

    def stream(self, text: str, images: list[Picture] | None = None, videos: list[str] | None = None):
        """Yield the answer as it grows; the exchange joins the history when it is complete."""
        message = self.user_message(text, images, videos)
        answer = ""
        for answer in self.stream_reply([*self.messages, message]):
            yield answer
        self.messages += [message, {"role": "assistant", "content": answer}]

    def stream_reply(self, messages: list[dict]) -> Iterator[str]:
        """Yield the reply to `messages` as it grows, end-of-turn tokens removed; the history is not touched."""
        from transformers import TextIteratorStreamer

        inputs = self._inputs(messages)
        self._check_length(inputs["input_ids"].shape[1])
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=False)
        ends = {self.tokenizer.eos_token, end_of_text(self.encoder.family, self.tokenizer), *self._stop_tokens()}
        stop = ends - {None}
        failure: list[BaseException] = []

        def run():
            try:
                with torch.no_grad():
                    self.model.generate(
                        **inputs, streamer=streamer, **self.settings.kwargs(), pad_token_id=self.tokenizer.pad_token_id
                    )
            except BaseException as e:  # re-raised in the caller's thread below
                failure.append(e)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        answer = ""
        for piece in streamer:
            answer += piece
            visible = answer
            for token in stop:
                visible = visible.split(token)[0]
            yield visible
        thread.join()
        if failure:
            raise failure[0]

    def _stop_tokens(self) -> list[str]:
        """The tokens generation stops at (the generation config's: Gemma 3's <end_of_turn>, GLM's next-role tokens),
        which end a reply and are never part of it."""
        ids = getattr(self.model.generation_config, "eos_token_id", None)
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        return [self.tokenizer.convert_ids_to_tokens(i) for i in ids]

    def ask(self, text: str, images: list[Picture] | None = None, videos: list[str] | None = None) -> str:
        answer = ""
        for partial in self.stream(text, images, videos):
            answer = partial
        return answer

    def answer_boxes(self, answer: str, picture: Picture | None) -> list[grounding.Box]:
        """Boxes of an answer in [0,1000), whatever the model's convention (Qwen2.5-VL writes pixels of the picture
        as it sees it, after resizing)."""
        style = self.encoder.grounding
        size = self.encoder.media.seen_size(picture_ref(picture)) if style.pixels and picture is not None else None
        return grounding.find_boxes(answer, style, size)


def split_thinking(answer: str) -> tuple[str | None, str]:
    """(reasoning or None, the answer to show) of a reasoning model's raw answer: "<think>...</think>answer",
    or "...</think>answer" where the prompt opened the think block (Qwen3-Thinking, DeepSeek-R1); while the
    reasoning is still streaming, all of it is reasoning."""
    if "</think>" in answer:
        thinking, _, rest = answer.partition("</think>")
        return thinking.split("<think>", 1)[-1].strip(), rest.strip()
    if "<think>" in answer:
        return answer.split("<think>", 1)[1].strip(), ""
    return None, answer


def readable(answer: str) -> str:
    """An answer with grounding shown as 'label [x1,y1,x2,y2]' instead of raw tags."""
    boxes = grounding.find_boxes(answer, DATA_TAGS)
    text = grounding.strip_tags(answer)
    if boxes:
        text += "\n" + "\n".join(f"  box: {b.label or '?'} [{b.x1:g},{b.y1:g},{b.x2:g},{b.y2:g}]" for b in boxes)
    return text


def interactive(chat: Chat, pending_images: list[str]) -> None:
    print("Type a message. /image PATH attaches a picture, /reset starts over, /exit leaves.")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            chat.reset()
            pending_images.clear()
            print("(conversation cleared)")
            continue
        if line.startswith("/image"):
            path = line[len("/image") :].strip()
            try:
                load_image(picture_ref(path), None, chat.encoder.image_limits)  # read now, said now
                pending_images.append(path)
                print(f"(attached {path})")
            except ImageLoadError as e:
                print(f"(cannot use {path}: {e})")
            continue
        print("assistant> ", end="", flush=True)
        shown = ""
        for shown_now in chat.stream(line, pending_images or None):
            print(shown_now[len(shown) :], end="", flush=True)
            shown = shown_now
        print()
        if grounding.has_boxes(shown):
            print(readable(shown))
        pending_images.clear()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="model folder or hub name (a merged model, or the base of --adapter)")
    parser.add_argument("--adapter", help="LoRA adapter folder to apply on top of the model")
    parser.add_argument("--image", action="append", default=[], help="picture for the first message (repeatable)")
    parser.add_argument("--video", action="append", default=[], help="video for the first message (repeatable)")
    parser.add_argument(
        "--image_max_pixels",
        help="largest picture in pixels, or 'model' (default: as the model was trained, else 768*768)",
    )
    parser.add_argument("--bits", type=int, choices=[4, 8], help="load the model quantized")
    parser.add_argument("--system", help="system prompt (default: the template's own)")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--prompt", help="answer this one message and exit")
    parser.add_argument("--cpu-only", action="store_true", help="stay on the CPU even if a GPU is there")
    parser.add_argument(
        "--no_vision_id", action="store_true", help="do not label pictures 'Picture N:' (for models tuned without)"
    )
    parser.add_argument(
        "--enable_thinking",
        choices=["true", "false"],
        help="passed to the chat template (Qwen3): false asks in non-thinking mode, as --enable_thinking False trains",
    )
    args = parser.parse_args(argv)

    for flag, paths in (("--image", args.image), ("--video", args.video)):
        for path in paths:
            if not Path(path).is_file():
                parser.error(f"{flag} {path}: no such file")
    media = None
    if args.image_max_pixels is not None:
        saved = MediaOptions.saved_in(args.adapter, args.model) or MediaOptions()
        media = replace(saved, image_max_pixels=pixels(args.image_max_pixels))
    try:
        model, tokenizer, processor = load_for_chat(args.model, args.adapter, args.bits, args.cpu_only, media)
    except UnsupportedFamily as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if (args.image or args.video) and not is_vision_language(model.config):
        parser.error("--image and --video need a vision-language model")
    settings = GenerationSettings(args.max_new_tokens, args.temperature, args.top_p)
    thinking = {} if args.enable_thinking is None else {"enable_thinking": args.enable_thinking == "true"}
    try:
        chat = Chat(
            model,
            tokenizer,
            processor,
            args.system,
            settings,
            add_vision_id=not args.no_vision_id,
            template_kwargs=thinking,
        )
        if args.prompt is not None:
            print(readable(chat.ask(args.prompt, args.image or None, args.video or None)))
            return 0
    except ValueError as e:  # a picture that cannot be read, a prompt over the model's length
        print(f"error: {e}", file=sys.stderr)
        return 1
    interactive(chat, list(args.image))
    return 0


if __name__ == "__main__":
    sys.exit(main())
