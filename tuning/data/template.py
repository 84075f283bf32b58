"""The one rule for every chat template: each assistant turn is trained exactly as the model sees it at inference.

For assistant turn k the context is the template's rendering of messages[:k] with the generation prompt, and
the target is what the template appends for message k: its reasoning, content and tool calls, up to and
including the end-of-turn token (what follows that token, a newline, belongs to the next context). Nothing here
knows a template's tokens: contexts and targets are found by rendering prefixes and comparing strings.

Templates that only append (ChatML, Llama 3, Gemma, Qwen2.5) give one sample per conversation, with every turn
supervised in place. A template that rewrites earlier turns when a later one is rendered (Qwen3 drops the
reasoning of turns before the last user query; Mistral moves the system prompt into the last user message)
gives several samples, each an exact context followed by the turns that can be supervised in it.

One case has no exact answer, and its policy is this: when rendering a turn does not extend its prompt
(DeepSeek-R1's prompt ends in "<think>\\n", which its rendering of the turn drops along with the reasoning;
Mistral-Nemo writes the system prompt only into a final user message, so not when the answer follows it), the
context is the prompt exactly as at inference and the target is the answer as written in the data (for R1: the
reasoning, "</think>", the answer) after whatever the prompt already opened, then the template's end of turn.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

SENTINEL = "\u2063SENTINEL\u2063"  # invisible separator around a word no template writes
THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)


class TemplateError(ValueError):
    """A conversation the template cannot render as training data; `message_index` names the turn."""

    def __init__(self, problem: str, fix: str = "", message_index: int | None = None):
        self.problem, self.fix, self.message_index = problem, fix, message_index
        super().__init__(problem)


@dataclass
class Segment:
    text: str
    supervised: bool
    message_index: int


@dataclass
class Rendered:
    """One training sample: its segments, and how many leading messages it renders (for its pictures)."""

    segments: list[Segment] = field(default_factory=list)
    num_messages: int = 0

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.segments)


class ChatTemplate:
    """Renders messages with a tokenizer's (or a given) chat template and splits them into training samples."""

    def __init__(self, tokenizer, template: str | None = None, template_kwargs: dict | None = None):
        self.tokenizer = tokenizer
        self.template = template
        self.template_kwargs = dict(template_kwargs or {})
        self.special_tokens = sorted(set(tokenizer.all_special_tokens) | _added_special(tokenizer), key=len)

    @property
    def name(self) -> str:
        return repr(getattr(self.tokenizer, "name_or_path", "") or "the model")

    def render(self, messages: list[dict], generation_prompt: bool = False, tools=None, **kwargs) -> str:
        """The template's text; a template that raises becomes a TemplateError with its own message."""
        from jinja2 import TemplateError as JinjaError

        try:
            return self.tokenizer.apply_chat_template(
                messages,
                tools=tools,
                chat_template=self.template,
                add_generation_prompt=generation_prompt,
                tokenize=False,
                **{**self.template_kwargs, **kwargs},
            )
        except (JinjaError, TypeError, ValueError, KeyError, IndexError) as e:
            raise TemplateError(
                f"the chat template of {self.name} refuses this conversation: {e}",
                "change the conversation as the template asks (for example merge a system prompt into the first "
                "user turn for templates without a system role), or give another template with --chat_template",
            ) from None

    def samples(self, messages: list[dict], trained: list[int], tools=None, **kwargs) -> list[Rendered]:
        """Every training sample of a conversation: `trained` lists the assistant turns to supervise."""
        if not trained:
            return []
        render = lambda msgs, gen=False: self.render(msgs, gen, tools, **kwargs)  # noqa: E731
        if tools:
            self._check_tools_rendered(render(messages[: trained[0]], True), tools)
        samples: list[Rendered] = []
        for k in trained:
            context, target = self._turn(messages, k, render)
            supervised, trailing = self._split_end(target, k)
            self._check_target(messages[k], supervised, k)
            current = samples[-1] if samples else None
            if current is not None and context.startswith(current.text):
                current.segments.append(Segment(context[len(current.text) :], False, k))
            else:
                current = Rendered([Segment(context, False, k)])
                samples.append(current)
            current.segments += [Segment(supervised, True, k), Segment(trailing, False, k)]
            current.num_messages = k + 1
        for sample in samples:
            sample.segments = [s for s in sample.segments if s.text]
        return samples

    # -- one turn ----------------------------------------------------------------------------------

    def _turn(self, messages: list[dict], k: int, render: Callable) -> tuple[str, str]:
        """(context, target) of assistant turn k."""
        full = render(messages[: k + 1])
        if k == 0:  # no prompt to render: the context is whatever the template writes before the answer
            content = _visible(messages[0])
            at = full.find(content) if content else -1
            if at < 0:
                raise TemplateError(
                    "a conversation that starts with an assistant turn whose text the template does not render",
                    "start the conversation with a user turn",
                    0,
                )
            return full[:at], full[at:]
        context = render(messages[:k], True)
        if full.startswith(context):
            return context, full[len(context) :]
        return context, self._target_after_opened_prompt(messages, k, context, render)

    def _target_after_opened_prompt(self, messages, k: int, context: str, render: Callable) -> str:
        """Rendering the turn does not extend its prompt (R1's prompt opens "<think>\\n", which its rendering of the
        turn lacks; Mistral-Nemo writes the system prompt only into a final user message). The context stays the
        prompt; the target is the answer as written, after whatever the prompt already opened, then the
        template's own end of turn, both found by rendering the turn with a sentinel for its content."""
        base = render(messages[:k])
        shown = render([*messages[:k], {**_without_reasoning(messages[k]), "content": SENTINEL}])
        at = shown.find(SENTINEL)
        earlier = [_squash(_visible(m)) for m in messages[:k] if m["role"] != "system"]
        if not context.startswith(base) or at < 0 or not all(t in _squash(shown[:at]) for t in earlier):
            raise TemplateError(
                f"the chat template of {self.name} cannot be split into turns: rendering the conversation with "
                "this turn does not keep the turns before it ahead of it",
                "give a template that renders each turn after the ones before it (--chat_template)",
                k,
            )
        prompt, before = context[len(base) :], shown[:at]
        written = max(j for j in range(len(prompt) + 1) if before.endswith(prompt[:j]))
        # the answer as the data writes it: for a reasoning model, the reasoning in its think tags, then the reply
        opened, answer = prompt[written:], _content_text(messages[k])
        if not answer.startswith(opened):
            raise TemplateError(
                f"the generation prompt of {self.name} ends in {opened!r}, which the answer must continue, and this "
                "answer does not start with it",
                f"write the answer as the model produces it after the prompt: for a reasoning model {opened!r}, the "
                "reasoning, its closing tag, then the answer",
                k,
            )
        return answer[len(opened) :] + shown[at + len(SENTINEL) :]

    def _split_end(self, target: str, k: int) -> tuple[str, str]:
        """(supervised, trailing): the target up to and including its last special token (the end of turn)."""
        end = max((target.rfind(t) + len(t) for t in self.special_tokens if t and t in target), default=-1)
        if end < 0:
            raise TemplateError(
                f"the chat template of {self.name} ends this assistant turn without a special token, so the model "
                "would never learn to stop",
                "use a template that closes each assistant turn with the end-of-turn token (--chat_template)",
                k,
            )
        return target[:end], target[end:]

    # -- nothing dropped silently ------------------------------------------------------------------

    def _check_target(self, message: dict, supervised: str, k: int) -> None:
        """The target holds every part of the message the template was given: a template that ignores a field
        would train the model on an answer other than the data's."""
        flat = _squash(supervised)
        checks = [("content", _visible(message)), ("reasoning_content", _reasoning(message))]
        checks += [("tool_calls", call["function"]["name"]) for call in message.get("tool_calls") or []]
        for field_name, text in checks:
            if text and _squash(text) not in flat:
                raise TemplateError(
                    f"the chat template of {self.name} does not render the assistant's {field_name}, so training "
                    "would drop it",
                    "give a template that renders it with --chat_template, or remove the field from the data",
                    k,
                )

    def _check_tools_rendered(self, context: str, tools: list[dict]) -> None:
        missing = [t["function"]["name"] for t in tools if t["function"]["name"] not in context]
        if missing:
            raise TemplateError(
                f"the chat template of {self.name} does not render the sample's tools ({', '.join(missing)})",
                "use a model whose template renders tools, give one with --chat_template, or remove 'tools'",
            )


def _added_special(tokenizer) -> set[str]:
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return {str(token) for token in decoder.values() if getattr(token, "special", False)}


def _content_text(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content or [] if isinstance(p, dict))


def _visible(message: dict) -> str:
    return THINK.sub("", _content_text(message)).replace("</think>", "").strip()


def _reasoning(message: dict) -> str:
    if message.get("reasoning_content"):
        return message["reasoning_content"].strip()
    found = THINK.search(_content_text(message))
    return found.group(1).strip() if found else ""


def _without_reasoning(message: dict) -> dict:
    return {k: v for k, v in message.items() if k != "reasoning_content"}


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)
