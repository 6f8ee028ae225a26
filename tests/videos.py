"""Videos written with PyAV for the tests and benchmarks (no real footage needed).

A pattern video shows one solid background colour per `segment_s`-second segment (so which
frame a decoder returned for a time is checkable from its colour) and a small white square that
moves every frame (so consecutive frames differ, as in real footage, and P-frames carry data).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import av
import numpy as np


def segment_colors(n: int, seed: int = 0) -> list[tuple[int, int, int]]:
    """`n` random, clearly different background colours."""
    rng = np.random.default_rng(seed)
    return [tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(n)]


def write_pattern_video(
    path: str | Path,
    duration_s: float,
    *,
    fps: int = 8,
    size: int = 64,
    segment_s: float = 10.0,
    colors: Sequence[tuple[int, int, int]] | None = None,
    seed: int = 0,
    codec: str = "mpeg4",
    gop: int | None = None,
) -> None:
    """Frame i is shown at i / fps seconds; its background is colors[floor(t / segment_s) % n].

    `gop` sets the keyframe interval in frames (the encoder's default otherwise: 12 for
    mpeg4, 250 for libx264).
    """
    colors = list(colors) if colors is not None else segment_colors(8, seed)
    n_frames = int(round(duration_s * fps))
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        if gop is not None:
            stream.codec_context.gop_size = gop
        for i in range(n_frames):
            img = np.empty((size, size, 3), dtype=np.uint8)
            img[:] = colors[int(i / fps // segment_s) % len(colors)]
            x = (i * 2) % (size - 8)
            img[8:16, x : x + 8] = 255
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
