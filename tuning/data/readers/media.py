"""Pictures, videos and boxes in the text: Qwen-VL's <img> tags, the <image>/<video> placeholders of LLaVA,
LLaMA-Factory and ms-swift matched to their file lists, XTuner's <IMG_CONTEXT>, ms-swift's grounding objects."""

from __future__ import annotations

import io
import re

from tuning.data.conversation import BoxRef, ImageRef, Message, Part, VideoRef
from tuning.data.readers.common import Reading

# Qwen-VL writes "Picture N: " before each image; the model's template writes its own numbering.
IMAGE_TAG = re.compile(r"(?:Picture\s+\d+\s*:\s*)?<img>(.*?)</img>", re.DOTALL)
PICTURE_LABEL = re.compile(r"Picture\s+\d+\s*:\s*<img>")
PLACEHOLDERS = {"image": "<image>", "video": "<video>"}
XTUNER_PLACEHOLDER = "<IMG_CONTEXT>"
AUDIO_PLACEHOLDER = "<audio>"
REF_OBJECT, BBOX = "<ref-object>", "<bbox>"


def split_image_tags(reading: Reading, text: str, index: int) -> list[Part]:
    """Split "Picture N: <img>PATH</img>" spans out of a text into image parts, in place."""
    if PICTURE_LABEL.search(text):
        reading.conv.add_vision_id = True
    parts: list[Part] = []
    position = 0
    for match in IMAGE_TAG.finditer(text):
        parts.append(text[position : match.start()])
        source = match.group(1).strip()
        if not source or "<img>" in source:
            raise reading.error(
                f"<img> tag at character {match.start()} has no image path", "write <img>PATH</img>", index, "value"
            )
        parts.append(ImageRef(source, reading.base_dir))
        position = match.end()
    parts.append(text[position:])
    leftover = "".join(p for p in parts if isinstance(p, str))
    if "<img>" in leftover or "</img>" in leftover:
        raise reading.error(
            "an <img> tag is not closed (or a </img> has no <img>)", "write <img>PATH</img>", index, "value"
        )
    return [p for p in parts if p != ""]


def split_at(text: str, placeholder: str, refs) -> list[Part]:
    """Replace each placeholder by the next ref. The newline that sets a placeholder apart from the text
    ("<image>\\nWhat is it?", "What is it?\\n<image>") goes with it: the picture is its own content part,
    as at inference."""
    pieces = text.split(placeholder)
    parts: list[Part] = []
    for i, piece in enumerate(pieces):
        if i > 0:
            parts.append(next(refs))
            piece = piece.removeprefix("\n")
        if i < len(pieces) - 1 and i == len(pieces) - 2 and not pieces[-1].strip():
            piece = piece.removesuffix("\n")
        parts.append(piece)
    return [p for p in parts if p != ""]


def media_list(reading: Reading, record: dict, kind: str) -> list[ImageRef | VideoRef] | None:
    """The files of `images`/`image` (or `videos`/`video`) as refs; None when the record lists none."""
    plural, singular = f"{kind}s", kind
    if plural in record and singular in record:
        raise reading.error(f"both '{singular}' and '{plural}' are given", f"list every {kind} in '{plural}'")
    key = plural if plural in record else singular if singular in record else None
    if key is None or record[key] is None:
        return None
    value = record[key]
    items = value if isinstance(value, list) else [value]
    return [_ref(reading, item, kind, key) for item in items]


def _ref(reading: Reading, item, kind: str, key: str) -> ImageRef | VideoRef:
    if kind == "video":
        if isinstance(item, str) and item:
            return VideoRef(item, reading.base_dir)
        if isinstance(item, list) and item and all(isinstance(frame, str) and frame for frame in item):
            return VideoRef(tuple(item), reading.base_dir)  # a video given as its frames
        raise reading.error(
            f"'{key}' holds {item!r:.60}", "give each video as a path, a URL or a list of frames", field=key
        )
    source = _image_source(item)
    if source is None:
        raise reading.error(f"'{key}' holds {item!r:.60}", "give each image as a path, a URL or a data URI", field=key)
    return ImageRef(source, reading.base_dir)


def _image_source(item) -> str | bytes | None:
    """A path, URL or data URI; an image stored inside a parquet file or a saved dataset stays the bytes of its
    encoded file, decoded only when the sample is encoded (a base64 copy would take a third more memory)."""
    if isinstance(item, str) and item:
        return item
    if isinstance(item, (bytes, bytearray)) and item:  # a binary column of encoded image files
        return bytes(item)
    if isinstance(item, dict):
        if isinstance(item.get("bytes"), (bytes, bytearray)) and item["bytes"]:
            return bytes(item["bytes"])
        if isinstance(item.get("path"), str) and item["path"]:
            return item["path"]
    if hasattr(item, "save") and hasattr(item, "size"):  # a PIL image, as `datasets` decodes an image column
        buffer = io.BytesIO()
        item.save(buffer, format="PNG")
        return buffer.getvalue()
    return None


