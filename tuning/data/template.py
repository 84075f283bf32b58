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
A prompt that opens a think block the template closes itself (GLM-4.7: "<think>", then "</think>answer") is
continued by the template's own text.

A turn ends where generation stops: at the last special token the template writes for it; at the end-of-sequence
token before the next turn's opener where the template writes that opener after every turn (Command-R7B's
tool-use template); at the special token that opens the next message where the template writes no end of turn
(GLM: its user or observation token, at which its generation config stops; after the last turn the one opening
a user message, as GLM's own fine-tuning appends it), else with the end-of-sequence token (llava-hf's LLaVA
templates write nothing that would stop generation). An end-of-sequence token inside a target is refused
(Nemotron-Nano-v2 writes a final turn's text and its tool calls as two turns, each closed by it).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

SENTINEL = "\u2063SENTINEL\u2063"  # invisible separator around a word no template writes
THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_OPENED_THINK = re.compile(r"\s*<think>.*?</think>", re.DOTALL)
_TEMPLATE_FILE = "_tuning_chat_template_file"  # (path, text) of a --chat_template file put on a tokenizer


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


def record_template_file(tokenizer, path: str) -> None:
    """Remember that the tokenizer's chat template was read from `path` (--chat_template), so that messages name
    the file, not the model folder, while that template is on the tokenizer."""
    setattr(tokenizer, _TEMPLATE_FILE, (str(path), tokenizer.chat_template))


class ChatTemplate:
    """Renders messages with a tokenizer's (or a given) chat template and splits them into training samples."""

    def __init__(self, tokenizer, template: str | None = None, template_kwargs: dict | None = None):
        self.tokenizer = tokenizer
        self.template = template
        self.template_kwargs = dict(template_kwargs or {})
        self.special_tokens = sorted(set(tokenizer.all_special_tokens) | _added_special(tokenizer), key=len)
        self.eos_token = getattr(tokenizer, "eos_token", None) or None
        # probed once (with tools given or not: a tokenizer may hold a template for each): does the template close
        # an assistant turn with a special token, and which special token opens a message of each role
        self._writes_end: dict[bool, bool] = {}
        self._openers: dict[tuple[bool, str], str] = {}

    @property
    def file(self) -> str | None:
        """The --chat_template file whose text is the template in use, if it is one."""
        path, text = getattr(self.tokenizer, _TEMPLATE_FILE, (None, None))
        return path if self.template is None and text is not None and text == self.tokenizer.chat_template else None

    @property
    def name(self) -> str:
        return repr(self.file or getattr(self.tokenizer, "name_or_path", "") or "the model")

    @property
    def described(self) -> str:
        """How messages name the template: the --chat_template file, or the model's own."""
        return f"the chat template {self.name} (--chat_template)" if self.file else f"the chat template of {self.name}"

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
                f"{self.described} refuses this conversation: {e}",
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
            self._check_target(messages[k], target, k)
            supervised, trailing = self._split_end(messages, k, context, target, render, bool(tools))
            self._check_target(messages[k], supervised, k, cut=True)
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
            return context, _after_opened_think(context, full[len(context) :])
        return context, self._target_after_opened_prompt(messages, k, context, render)

    def _target_after_opened_prompt(self, messages, k: int, context: str, render: Callable) -> str:
        """Rendering the turn does not extend its prompt (R1's prompt opens "<think>\\n", which its rendering of the
        turn lacks; Mistral-Nemo writes the system prompt only into a final user message). The context stays the
        prompt; the target is the answer as written, after whatever the prompt already opened, then the
        template's own end of turn, both found by rendering the turn with a sentinel for its content (a turn of
        tool calls alone is rendered as it is: all of its text is the template's)."""
        base, message = render(messages[:k]), messages[k]
        answer = _content_text(message)
        if answer.strip():
            shown = render([*messages[:k], {**_without_reasoning(message), "content": _like(message, SENTINEL)}])
            at = shown.find(SENTINEL)
        else:
            shown = render(messages[: k + 1])
            at = len(shown)
        earlier = [_squash(_visible(m)) for m in messages[:k] if m["role"] != "system"]
        if not context.startswith(base) or at < 0 or not all(t in _squash(shown[:at]) for t in earlier):
            raise TemplateError(
                f"{self.described} cannot be split into turns: rendering the conversation with this turn does not "
                "keep the turns before it ahead of it",
                "give a template that renders each turn after the ones before it (--chat_template)",
                k,
            )
        prompt, before, after = context[len(base) :], shown[:at], shown[at + len(SENTINEL) :] if answer.strip() else ""
        if shown.startswith(base):  # the turn's own text, against the prompt that precedes it at inference
            shared = self._shared_prefix(prompt, before[len(base) :])
            written = before[len(base) + shared :]
        else:  # the history moved (Mistral-Nemo): the prompt's end is what the turn's text ends with
            shared, written = max(j for j in range(len(prompt) + 1) if before.endswith(prompt[:j])), ""
        opened = prompt[shared:]
        if written and opened:  # the template writes its own text where the prompt opened something
            closes = _OPENED_THINK.match(opened + written)
            if closes is None or closes.end() <= len(opened):
                raise TemplateError(
                    f"the generation prompt of {self.described} ends in {opened!r}, which the answer must continue, "
                    f"and the template writes this turn as {written[:60]!r} instead",
                    f"write the answer as the model produces it after the prompt: for a reasoning model {opened!r}, "
                    "the reasoning, its closing tag, then the answer (or give a template whose turns continue "
                    "their prompt with --chat_template)",
                    k,
                )
            return written + _visible(message) + after
        # the answer as the data writes it: for a reasoning model, the reasoning in its think tags, then the reply
        if not answer.startswith(opened):
            raise TemplateError(
                f"the generation prompt of {self.described} ends in {opened!r}, which the answer must continue, and "
                "this answer does not start with it",
                f"write the answer as the model produces it after the prompt: for a reasoning model {opened!r}, the "
                "reasoning, its closing tag, then the answer",
                k,
            )
        return written + answer[len(opened) :] + after

    def _shared_prefix(self, a: str, b: str) -> int:
        """How much of `a` and `b` is the same text, ending where a token ends: at the end of either, or else after
        a special token or a newline (GLM's assistant token then "<think>", and then "</think>", share that token)."""
        n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        if n in (len(a), len(b)):
            return n
        ends = [a.rfind(t, 0, n) + len(t) for t in self.special_tokens if t and a.rfind(t, 0, n) >= 0]
        return max([e for e in ends if e <= n] + [a.rfind("\n", 0, n) + 1])

    # -- where the turn ends -----------------------------------------------------------------------

    def _split_end(self, messages, k, context: str, target: str, render: Callable, tools: bool) -> tuple[str, str]:
        """(supervised, trailing): the target up to and including the token where generation stops."""
        if not self._closes_turns(messages, k, render, tools):
            return target + self._opener_after(messages, k, render, tools), ""
        end = max((target.rfind(t) + len(t) for t in self.special_tokens if t and t in target), default=-1)
        if end < 0:
            raise TemplateError(
                f"{self.described} ends this assistant turn without a special token, so the model would never "
                "learn to stop",
                "use a template that closes each assistant turn with the end-of-turn token (--chat_template)",
                k,
            )
        supervised, trailing = target[:end], target[end:]
        eos = self.eos_token
        if eos and eos in supervised:
            stop = supervised.rfind(eos) + len(eos)
            opener = supervised[stop:]
            if opener and context.endswith(opener):  # the next turn's opener, written after every turn
                supervised, trailing = supervised[:stop], ""
            inside = supervised.find(eos) + len(eos)
            if inside < len(supervised):
                raise TemplateError(
                    f"{self.described} writes the end-of-sequence token {eos!r} inside this assistant turn, before "
                    f"{supervised[inside : inside + 60]!r}: generation stops at that token, so the model could "
                    "never write the rest of the answer",
                    "give a template that writes the whole turn before one end-of-sequence token (--chat_template), "
                    "or split the answer so that no turn goes on after that token",
                    k,
                )
        return supervised, trailing

    def _closes_turns(self, messages, k: int, render: Callable, tools: bool) -> bool:
        """Whether the template writes a special token after an assistant turn's text."""
        if tools not in self._writes_end:
            try:
                probe = render([*messages[:k], {"role": "assistant", "content": _like(messages[k], SENTINEL)}])
            except TemplateError:
                return True  # the conversation's own rendering says why; the special-token rule stands
            if SENTINEL not in probe:
                return True
            tail = probe[probe.find(SENTINEL) + len(SENTINEL) :]
            self._writes_end[tools] = any(t and t in tail for t in self.special_tokens)
        return self._writes_end[tools]

    def _opener_after(self, messages, k: int, render: Callable, tools: bool) -> str:
        """The template writes no end-of-turn token: the answer ends at the special token that opens the message
        after it (the model generates it and stops there), or, after the last turn, a user message."""
        sentinel = _like(messages[k], SENTINEL)
        following = messages[k + 1] if k + 1 < len(messages) else {"role": "user", "content": sentinel}
        role = following["role"]
        if (tools, role) not in self._openers:
            probe = render([*messages[:k], {"role": "assistant", "content": sentinel}, following])
            between = probe[probe.find(SENTINEL) + len(SENTINEL) :]
            found = [(between.find(t), -len(t), t) for t in self.special_tokens if t and t in between]
            at, _, token = min(found, default=(-1, 0, ""))
            if (at < 0 or between[:at].strip()) and self.eos_token:
                # nothing the template writes would stop generation (llava-hf's LLaVA templates): the answer is
                # closed with the end-of-sequence token, where generation stops, as LLaVA's own training closed it.
                # The token is not in the history of later turns, so each turn becomes a sample of its own.
                self._openers[tools, role] = self.eos_token
                return self.eos_token
            if at < 0 or between[:at].strip():
                raise TemplateError(
                    f"{self.described} writes no end-of-turn token after an assistant turn, and no special token "
                    f"opens the {role} message after it, so the model would never learn to stop",
                    "use a template that closes each assistant turn with a special token (--chat_template)",
                    k,
                )
            self._openers[tools, role] = between[: at + len(token)]
        return self._openers[tools, role]

    # -- nothing dropped silently ------------------------------------------------------------------

    def _check_target(self, message: dict, supervised: str, k: int, cut: bool = False) -> None:
        """The target holds every part of the message the template was given: a template that ignores a field
        would train the model on an answer other than the data's (`cut`: the target as its end cut it)."""
        flat = _squash(supervised)
        checks = [("content", _visible(message)), ("reasoning_content", _reasoning(message))]
        checks += [("tool_calls", call["function"]["name"]) for call in message.get("tool_calls") or []]
        for field_name, text in checks:
            if text and _squash(text) not in flat:
                problem = (
                    f"{self.described} writes the last special token of this assistant turn before its {field_name}"
                    if cut
                    else f"{self.described} does not render the assistant's {field_name}"
                )
                raise TemplateError(
                    f"{problem}, so training would drop it",
                    "give a template that renders it with --chat_template, or remove the field from the data",
                    k,
                )

    def _check_tools_rendered(self, context: str, tools: list[dict]) -> None:
        missing = [t["function"]["name"] for t in tools if t["function"]["name"] not in context]
        if missing:
            raise TemplateError(
                f"{self.described} does not render the sample's tools ({', '.join(missing)})",
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


def _like(message: dict, text: str):
    """`text` as content in the form the message has (parts for a template that reads only parts)."""
    return [{"type": "text", "text": text}] if isinstance(message.get("content"), list) else text


def _visible(message: dict) -> str:
    return THINK.sub("", _content_text(message)).replace("</think>", "").strip()


def _reasoning(message: dict) -> str:
    if message.get("reasoning_content"):
        return message["reasoning_content"].strip()
    found = THINK.search(_content_text(message))
    return found.group(1).strip() if found else ""


def _after_opened_think(context: str, target: str) -> str:
    """A prompt that opens a think block the template then writes the data's own block after (Nemotron-Nano-v2's
    final turn: "<think>\\n" + "<think>\\n...</think>answer"): the opening is the prompt's, once."""
    opened = context[context.rfind("<think>") :] if "<think>" in context else ""
    if opened and "</think>" not in opened and target.startswith(opened):
        return target[len(opened) :]
    return target


def _without_reasoning(message: dict) -> dict:
    return {k: v for k, v in message.items() if k != "reasoning_content"}


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)
