"""Load models with their tokenizer or processor; the family is read from the config, never the name."""

from __future__ import annotations

from transformers import AutoConfig, AutoProcessor, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def is_vision_language(config) -> bool:
    return config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def load_processing(model_name_or_path: str, trust_remote_code: bool = False):
    """(tokenizer, processor or None, model_type) for a model folder or hub name."""
    config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    if is_vision_language(config):
        processor = AutoProcessor.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
        return processor.tokenizer, processor, config.model_type
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    return tokenizer, None, config.model_type
