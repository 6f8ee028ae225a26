"""The videos of the served data set: what the page lists and what by-video predict runs on.

Why a shard set (`--data`) and not raw video: the registered model's input is precomputed
clip and query features (SlowFast/CLIP/...), and this server holds no feature extractor or
text encoder. So a page query is matched to one of the data set's own queries (any video's),
whose text features the shards hold; a query the data set does not have is a 422 that says so.
Features are read once, through the same loader and collation as training and `jobs.predict`
(normalised, TEF appended), and kept in memory: one (clips, Dv+2) array per video and one
(tokens, Dt) array per distinct query.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from jobs.predict import shard_inputs
from jobs.serve.requests import RequestError

# Browser-playable containers, in the order a file is looked for.
VIDEO_TYPES = {".mp4": "video/mp4", ".webm": "video/webm", ".ogv": "video/ogg"}


def query_key(text: str) -> str:
    """Queries match ignoring case and runs of whitespace."""
    return " ".join(text.split()).casefold()


@dataclass
class CatalogVideo:
    vid: str
    duration: float  # seconds
    video_features: np.ndarray  # (clips, Dv+2) float32
    queries: list[str] = field(default_factory=list)
    file: Path | None = None  # a playable file from --videos, if there is one


@dataclass
class Catalog:
    videos: dict[str, CatalogVideo]
    texts: dict[str, tuple[str, np.ndarray]]  # query_key -> (query, (tokens, Dt) float32)

    @classmethod
    def from_shards(cls, uri: str, cfg: Any, video_dir: str = "") -> Catalog:
        """Every video and query of the shard set at `uri`; `cfg` is the model's config."""
        columns, meta = shard_inputs(uri, cfg)
        videos: dict[str, CatalogVideo] = {}
        texts: dict[str, tuple[str, np.ndarray]] = {}
        for i, info in enumerate(meta):
            vid, query = str(info["vid"]), str(info["query"])
            if vid not in videos:
                videos[vid] = CatalogVideo(
                    vid=vid, duration=float(columns["duration"][i]),
                    video_features=np.ascontiguousarray(columns["video_features"][i]),
                    file=_video_file(video_dir, vid),
                )
            if query not in videos[vid].queries:
                videos[vid].queries.append(query)
            texts.setdefault(query_key(query), (query, columns["text_features"][i]))
        return cls(videos=videos, texts=texts)

    def listing(self) -> list[dict[str, Any]]:
        """GET /v1/videos: one entry per video, sorted by id."""
        return [
            {"vid": v.vid, "duration": v.duration, "clips": len(v.video_features),
             "queries": v.queries,
             "video_url": None if v.file is None else f"/v1/videos/{quote(v.vid, safe='')}/file"}
            for v in sorted(self.videos.values(), key=lambda v: v.vid)
        ]

    def video(self, vid: str) -> CatalogVideo:
        if vid not in self.videos:
            raise RequestError(404, "vid", f"no video {vid!r} in the served data set "
                                           "(GET /v1/videos lists them)")
        return self.videos[vid]

    def sample(self, vid: str, query: str) -> dict[str, Any]:
        """The model input for `query` on video `vid`."""
        video = self.video(vid)
        found = self.texts.get(query_key(query))
        if found is None:
            raise RequestError(
                422, "query", f"query {query!r} is not in the served data set: this server "
                "has no text encoder, so queries are the data set's own (GET /v1/videos "
                "lists each video's)")
        return {"video_features": video.video_features, "text_features": found[1],
                "duration": video.duration, "query": found[0]}


def _video_file(video_dir: str, vid: str) -> Path | None:
    if not video_dir:
        return None
    for suffix in VIDEO_TYPES:
        path = Path(video_dir) / f"{vid}{suffix}"
        if path.is_file():
            return path
    return None
