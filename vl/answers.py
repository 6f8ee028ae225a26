"""A user's video and queries -> moments (seconds) and highlights, with a trained model.

`VideoAnswerer` joins the three pieces every prediction entrypoint needs: the extractors the
model's features come from (vl.extractors), the clip-centre frames of the video (vl.data.video,
streamed in chunks so memory holds the features, not the frames), and the window plan that lets
a model of max_v_l clips answer for a video of any length (vl.long_video). jobs.predict uses it
in-process (--video) and inside Ray Data actors (--videos / --features).

Framework-free: numpy plus what the extractors and the model's predict function bring; never
ray, never mlflow (the caller passes the registered model's predict).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vl.data.video import ClipFrameReader
from vl.extractors import ExtractorSet
from vl.long_video import PredictFn, answer, model_features


@dataclass
class VideoFeatures:
    """One video's raw feature sets (in the model's order) and its duration in seconds."""

    sets: list[np.ndarray]  # each (n_clips, d_i) float32, un-normalised
    duration: float

    @property
    def n_clips(self) -> int:
        return min(len(s) for s in self.sets)


class VideoAnswerer:
    """Extract, window, predict, merge. `predict` maps pyfunc input columns to official rows."""

    def __init__(self, predict: PredictFn, extractors: ExtractorSet, *, max_v_l: int,
                 stride: int | None = None, iou: float = 0.7, frame_size: int = 224,
                 chunk_frames: int = 64) -> None:
        self.predict = predict
        self.extractors = extractors
        self.clip_len = extractors.recipe.clip_len
        self.max_v_l, self.stride, self.iou = max_v_l, stride, iou
        self.frame_size, self.chunk_frames = frame_size, max(1, chunk_frames)

    def from_frames(self, frames: np.ndarray, duration: float) -> VideoFeatures:
        """Features of already decoded clip-centre frames ((n_clips, H, W, 3) uint8)."""
        return VideoFeatures([np.asarray(e(frames), np.float32) for e in self.extractors.video],
                             duration)

    def from_file(self, path: str, source: str | None = None) -> VideoFeatures:
        """Decode and extract in chunks of `chunk_frames` clips (peak memory: one chunk of
        frames plus the features). Raises VideoDecodeError naming `source`."""
        parts: list[list[np.ndarray]] = [[] for _ in self.extractors.video]
        with ClipFrameReader(path, self.clip_len, frame_size=self.frame_size,
                             source=source) as reader:
            chunk: list[np.ndarray] = []
            for frame in reader.frames():
                chunk.append(frame)
                if len(chunk) == self.chunk_frames:
                    self._extract_chunk(chunk, parts)
                    chunk = []
            if chunk:
                self._extract_chunk(chunk, parts)
            duration = reader.duration
        return VideoFeatures([np.concatenate(p) for p in parts], duration)

    def _extract_chunk(self, chunk: list[np.ndarray], parts: list[list[np.ndarray]]) -> None:
        frames = np.stack(chunk)  # (c, H, W, 3)
        for extractor, out in zip(self.extractors.video, parts, strict=True):
            out.append(np.asarray(extractor(frames), np.float32))  # (c, d)

    def query_features(self, queries: Sequence[str]) -> list[np.ndarray]:
        """Per query (n_tokens, sum of text dims), normalised like the training shards."""
        per_set = [e(list(queries)) for e in self.extractors.text]  # [set][query] (T, d)
        return [model_features([s[q] for s in per_set]) for q in range(len(queries))]

    def answer(self, video: VideoFeatures, queries: Sequence[str]) -> list[dict[str, Any]]:
        """One row per query: query, duration, pred_relevant_windows (absolute seconds, best
        first) and pred_saliency_scores (one per clip) when the model predicts saliency."""
        features = model_features(video.sets)  # (n_clips, D)
        rows = answer(self.predict, features, self.query_features(queries),
                      clip_len=self.clip_len, duration=video.duration, max_v_l=self.max_v_l,
                      stride=self.stride, iou=self.iou)
        return [{"query": q, "duration": video.duration, **r}
                for q, r in zip(queries, rows, strict=True)]
