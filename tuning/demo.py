"""The multimodal web chat: upload pictures, ask, get streamed answers with grounding boxes drawn.

    python web_demo_mm.py [-c MODEL] [--adapter DIR] [--bits 4] [--server-name 127.0.0.1] [--server-port 8000]

The conversion between gradio's chat history and model messages is plain functions (no gradio), so it
is tested on its own. Only uploaded files become images: text typed into the box is always text.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image

from tuning.chat import Chat, GenerationSettings, picture_ref, split_thinking
from tuning.data import grounding
from tuning.data.grounding import draw_boxes
from tuning.data.media.images import load_image
from tuning.families import UnsupportedFamily

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".avi", ".mkv")
MAX_UPLOAD = "10mb"


# -- pure conversion, no gradio ------------------------------------------------------------------


def _parts(content) -> list[dict]:
    """gradio 6 gives content as a list of parts; older shapes (a string, a file tuple) are accepted too."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, tuple):
        return [{"type": "file", "file": {"path": p}} for p in content]
    if isinstance(content, dict):
        return [content]
    return list(content or [])


def _file_path(part: dict) -> str | None:
    if "path" in part:  # the shape we append: {"path": ...}
        path = part["path"]
    elif part.get("type") == "file":  # the shape gradio hands back: {"type": "file", "file": {"path": ...}}
        file = part.get("file") or {}
        path = file.get("path") if isinstance(file, dict) else getattr(file, "path", None)
    else:
        return None
    return path if path and str(path).lower().endswith(IMAGE_SUFFIXES + VIDEO_SUFFIXES) else None


def history_to_messages(history: list[dict], raw_answers: list[str]) -> list[dict]:
    """Chat history as the model takes it: user files become image parts (paths), and each assistant turn
    is the model's raw answer (grounding tags included), not the cleaned text or the drawn pictures."""
    messages: list[dict] = []
    answers = iter(raw_answers)
    for entry in history:
        role, parts = entry["role"], _parts(entry["content"])
        if role == "assistant":
            if messages and messages[-1]["role"] == "assistant":
                continue  # the answer after its folded thinking, or a drawn-boxes picture after its answer
            messages.append({"role": "assistant", "content": next(answers, "")})
            continue
        content = []
        for part in parts:
            if path := _file_path(part):
                kind = "video" if str(path).lower().endswith(VIDEO_SUFFIXES) else "image"
                content.append({"type": kind, kind: path})
            elif part.get("type") == "text" and part.get("text", "").strip():
                content.append({"type": "text", "text": part["text"]})
        if messages and messages[-1]["role"] == "user":  # gradio shows each upload as its own message
            messages[-1]["content"] += content
        else:
            messages.append({"role": "user", "content": content})
    return [_simplify(m) for m in messages]


def _simplify(message: dict) -> dict:
    content = message["content"]
    if isinstance(content, list) and all(p["type"] == "text" for p in content):
        return {**message, "content": "".join(p["text"] for p in content)}
    return message


def latest_image(messages: list[dict]) -> str | None:
    for message in reversed(messages):
        if isinstance(message["content"], list):
            for part in reversed(message["content"]):
                if part["type"] == "image":
                    return part["image"]
    return None


def shown_turn(answer: str) -> list[dict]:
    """The assistant turn as the chat shows it: the reasoning folded under "Thinking", then the answer, its
    grounding tags hidden."""
    thinking, text = split_thinking(answer)
    turn = [{"role": "assistant", "content": thinking, "metadata": {"title": "Thinking"}}] if thinking else []
    return [*turn, {"role": "assistant", "content": grounding.strip_tags(text)}]


# -- the app ---------------------------------------------------------------------------------------


