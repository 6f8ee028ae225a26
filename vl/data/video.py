"""Video decoding (PyAV): the frame at each clip's centre, a video library's listing, and the
interval / clip plan of the synthetic pretraining corpus (VIDEOLIGHTS_SPEC section 6b, Algorithm 1).

A video of duration d seconds has n_clips = ceil(d / clip_len) clips; clip j covers
[j * clip_len, (j + 1) * clip_len) and is represented by the first frame shown at or after its
centre (the official CLIP features are one frame per 2 s as well). Every extraction path
(jobs.extract, jobs.predict, jobs.pretrain_corpus) reads frames through `ClipFrameReader`, so a
feature computed for training and one computed at prediction time come from the same frame.

Why seek instead of decoding every frame: a 2-s clip at 30 fps is 60 frames of which one is
kept. The reader first indexes the packets (demuxing only, no decoding: it also gives the real
duration, which truncated files' headers get wrong), then for each centre decodes forward from
wherever it is, unless a keyframe lies between its position and the centre: then it seeks to that
keyframe and skips the frames in between. With keyframes every few seconds (typical of phone and
web video) most of the stream is never decoded; with one keyframe per video it degrades to the
sequential decode, never worse (benchmarks.extract measures both).

Moments are the paper's ~10-s intervals: the video is split into n = max(1, floor(d / interval +
1/2)) equal intervals, which is what the reference rows in pre_train_blip.jsonl show (29 s -> 3 x
9.67 s, 25 s -> 3 x 8.33 s, 24 s -> 2 x 12 s). The interval's caption frame is the frame of the
clip containing the interval's midpoint, so one decoding pass at one frame per clip serves both
the captioner and the per-clip CLIP features.

Framework-free: numpy, PyAV and fsspec (through vl.data.shards) only; no torch, no ray.
"""

from __future__ import annotations

import bisect
import contextlib
import math
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from vl.data.shards import filesystem, is_remote

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


def _av():
    # PyAV is an optional dependency (the `pretrain` / `dev` extras): imported on first decode
    import av

    return av


class ClipFrameReader:
    """One open video: its decoded duration and clip count, and the frame at each clip centre.

    Use as a context manager; `frames()` yields one (H, W, 3) uint8 RGB frame per clip, in clip
    order, downscaled while decoding (shorter side <= frame_size; the model processors resize
    again), so a consumer can stream a long video through a model in chunks. Every PyAV failure
    is raised as VideoDecodeError naming `source`. `method="sequential"` decodes every frame
    (the reference behaviour, kept for comparison); "seek" skips to keyframes (module docstring).
    """

    def __init__(self, path: str | Path, clip_len: float, *, frame_size: int = 224,
                 source: str | None = None, method: str = "seek") -> None:
        if method not in ("seek", "sequential"):
            raise ValueError(f"method must be 'seek' or 'sequential', got {method!r}")
        if clip_len <= 0:
            raise ValueError(f"clip_len must be > 0, got {clip_len}")
        av = _av()
        self.source = source or str(path)
        self.clip_len = float(clip_len)
        self.frame_size = frame_size
        self.method = method
        self.frames_decoded = 0  # frames the decoder produced (the decode cost)
        try:
            self._container = av.open(str(path))
        except (av.error.FFmpegError, OSError, ValueError) as err:
            raise VideoDecodeError(self.source, f"{type(err).__name__}: {err}") from None
        try:
            self._index()
        except BaseException:
            self._container.close()
            raise

    def _index(self) -> None:
        """Demux every packet once (no decoding): start time, duration, keyframe times."""
        av = _av()
        if not self._container.streams.video:
            raise VideoDecodeError(self.source, "no video stream")
        stream = self._stream = self._container.streams.video[0]
        stream.thread_type = "AUTO"
        self._tb = float(stream.time_base)
        rate = stream.average_rate or stream.guessed_rate
        self.fps = float(rate) if rate else 0.0
        pts: list[int] = []
        keys: list[int] = []
        last_dur = 0
        try:
            for packet in self._container.demux(stream):
                if packet.pts is None or packet.size == 0:
                    continue
                pts.append(packet.pts)
                last_dur = packet.duration or last_dur
                if packet.is_keyframe:
                    keys.append(packet.pts)
        except (av.error.FFmpegError, OSError, ValueError) as err:
            if not pts:  # a truncated file keeps the packets read before the damage
                raise VideoDecodeError(self.source, f"{type(err).__name__}: {err}") from None
        if not pts:
            raise VideoDecodeError(self.source, "no decodable video frames")
        self._t0 = stream.start_time if stream.start_time is not None else min(pts)
        frame_dur = last_dur * self._tb if last_dur else (1.0 / self.fps if self.fps else 0.0)
        self.duration = round((max(pts) - self._t0) * self._tb + frame_dur, 3)
        if self.duration <= 0:
            raise VideoDecodeError(self.source, "no decodable video frames")
        self.n_clips = num_clips(self.duration, self.clip_len)
        self._keyframes = sorted((k - self._t0) * self._tb for k in keys) or [0.0]

    def __enter__(self) -> ClipFrameReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._container.close()

    def frames(self) -> Iterator[np.ndarray]:
        """The frame at each clip centre (first frame shown at or after it), clip by clip."""
        av = _av()
        try:
            yield from self._frames()
        except VideoDecodeError:
            raise
        except (av.error.FFmpegError, OSError, ValueError, RuntimeError) as err:
            raise VideoDecodeError(self.source, f"{type(err).__name__}: {err}") from None

    def _frames(self) -> Iterator[np.ndarray]:
        decoder: Iterator | None = None
        current, current_t = None, -math.inf  # last decoded frame and its time (s from start)
        image, image_of = None, None  # `current` as RGB (one conversion serves many centres)
        size: tuple[int, int] | None = None
        for j in range(self.n_clips):
            centre = (j + 0.5) * self.clip_len
            if current_t + _EPS < centre:
                if decoder is None or self._should_seek(current_t, centre):
                    decoder = self._decoder_at(centre)
                for frame in decoder:
                    if frame.pts is None:
                        continue
                    self.frames_decoded += 1
                    current, current_t = frame, (frame.pts - self._t0) * self._tb
                    if current_t + _EPS >= centre:
                        break
                else:  # the stream ended before this centre (the partial last clip)
                    current_t = math.inf
            if current is None:
                raise VideoDecodeError(self.source, "no decodable video frames")
            if image_of is not current:
                if size is None:
                    size = _target_size(current.width, current.height, self.frame_size)
                image = current.to_ndarray(format="rgb24", width=size[0], height=size[1])
                image_of = current
            yield image

    def _should_seek(self, position: float, centre: float) -> bool:
        """Seek when a keyframe lies after the decoder's position and at or before `centre`."""
        if self.method == "sequential":
            return False
        k = bisect.bisect_right(self._keyframes, centre + _EPS) - 1
        return k >= 0 and self._keyframes[k] > position + _EPS

    def _decoder_at(self, centre: float) -> Iterator:
        """A decoder positioned at the last keyframe at or before `centre` (start if none)."""
        target = 0.0  # indexing read the stream to its end: even a sequential pass seeks once
        if self.method == "seek":
            k = bisect.bisect_right(self._keyframes, centre + _EPS) - 1
            target = self._keyframes[max(k, 0)]
        offset = int(round(target / self._tb)) + self._t0
        self._container.seek(offset, stream=self._stream, backward=True, any_frame=False)
        return iter(self._container.decode(self._stream))


