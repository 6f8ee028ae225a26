"""Video decoding (PyAV) and the interval / clip plan of the synthetic pretraining corpus
(VIDEOLIGHTS_SPEC section 6b, Algorithm 1).

A video of duration d seconds has n_clips = ceil(d / clip_len) clips; clip j covers
[j * clip_len, (j + 1) * clip_len) and is represented by the frame shown at its centre (the
official CLIP features are one frame per 2 s as well). Moments are the paper's ~10-s intervals:
the video is split into n = max(1, floor(d / interval + 1/2)) equal intervals, which is what the
reference rows in pre_train_blip.jsonl show (29 s -> 3 x 9.67 s, 25 s -> 3 x 8.33 s, 24 s -> 2 x
12 s): every second of the video belongs to exactly one moment and no moment is a 1-s stub.
The interval's caption frame is the frame of the clip containing the interval's midpoint, so one
decoding pass at one frame per clip serves both the captioner and the per-clip CLIP features.

Framework-free: numpy and PyAV only (no torch, no ray).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".flv")
_EPS = 1e-6


class VideoDecodeError(RuntimeError):
    """A video that cannot be decoded; the message names the file and the decoder's reason."""

    def __init__(self, source: str, reason: str) -> None:
        self.source = source
        self.reason = reason
        super().__init__(f"{source}: cannot decode video: {reason}")


@dataclass(frozen=True)
class Interval:
    """One moment of the corpus: [start, end] seconds, the clips it overlaps, its caption clip."""

    start: float
    end: float
    clip_ids: tuple[int, ...]
    caption_clip: int


@dataclass
class DecodedVideo:
    """One frame per clip (RGB uint8, (n_clips, H, W, 3)) and the decoded duration in seconds."""

    duration: float
    clip_len: float
    frames: np.ndarray
    fps: float

    @property
    def n_clips(self) -> int:
        return len(self.frames)


def num_clips(duration: float, clip_len: float) -> int:
    """Clips of `clip_len` seconds covering `duration` (the last one may be partial)."""
    if duration <= 0 or clip_len <= 0:
        raise ValueError(f"duration ({duration}) and clip_len ({clip_len}) must be > 0")
    return max(1, math.ceil(duration / clip_len - _EPS))


def plan_intervals(duration: float, interval: float, clip_len: float) -> list[Interval]:
    """Split [0, duration] into equal ~`interval`-second moments and list each one's clips.

    A clip belongs to a moment when it overlaps it (more than rounding noise), so a moment
    boundary inside a clip puts that clip in both neighbours, as in the reference rows.
    """
    if interval <= 0:
        raise ValueError(f"interval must be > 0, got {interval}")
    n_clips = num_clips(duration, clip_len)
    n = max(1, math.floor(duration / interval + 0.5))
    step = duration / n
    out = []
    for k in range(n):
        start = k * step
        end = duration if k == n - 1 else (k + 1) * step
        first = min(math.floor(start / clip_len + _EPS), n_clips - 1)
        last = max(first, min(math.ceil(end / clip_len - _EPS), n_clips) - 1)
        middle = min(max(math.floor((start + end) / 2 / clip_len), first), last)
        out.append(Interval(start, end, tuple(range(first, last + 1)), middle))
    return out


def _target_size(width: int, height: int, frame_size: int) -> tuple[int, int]:
    """(w, h) with the shorter side at most `frame_size`, aspect kept, even numbers."""
    scale = min(1.0, frame_size / max(1, min(width, height)))
    w = max(2, int(round(width * scale / 2)) * 2)
    h = max(2, int(round(height * scale / 2)) * 2)
    return w, h


def decode_clip_frames(
    path: str | Path, clip_len: float, *, frame_size: int = 224, source: str | None = None
) -> DecodedVideo:
    """Decode `path` once and keep the frame shown at each clip's centre.

    Frames are downscaled while decoding (shorter side <= frame_size; the model processors
    resize again) so a 150-s video costs 75 small frames, not its full-resolution stream. The
    duration is what was decoded (last frame time + one frame), not the container's header,
    which truncated files get wrong. Raises VideoDecodeError (naming `source`) on any failure.
    """
    import av

    source = source or str(path)
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, ValueError) as err:
        raise VideoDecodeError(source, f"{type(err).__name__}: {err}") from None
    try:
        if not container.streams.video:
            raise VideoDecodeError(source, "no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        t0 = float(stream.start_time * stream.time_base) if stream.start_time is not None else None
        size: tuple[int, int] | None = None
        kept: list[np.ndarray] = []  # kept[j] = frame at clip j's centre
        last_time, last_frame = -1.0, None
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            t = float(frame.pts * stream.time_base)
            if t0 is None:
                t0 = t
            t -= t0
            if size is None:
                size = _target_size(frame.width, frame.height, frame_size)
            # the first frame at or after a clip centre represents that clip; a frame that
            # lands past several centres (low fps) represents all of them
            image = None
            while (len(kept) + 0.5) * clip_len <= t + _EPS:
                if image is None:
                    image = frame.to_ndarray(format="rgb24", width=size[0], height=size[1])
                kept.append(image)
            last_time, last_frame = t, frame
        if last_frame is None or size is None:
            raise VideoDecodeError(source, "no decodable video frames")
        frame_dur = 1.0 / fps if fps > 0 else 0.0
        duration = round(last_time + frame_dur, 3)
        n = num_clips(duration, clip_len)
        if len(kept) < n:  # centres after the last frame (the partial last clip)
            tail = last_frame.to_ndarray(format="rgb24", width=size[0], height=size[1])
            kept.extend([tail] * (n - len(kept)))
        frames = np.stack(kept[:n])
    except VideoDecodeError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, RuntimeError) as err:
        raise VideoDecodeError(source, f"{type(err).__name__}: {err}") from None
    finally:
        container.close()
    return DecodedVideo(duration=duration, clip_len=clip_len, frames=frames, fps=fps)


def write_test_video(
    path: str | Path,
    duration_s: float,
    *,
    fps: int = 8,
    size: int = 64,
    colors: list[tuple[int, int, int]] | None = None,
    seed: int = 0,
) -> None:
    """A short synthetic MPEG-4 video: a solid colour per 10-s segment plus a moving square.

    For demos and tests (no real video needed). Frame i is shown at i / fps seconds.
    """
    import av

    rng = np.random.default_rng(seed)
    if colors is None:
        colors = [tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(8)]
    n_frames = int(round(duration_s * fps))
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(n_frames):
            img = np.empty((size, size, 3), dtype=np.uint8)
            img[:] = colors[int(i / fps // 10) % len(colors)]
            x = (i * 2) % (size - 8)
            img[8:16, x : x + 8] = 255
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