@dataclass
class DemoModel:
    chat: Chat
    outputs: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="web-demo-")))

    def reply(self, messages: list[dict], settings: GenerationSettings, system: str) -> Iterator[str]:
        # a Chat of its own per request: requests served at once must not share settings or system prompt
        chat = replace(self.chat, settings=settings, system=(system or "").strip() or None, messages=[])
        asked = [chat.as_labelled_data(m) if m["role"] == "user" else m for m in messages]  # as the chat asks
        yield from chat.stream_reply(asked)  # pictures by path: loaded as training loads them

    def respond(self, history: list, raw: list, system: str, max_new_tokens: int, temperature: float, top_p: float):
        """Stream the answer to the last user turn into the history; any failure becomes a message in the chat,
        and the server keeps serving."""
        if not history or history[-1]["role"] != "user":
            yield history, raw
            return
        messages = history_to_messages(history, raw)
        settings = GenerationSettings(int(max_new_tokens), float(temperature), float(top_p))
        before = list(history)
        history = [*before, {"role": "assistant", "content": ""}]
        answer = ""
        try:
            for answer in self.reply(messages, settings, system):
                history = [*before, *shown_turn(answer)]
                yield history, raw
            drawn = self.picture_with_boxes(answer, latest_image(messages), len(raw) + 1)
        except Exception as e:  # whatever failed is shown in the page
            history = [*before, {"role": "assistant", "content": f"⚠️ {type(e).__name__}: {e}"}]
            yield history, [*raw, ""]
            return
        if drawn:
            history.append({"role": "assistant", "content": {"path": drawn}})
        yield history, [*raw, answer]

    def picture_with_boxes(self, answer: str, image_path: str | None, turn: int) -> str | None:
        if image_path is None or not grounding.has_boxes(answer):
            return None
        boxes = self.chat.answer_boxes(answer, image_path)
        if not boxes:
            return None
        image = load_image(picture_ref(image_path))  # within the same limits as the model's own reading
        path = self.outputs / f"boxes-{turn}.png"
        scale = max(1, 256 // max(image.size))  # a thumbnail-sized picture is enlarged so labels can be read
        draw_boxes(image.resize((image.width * scale, image.height * scale), Image.NEAREST), boxes).save(path)
        return str(path)


def build_app(demo_model: DemoModel, title: str = "Multimodal chat"):
    import gradio as gr

    def add_user_turn(message: dict, history: list, raw: list):
        files = [f for f in message.get("files", []) if str(f).lower().endswith(IMAGE_SUFFIXES + VIDEO_SUFFIXES)]
        refused = [Path(str(f)).name for f in message.get("files", []) if f not in files]
        if refused:
            gr.Warning(f"only pictures and videos can be sent; ignored {', '.join(refused)}")
        for f in files:
            history.append({"role": "user", "content": {"path": str(f)}})
        if message.get("text", "").strip():
            history.append({"role": "user", "content": message["text"]})
        return gr.MultimodalTextbox(value=None), history, raw

    def regenerate(history: list, raw: list):
        while history and history[-1]["role"] == "assistant":
            history = history[:-1]
        return history, raw[:-1] if raw else raw

    with gr.Blocks(title=title) as app:
        gr.Markdown(
            f"## {title}\nUpload pictures or videos, ask about them. Boxes the model names are drawn on the picture."
        )
        chatbot = gr.Chatbot(label="conversation", height=520, elem_id="chatbot")
        raw_answers = gr.State([])
        box = gr.MultimodalTextbox(
            file_types=["image", "video"],
            file_count="multiple",
            placeholder="Ask about a picture or a video",
            show_label=False,
            elem_id="input",
        )
        with gr.Row():
            regenerate_button = gr.Button("Regenerate", elem_id="regenerate")
            clear_button = gr.Button("Clear", elem_id="clear")
        with gr.Accordion("Settings", open=False):
            system = gr.Textbox(label="System prompt", placeholder="(the model's default)")
            max_new_tokens = gr.Slider(1, 2048, value=256, step=1, label="Max new tokens")
            temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0 = greedy)")
            top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
        settings = [system, max_new_tokens, temperature, top_p]

        box.submit(add_user_turn, [box, chatbot, raw_answers], [box, chatbot, raw_answers], queue=False).then(
            demo_model.respond, [chatbot, raw_answers, *settings], [chatbot, raw_answers]
        )
        regenerate_button.click(regenerate, [chatbot, raw_answers], [chatbot, raw_answers], queue=False).then(
            demo_model.respond, [chatbot, raw_answers, *settings], [chatbot, raw_answers]
        )
        clear_button.click(lambda: ([], []), None, [chatbot, raw_answers], queue=False)
    return app


def main(argv: list[str] | None = None) -> None:
    from tuning.chat import load_for_chat
    from tuning.tiny import ensure_tiny

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--checkpoint-path", help="model folder or hub name (default: the tiny demo model)")
    parser.add_argument("--adapter", help="LoRA adapter folder to apply")
    parser.add_argument("--bits", type=int, choices=[4, 8], help="load the model quantized")
    parser.add_argument("--cpu-only", action="store_true", help="stay on the CPU")
    parser.add_argument("--server-name", default="127.0.0.1", help="address to bind (default: this machine only)")
    parser.add_argument("--server-port", type=int, default=8000)
    parser.add_argument("--share", action="store_true", help="create a public gradio link")
    parser.add_argument("--concurrency", type=int, default=2, help="requests served at once; more wait in a queue")
    parser.add_argument("--queue-size", type=int, default=64, help="requests that may wait; more are refused")
    parser.add_argument(
        "--enable-thinking", choices=["true", "false"], help="passed to the chat template (Qwen3's thinking switch)"
    )
    args = parser.parse_args(argv)

    model_path = args.checkpoint_path or str(ensure_tiny("vl"))
    try:
        model, tokenizer, processor = load_for_chat(model_path, args.adapter, args.bits, args.cpu_only)
    except UnsupportedFamily as e:
        raise SystemExit(f"web_demo_mm.py: {e}") from None
    thinking = {} if args.enable_thinking is None else {"enable_thinking": args.enable_thinking == "true"}
    demo_model = DemoModel(Chat(model, tokenizer, processor, template_kwargs=thinking))
    app = build_app(demo_model, title=f"Multimodal chat — {Path(model_path).name}")
    app.queue(default_concurrency_limit=args.concurrency, max_size=args.queue_size).launch(
        server_name=args.server_name, server_port=args.server_port, share=args.share, max_file_size=MAX_UPLOAD
    )
