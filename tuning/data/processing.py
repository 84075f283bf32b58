"""The tokenizer and processor of a run: loaded from the model, then changed in one step before any sample is
encoded, and what changed is returned.

Three things change them: a chat template from --chat_template (put on both, so everything saved carries it), the
grounding tags added as tokens (only for models without grounding tokens of their own, only when the data uses
them), and the resolution options put on the processor. The model phase takes the result (new token rows, and the
rows to train); the data layer reads the tokenizer and never changes it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from tuning.data.media.resolution import MediaOptions, configure
from tuning.data.template import ChatTemplate, TemplateError, record_template_file
from tuning.families import AUTO, Family, GroundingStyle, family_of, grounding_style, is_vision_language

logger = logging.getLogger(__name__)


class Loaded(NamedTuple):
    tokenizer: object
    processor: object | None  # None for a text-only model
    family: Family


def load_processing(model_name_or_path: str, trust_remote_code: bool = False, config_from: str | None = None) -> Loaded:
    """The tokenizer, the processor (vision-language models) and the family record of a model folder or hub name.

    `config_from` names the model whose config decides the family, for folders that hold only the
    tokenizer/processor (an adapter folder)."""
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    config = AutoConfig.from_pretrained(config_from or model_name_or_path, trust_remote_code=trust_remote_code)
    if is_vision_language(config):
        processor = AutoProcessor.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
        mend_template(processor.tokenizer, processor)
        return Loaded(processor.tokenizer, processor, family_of(config))
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    mend_template(tokenizer)
    return Loaded(tokenizer, None, family_of(config))


def load_run_processing(model_path: str, adapter: str | Path | None = None) -> Loaded:
    """The tokenizer and processor a LoRA run saved beside its adapter (its chat template, the tokens it added),
    else the base model's; the family is always the base model's."""
    saved = adapter is not None and (Path(adapter) / "tokenizer_config.json").is_file()
    return load_processing(str(adapter if saved else model_path), config_from=str(model_path))


# llava-hf's LLaVA-NeXT Mistral template (llava-v1.6-mistral-7b-hf) closes each answer with the text '<\s>', a typo of
# '</s>': trained as written, the model would learn to type it and never reach the end-of-sequence token that LLaVA's
# own training put there.
_MISSPELT_EOS = ("'<\\s> '", "'</s> '")


def mend_template(tokenizer, processor=None) -> None:
    """Mend a known typo in a model's own chat template, with one log line."""
    typo, fixed = _MISSPELT_EOS
    if getattr(tokenizer, "eos_token", None) != "</s>":
        return
    mended = False
    for holder in (tokenizer, processor):
        template = getattr(holder, "chat_template", None)
        if isinstance(template, str) and typo in template:
            holder.chat_template = template.replace(typo, fixed)
            mended = True
    if mended:
        logger.info(
            "the chat template closes answers with %s, a typo of %s (llava-hf's LLaVA-NeXT): read as %s",
            typo,
            fixed,
            fixed,
        )


@dataclass
class Processing:
    """The tokenizer and processor as the run encodes with them, and what was changed on them."""

    tokenizer: object
    processor: object | None
    family: Family
    grounding: GroundingStyle
    added_tokens: list[str] = field(default_factory=list)  # new special tokens: the model makes and trains rows
    chat_template: str | None = None  # the --chat_template file now on the tokenizer and processor
    media: MediaOptions | None = None  # the resolution options now on the processor (saved with the output)

    @property
    def saved(self):
        """What is saved beside the model: the processor, or the tokenizer of a text model."""
        return self.processor or self.tokenizer

    def template_tokens(self) -> list[str]:
        """The special tokens the chat template writes around a turn (ChatML's start and end of a turn): rows
        that a base model may never have trained."""
        template = ChatTemplate(self.tokenizer)
        try:
            text = template.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
        except TemplateError:
            return []
        return [token for token in template.special_tokens if token in text]


def prepare_processing(
    loaded: Loaded,
    *,
    chat_template: str | None = None,
    media: MediaOptions | None = None,
    grounding_format: str = AUTO,
    uses_grounding: bool = False,
) -> Processing:
    """Change the tokenizer and processor for a run, in one place: the chat template file, the resolution options,
    and the grounding tags as new tokens where the model's convention is the tags and the data uses them."""
    tokenizer, processor, family = loaded
    if chat_template:
        template = Path(chat_template).read_text(encoding="utf-8")
        tokenizer.chat_template = template
        record_template_file(tokenizer, chat_template)  # messages name the file, not the model
        if processor is not None:
            processor.chat_template = template
    if processor is not None and media is not None:
        configure(processor, media, family.resolution, family.tiles)
    style = grounding_style(family, tokenizer.get_vocab(), grounding_format)
    added = []
    if style.added and uses_grounding:
        vocab = tokenizer.get_vocab()
        added = [tag for tag in (*style.ref, *style.box) if tag not in vocab]
        if added:
            tokenizer.add_special_tokens({"additional_special_tokens": added}, replace_extra_special_tokens=False)
    return Processing(
        tokenizer,
        processor,
        family,
        style,
        added,
        chat_template,
        media if processor is not None else None,
    )