def decode_clip_frames(
    path: str | Path, clip_len: float, *, frame_size: int = 224, source: str | None = None,
    method: str = "seek",
) -> DecodedVideo:
    """All clip-centre frames of `path` at once ((n_clips, H, W, 3) uint8; see ClipFrameReader).

    The duration is what the packets span (last frame time + one frame), not the container's
    header, which truncated files get wrong. Raises VideoDecodeError (naming `source`).
    """
    with ClipFrameReader(path, clip_len, frame_size=frame_size, source=source,
                         method=method) as reader:
        frames = np.stack(list(reader.frames()))
        return DecodedVideo(duration=reader.duration, clip_len=clip_len, frames=frames,
                            fps=reader.fps)


@contextlib.contextmanager
def local_video(uri: str) -> Iterator[str]:
    """A local path for `uri`: the path itself, or a temporary download of an s3:// object
    (PyAV seeks, which needs a file; the copy is removed on exit)."""
    if not is_remote(uri):
        yield uri
        return
    fs, path = filesystem(uri)
    with tempfile.TemporaryDirectory(prefix="vl-video-") as tmp:
        local = os.path.join(tmp, PurePosixPath(path).name)
        fs.get_file(path, local)
        yield local


# ---- a library of videos -----------------------------------------------------------------------


class VideoListingError(ValueError):
    """A video folder that cannot be listed, or two files that would share one video id."""


@dataclass(frozen=True)
class VideoSource:
    vid: str
    uri: str
    split: str = "train"


def video_id(relative: str) -> str:
    """A stable, unique-per-path id: the path under the root without extension, '/' -> '__'."""
    stem = str(PurePosixPath(relative).with_suffix(""))
    return re.sub(r"[^A-Za-z0-9_.-]", "_", stem.replace("/", "__"))


def list_videos(videos: str) -> list[VideoSource]:
    """Every video file under `videos` (a local directory or an s3:// prefix), sorted by path.

    A missing folder lists as empty; storage that does not answer raises VideoListingError.
    """
    fs, root = filesystem(videos)
    try:
        paths = fs.find(root) if fs.isdir(root) else []
    except FileNotFoundError:
        paths = []
    except Exception as err:  # noqa: BLE001 - each storage backend raises its own types
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise VideoListingError(f"cannot list {videos}: {reason}") from None
    found: dict[str, VideoSource] = {}
    for path in sorted(paths):
        if not path.lower().endswith(VIDEO_EXTENSIONS):
            continue
        rel = os.path.relpath(path, root) if not is_remote(videos) else path[len(root) :]
        vid = video_id(rel.lstrip("/"))
        uri = path if not is_remote(videos) else f"{videos.split('://')[0]}://{path}"
        if vid in found:
            raise VideoListingError(
                f"{found[vid].uri} and {uri} map to the same video id {vid!r}; rename one"
            )
        found[vid] = VideoSource(vid, uri)
    return list(found.values())
