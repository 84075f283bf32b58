"""Load a video named in the data (a local file, an http(s) URL, or a list of frame images) within limits,
decoding only the frames the model's video processor samples (PyAV; `pip install av`)."""

from __future__ import annotations

import io

import numpy as np

from tuning.data.conversation import ImageRef, VideoRef
from tuning.data.media.images import ImageLimits, ImageLoadError, fetch_url, load_image, resolve_local


def load_video(ref: VideoRef, sample_frames, frames_fps: float, image_folder: str | None, limits: ImageLimits):
    """(frames as a (T, H, W, 3) uint8 array, VideoMetadata with the sampled frame indices).

    `sample_frames(metadata)` is the model's video processor's own frame sampling; a video given as frame
    images is taken as sampled already, at `frames_fps` frames per second."""
    from transformers.video_utils import VideoMetadata

    if isinstance(ref.source, tuple):
        images = [np.asarray(load_image(ImageRef(frame, ref.base_dir), image_folder, limits)) for frame in ref.source]
        if len({image.shape for image in images}) > 1:
            raise ImageLoadError(f"the frames of video {ref.source[0]}... differ in size; give frames of one size")
        count = len(images)
        metadata = VideoMetadata(
            total_num_frames=count,
            fps=frames_fps,
            width=images[0].shape[1],
            height=images[0].shape[0],
            duration=count / frames_fps,
            frames_indices=list(range(count)),
        )
        return np.stack(images), metadata
    return _decode(_video_bytes(ref, image_folder, limits), ref.source, sample_frames, limits)


def _video_bytes(ref: VideoRef, image_folder: str | None, limits: ImageLimits) -> bytes:
    source = ref.source
    if source.startswith(("http://", "https://")):
        return fetch_url(source, limits, kind="video", max_bytes=limits.max_video_bytes)
    if "://" in source or source.startswith("data:"):
        raise ImageLoadError(f"video {source!r} uses an unsupported scheme; use a local path or http(s)")
    path = resolve_local(ImageRef(source, ref.base_dir), image_folder)
    if path.stat().st_size > limits.max_video_bytes:
        raise ImageLoadError(f"video file {source} is over the limit of {limits.max_video_bytes} bytes")
    return path.read_bytes()


def _decode(data: bytes, name: str, sample_frames, limits: ImageLimits):
    try:
        import av
    except ImportError:
        raise ImageLoadError("videos need PyAV to be decoded: pip install av") from None
    from transformers.video_utils import VideoMetadata

    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise ImageLoadError(f"video {name} has no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or 0) or 24.0
            duration = float(stream.duration * stream.time_base) if stream.duration else (container.duration or 0) / 1e6
            total = stream.frames or round(duration * fps)
            width, height = stream.codec_context.width, stream.codec_context.height
            if duration > limits.max_video_seconds:
                raise ImageLoadError(
                    f"video {name} lasts {duration:.0f} s, over the limit of {limits.max_video_seconds:.0f} s"
                )
            if width * height > limits.max_pixels:
                raise ImageLoadError(
                    f"video {name} has {width}x{height} frames, over the limit of {limits.max_pixels} pixels"
                )
            if total <= 0:
                raise ImageLoadError(f"video {name} has no frames")
            metadata = VideoMetadata(total_num_frames=total, fps=fps, width=width, height=height, duration=duration)
            wanted = [int(i) for i in sample_frames(metadata)]
            frames = _frames_at(container, stream, set(wanted))
    except ImageLoadError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, IndexError) as e:
        raise ImageLoadError(f"video {name} cannot be read: it is corrupt, truncated or not a video ({e})") from None
    missing = [i for i in wanted if i not in frames]
    if missing:
        # the container promised more frames than it holds (a cut-off file): keep what decodes, in order
        raise ImageLoadError(f"video {name} cannot be read: frames {missing[:3]} are missing (truncated?)")
    metadata.frames_indices = wanted
    return np.stack([frames[i] for i in wanted]), metadata


def _frames_at(container, stream, wanted: set[int]) -> dict[int, np.ndarray]:
    frames, last = {}, max(wanted)
    for index, frame in enumerate(container.decode(stream)):
        if index in wanted:
            frames[index] = frame.to_ndarray(format="rgb24")
        if index >= last:
            break
    return frames