def place_listed_media(reading: Reading, messages: list[Message], record: dict) -> None:
    """Match `images` and `videos` to the <image> and <video> placeholders, in order, in every message.

    A sample that lists images but has no <image> placeholder gets them at the start of its first user turn,
    as LLaVA does; any other count that differs, and a placeholder with nothing listed, is an error."""
    for kind, placeholder in PLACEHOLDERS.items():
        refs = media_list(reading, record, kind)
        found = [(i, m) for i, m in enumerate(messages) for p in m.parts if isinstance(p, str) and placeholder in p]
        count = sum(p.count(placeholder) for m in messages for p in m.parts if isinstance(p, str))
        if refs is None:
            if count:
                raise reading.error(
                    f"{placeholder} appears {count} time(s) but the sample lists no {kind}s",
                    f"list the file(s) in '{kind}s', or remove the {placeholder} text (it is never trained as text)",
                    found[0][0],
                    "content",
                )
            continue
        if count == 0 and refs:
            first_user = next((m for m in messages if m.role == "user"), None)
            if first_user is None:
                raise reading.error(f"{kind}s are listed but there is no user turn to put them in", field=f"{kind}s")
            first_user.parts[:0] = refs
            continue
        if count != len(refs):
            raise reading.error(
                f"{count} {placeholder} placeholder(s) but {len(refs)} {kind}(s) listed in '{kind}s'",
                f"write one {placeholder} per listed {kind}, where it belongs in the text",
                found[0][0] if found else None,
                f"{kind}s",
            )
        pending = iter(refs)
        for message in messages:
            message.parts = [
                q for p in message.parts for q in (split_at(p, placeholder, pending) if isinstance(p, str) else [p])
            ]


def place_inline_media(reading: Reading, parts: list[Part], index: int) -> list[Part]:
    """XTuner writes a message's pictures as image_url parts and marks where they go with <IMG_CONTEXT>."""
    count = sum(p.count(XTUNER_PLACEHOLDER) for p in parts if isinstance(p, str))
    if not count:
        return parts
    media = [p for p in parts if isinstance(p, (ImageRef, VideoRef))]
    if count != len(media):
        raise reading.error(
            f"{count} {XTUNER_PLACEHOLDER} placeholder(s) but {len(media)} image or video part(s) in the message",
            f"write one {XTUNER_PLACEHOLDER} per image or video part",
            index,
            "content",
        )
    pending = iter(media)
    text_parts = [p for p in parts if not isinstance(p, (ImageRef, VideoRef))]
    return [q for p in text_parts for q in (split_at(p, XTUNER_PLACEHOLDER, pending) if isinstance(p, str) else [p])]


def refuse_audio_placeholders(reading: Reading, messages: list[Message]) -> None:
    for i, message in enumerate(messages):
        if any(AUDIO_PLACEHOLDER in p for p in message.parts if isinstance(p, str)):
            raise reading.error(
                f"{AUDIO_PLACEHOLDER} in the text: no audio model is supported",
                f"remove the audio samples, or the {AUDIO_PLACEHOLDER} text",
                i,
                "content",
            )


def place_objects(reading: Reading, messages: list[Message], objects) -> None:
    """ms-swift grounding: each <ref-object> takes the next name of objects.ref, each <bbox> the next box."""
    if not isinstance(objects, dict):
        raise reading.error("'objects' must be an object with 'ref' and 'bbox' lists", field="objects")
    reading.check_keys(objects, {"ref", "bbox", "bbox_type", "image_id"}, "objects")
    refs, boxes = objects.get("ref") or [], objects.get("bbox") or []
    space = {"real": "pixels", "norm1": "norm1", "norm1000": "norm1000"}.get(objects.get("bbox_type", "real"))
    if space is None:
        raise reading.error(
            f"objects.bbox_type {objects['bbox_type']!r}", "use 'real' (pixels) or 'norm1'", field="objects"
        )
    image_ids = objects.get("image_id", 0)
    image_ids = image_ids if isinstance(image_ids, list) else [image_ids] * len(boxes)
    texts = [p for m in messages for p in m.parts if isinstance(p, str)]
    counts = {tag: sum(t.count(tag) for t in texts) for tag in (REF_OBJECT, BBOX)}
    if counts[REF_OBJECT] != len(refs) or counts[BBOX] != len(boxes) or len(image_ids) != len(boxes):
        raise reading.error(
            f"{counts[REF_OBJECT]} {REF_OBJECT} and {counts[BBOX]} {BBOX} in the text, but objects has "
            f"{len(refs)} ref(s), {len(boxes)} bbox(es) and {len(image_ids)} image_id(s)",
            f"write one {REF_OBJECT} per objects.ref entry and one {BBOX} per objects.bbox entry",
            field="objects",
        )
    pending_refs = iter(f"<ref>{name}</ref>" for name in refs)
    pending_boxes = iter(_box(reading, box, space, image) for box, image in zip(boxes, image_ids, strict=True))
    for message in messages:
        parts: list[Part] = []
        for part in message.parts:
            if not isinstance(part, str):
                parts.append(part)
                continue
            text = re.sub(re.escape(REF_OBJECT), lambda _: next(pending_refs), part)
            parts += [q for q in _split_boxes(text, pending_boxes)]
        message.parts = parts


def _split_boxes(text: str, pending) -> list[Part]:
    pieces = text.split(BBOX)
    parts: list[Part] = [pieces[0]]
    for piece in pieces[1:]:
        parts += [next(pending), piece]
    return [p for p in parts if p != ""]


def _box(reading: Reading, box, space: str, image_index) -> BoxRef:
    if not isinstance(box, list) or not all(isinstance(c, (int, float)) for c in box):
        raise reading.error(f"objects.bbox entry {box!r:.60} is not a list of numbers", field="objects")
    if len(box) != 4:
        raise reading.error(
            f"objects.bbox entry {box!r:.60} has {len(box)} numbers; only boxes [x1, y1, x2, y2] are supported "
            "(points are not)",
            "give boxes as [x1, y1, x2, y2]",
            field="objects",
        )
    if not isinstance(image_index, int) or image_index < 0:
        raise reading.error(f"objects.image_id {image_index!r} is not an image index", field="objects")
    return BoxRef(tuple(float(c) for c in box), space, image_index)
