"""The data options, defined once: finetune.py and `python -m tuning.data` both use them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tuning.data.cache import cache_root
from tuning.data.encode import OVERLONG_POLICIES, Encoder
from tuning.data.media.images import ImageLimits
from tuning.data.media.resolution import (
    DEFAULT_IMAGE_MAX_PIXELS,
    DEFAULT_VIDEO_MAX_PIXELS,
    DEFAULT_VIDEO_MIN_PIXELS,
    MediaOptions,
    pixels,
)
from tuning.data.processing import Loaded, Processing, prepare_processing
from tuning.data.readers.preference import STAGES
from tuning.families import AUTO, GROUNDING_STYLES


@dataclass
class DataArguments:
    stage: str = field(
        default="sft",
        metadata={
            "help": 'sft: supervised fine-tuning (and {"text"} records, pre-training); pt: the same. dpo: preference '
            "pairs (DPO and its family, ORPO, SimPO: --pref_loss); kto: unpaired completions with a desirable label "
            "(pairs are unpaired); rm: a reward model from pairs. Each stage reads only its kind of records.",
            "choices": list(STAGES),
        },
    )
    data_path: list[str] = field(
        default_factory=lambda: ["data/example.json"],
        metadata={
            "help": "Training data: JSON, JSONL, parquet or CSV files, or a saved datasets folder, in any format "
            "of the README's table (Qwen-VL, LLaVA, ShareGPT, OpenAI/ms-swift messages, alpaca, ...). Several "
            "may be given, and formats may be mixed."
        },
    )
    eval_data_path: list[str] | None = field(
        default=None, metadata={"help": "Evaluation data, in the same formats. Eval loss runs at --eval_steps."}
    )
    lazy_preprocess: bool = field(
        default=False,
        metadata={
            "help": "Kept for the Qwen scripts; every run now does what it was for: samples are encoded once into "
            "the dataset cache and memory-mapped, and pixel values are computed per batch, so memory does not grow "
            "with the data."
        },
    )
    dataset_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where encoded samples are kept and memory-mapped on later runs (default "
            "~/.cache/qwen-tuning/datasets): a run with the same data files, tokenizer, template and options encodes "
            "nothing. 'none': encode into a temporary folder, removed at exit."
        },
    )
    model_max_length: int = field(
        default=2048, metadata={"help": "Longest sample in tokens, image tokens included; see --overlong."}
    )
    overlong: str = field(
        default="turns",
        metadata={
            "help": "What to do with a sample over --model_max_length: 'turns' keeps the whole turns that fit "
            "(never cutting an image), 'drop' drops it, 'error' refuses to start. Each is reported by id.",
            "choices": list(OVERLONG_POLICIES),
        },
    )
    preprocessing_num_workers: int | None = field(
        default=None,
        metadata={
            "help": "Processes that encode the data (default: the cores this rank may use; the other ranks of a node "
            "wait for its first rank). A set that encodes in under about 10 s is encoded in-process."
        },
    )
    packing: bool = field(
        default=True,
        metadata={
            "help": "Padding-free batches: samples are concatenated with per-sample positions, so none "
            "attends to another and no compute goes to padding. False pads each batch to its longest."
        },
    )
    max_tokens_per_batch: int | None = field(
        default=None,
        metadata={
            "help": "Fill each batch with whole samples up to this many tokens (best-fit decreasing, as TRL packs) "
            "instead of --per_device_train_batch_size samples: memory stays flat over long-tailed data. The loss is "
            "normalised over the supervised tokens of the whole optimizer step."
        },
    )
    image_folder: str | None = field(
        default=None, metadata={"help": "Where relative image paths are looked up after the data file's folder."}
    )
    grounding_format: str = field(
        default=AUTO,
        metadata={
            "help": "How <ref>/<box> are written for the model: auto (its own convention), "
            + ", ".join(f"{name} ({style.description})" for name, style in GROUNDING_STYLES.items())
            + ".",
            "choices": [AUTO, *GROUNDING_STYLES],
        },
    )
    skip_bad_samples: bool = field(
        default=False,
        metadata={"help": "Drop bad samples (listed in the data report) instead of refusing to start."},
    )
    ignore_unknown_fields: bool = field(
        default=False,
        metadata={
            "help": "Train on samples with fields the readers do not know, without those fields (each is "
            "counted in the data report). Default: such a field is an error, so that nothing is dropped silently."
        },
    )
    train_on_last_turn_only: bool = field(
        default=False,
        metadata={
            "help": "Supervise only the last assistant turn of each conversation (LLaMA-Factory's mask_history)."
        },
    )
    chat_template: str | None = field(
        default=None,
        metadata={
            "help": "A .jinja file that replaces the model's chat template (for a base model without one, or a "
            "house template); it is saved with the output, so the trained model renders the same way everywhere."
        },
    )
    enable_thinking: bool | None = field(
        default=None,
        metadata={
            "help": "Passed to the chat template (Qwen3): False renders every prompt in non-thinking mode, with the "
            "empty think block in the context. Default: the template's own default."
        },
    )
    image_max_pixels: str = field(
        default=str(DEFAULT_IMAGE_MAX_PIXELS),
        metadata={
            "help": "Largest picture the model sees, in pixels (768*768 by default, or the model's own maximum if "
            "lower): the processor resizes larger ones. A 12 MP photo (4032x3024) then becomes 713 image tokens on "
            "Qwen2.5-VL instead of about 15,500. 'model' keeps the model's own setting. Saved with the output."
        },
    )
    image_min_pixels: str | None = field(
        default=None, metadata={"help": "Smallest picture, in pixels: smaller ones are enlarged. Default: the model's."}
    )
    image_max_tiles: int | None = field(
        default=None,
        metadata={
            "help": "Most tiles (crops) one picture is split into, for families that tile: InternVL's max_patches, "
            "Idefics3/SmolVLM's splitting (1: off), Gemma 3's pan and scan "
            "(off by default; N > 1 turns it on). Default: the model's own. Saved with the output."
        },
    )
    video_max_pixels: str = field(
        default=str(DEFAULT_VIDEO_MAX_PIXELS),
        metadata={"help": "Largest video frame, in pixels (default 256*256); 'model' keeps the model's own."},
    )
    video_min_pixels: str = field(
        default=str(DEFAULT_VIDEO_MIN_PIXELS), metadata={"help": "Smallest video frame, in pixels (default 16*16)."}
    )
    video_fps: float = field(default=2.0, metadata={"help": "Video frames sampled per second."})
    video_maxlen: int = field(default=128, metadata={"help": "Most frames sampled from one video."})
    max_images_per_sample: int = field(default=32, metadata={"help": "Most images and videos one sample may carry."})
    image_timeout: float = field(default=20.0, metadata={"help": "Seconds to wait for an image URL to answer."})
    max_image_bytes: int = field(default=20 * 1024 * 1024, metadata={"help": "Largest image file or download."})
    max_video_bytes: int = field(default=256 * 1024 * 1024, metadata={"help": "Largest video file or download."})
    max_video_seconds: float = field(default=600.0, metadata={"help": "Longest video, in seconds."})
    max_image_pixels: int = field(
        default=ImageLimits.max_pixels,
        metadata={"help": "Largest image in pixels (width x height): a decompression bomb stops here."},
    )

    def __post_init__(self):
        # Accept "a.json,b.json" as well as "a.json b.json".
        self.data_path = [p for item in self.data_path for p in item.split(",") if p]
        if self.eval_data_path:
            self.eval_data_path = [p for item in self.eval_data_path for p in item.split(",") if p]

    def problems(self) -> list[str]:
        found = []
        if self.model_max_length < 16:
            found.append(f"--model_max_length {self.model_max_length} is too small to hold a conversation")
        if not self.data_path:
            found.append("--data_path is empty: give at least one data file")
        if self.chat_template and not Path(self.chat_template).is_file():
            found.append(f"--chat_template {self.chat_template}: no such file")
        try:
            self.media_options()
        except ValueError as e:
            found.append(f"a pixel flag: {e}")
        if self.max_tokens_per_batch is not None and self.max_tokens_per_batch < 1:
            found.append(f"--max_tokens_per_batch must be positive, got {self.max_tokens_per_batch}")
        if self.preprocessing_num_workers is not None and self.preprocessing_num_workers < 1:
            found.append(f"--preprocessing_num_workers must be at least 1, got {self.preprocessing_num_workers}")
        if self.image_max_tiles is not None and self.image_max_tiles < 1:
            found.append(f"--image_max_tiles must be at least 1, got {self.image_max_tiles}")
        if self.video_fps <= 0 or self.video_maxlen < 1:
            found.append("--video_fps and --video_maxlen must be positive")
        return found

    def image_limits(self) -> ImageLimits:
        return ImageLimits(
            read_timeout=self.image_timeout,
            max_bytes=self.max_image_bytes,
            max_pixels=self.max_image_pixels,
            max_video_bytes=self.max_video_bytes,
            max_video_seconds=self.max_video_seconds,
        )

    def media_options(self) -> MediaOptions:
        return MediaOptions(
            image_max_pixels=pixels(self.image_max_pixels),
            image_min_pixels=pixels(self.image_min_pixels),
            video_max_pixels=pixels(self.video_max_pixels),
            video_min_pixels=pixels(self.video_min_pixels),
            video_fps=self.video_fps,
            video_maxlen=self.video_maxlen,
            image_max_tiles=self.image_max_tiles,
        )

    def template_kwargs(self) -> dict:
        return {} if self.enable_thinking is None else {"enable_thinking": self.enable_thinking}

    def cache_root(self) -> Path | None:
        """The --dataset_cache_dir folder, made; None when off. Raises CacheError naming a folder it cannot use."""
        return cache_root(self.dataset_cache_dir)

    def processing(self, loaded: Loaded, uses_grounding: bool) -> Processing:
        """The tokenizer and processor changed for these options and this data, in the one step that changes them
        (tuning.data.processing): the --chat_template file, the pixel options, grounding tags where the data uses
        them."""
        return prepare_processing(
            loaded,
            chat_template=self.chat_template,
            media=self.media_options(),
            grounding_format=self.grounding_format,
            uses_grounding=uses_grounding,
        )

    def encoder(self, processing: Processing) -> Encoder:
        """The encoder for these options, reading the run's tokenizer and processor."""
        return Encoder(
            processing.tokenizer,
            processing.processor,
            family=processing.family,
            max_length=self.model_max_length,
            grounding=processing.grounding,
            overlong=self.overlong,
            image_folder=self.image_folder,
            image_limits=self.image_limits(),
            max_images=self.max_images_per_sample,
            template_kwargs=self.template_kwargs(),
            train_on_last_turn_only=self.train_on_last_turn_only,
        )
