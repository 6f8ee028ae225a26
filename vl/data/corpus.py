"""The synthetic pretraining corpus (VIDEOLIGHTS_SPEC section 6b, Algorithm 1) for one batch of
decoded videos: BLIP captions as queries, CLIP features per clip and per caption token, CLIP
caption-frame similarity as per-clip saliency, rows in the pretraining JSONL format.

Feature choice (what the rows carry, and why):
- video set "clip": the CLIP image embedding (after the visual projection; dim = projection_dim,
  512 for ViT-B/32) of each clip's centre frame. That is exactly how the official `clip_features`
  are made (one frame per 2 s), so a model pretrained on this corpus fine-tunes on official
  CLIP-only shards with identical input widths.
- text set "clip": the CLIP text transformer's last hidden state, one row per token SOT..EOT
  (dim = the text hidden size, 512 for ViT-B/32), as the official `clip_text_features` are.
- saliency of clip j in a moment: cos(projected caption embedding, projected image embedding j),
  the quantity CLIP is trained to make meaningful. It is stored for inspection only: the
  training targets of the `pretrain` dataset are derived from the window (spec 1.4).
SlowFast and BLIP-2 features are not produced (their extractors are separate projects).

Framework-free: torch, numpy and `transformers` (imported lazily); never ray.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from vl.data.features import l2_normalize
from vl.data.shards import ShardRow
from vl.data.video import Interval, plan_intervals
from vl.extractors import ClipImageExtractor, ClipModel, ClipTextExtractor

FEATURE_SET = "clip"


@dataclass(frozen=True)
class CorpusSettings:
    """Everything besides the videos that determines the corpus rows (its fingerprint)."""

    captioner: str
    clip: str
    interval: float = 10.0
    clip_len: float = 2.0
    frame_size: int = 224
    caption_max_tokens: int = 30
    caption_min_tokens: int = 3
    caption_beams: int = 1
    max_q_l: int = 32  # caption tokens kept (SOT..EOT), the training loader's default

    def fingerprint(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> None:
        for key in ("interval", "clip_len"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)}")
        for key in ("frame_size", "caption_max_tokens", "caption_beams", "max_q_l"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.max_q_l < 2:
            raise ValueError("max_q_l must keep at least the start and end tokens (>= 2)")


@dataclass
class VideoInput:
    """A decoded video on its way to annotation."""

    vid: str
    duration: float
    frames: np.ndarray  # (n_clips, H, W, 3) uint8, one frame per clip
    split: str = "train"


@dataclass
class VideoResult:
    """The rows of one video, or why there are none, plus what its inference cost."""

    vid: str
    split: str
    rows: list[ShardRow] = field(default_factory=list)
    error: str = ""
    n_clips: int = 0
    duration: float = 0.0
    empty_captions: int = 0
    caption_frames: int = 0
    clip_frames: int = 0
    seconds: float = 0.0


def fmt_seconds(x: float) -> str:
    """Compact, stable seconds for qids: 0, 9.667, 29."""
    text = f"{x:.3f}".rstrip("0").rstrip(".")
    return text or "0"


def interval_rows(
    vid: str,
    duration: float,
    split: str,
    intervals: Sequence[Interval],
    captions: Sequence[str],
    token_features: Sequence[np.ndarray],
    caption_embeds: np.ndarray,
    image_embeds: np.ndarray,
) -> tuple[list[ShardRow], int]:
    """Rows of one video (one per interval with a non-empty caption) and the empty-caption count.

    token_features[k]: (n_tokens_k, d_text) for interval k; caption_embeds (K, d_proj);
    image_embeds (n_clips, d_proj), un-normalised. Features are L2-normalised here (the shard
    format's convention) and the video set is shared by every row of the video.
    """
    video = {FEATURE_SET: l2_normalize(image_embeds.astype(np.float32)).astype(np.float16)}
    img_unit = l2_normalize(image_embeds.astype(np.float32))  # (n_clips, d)
    cap_unit = l2_normalize(caption_embeds.astype(np.float32))  # (K, d)
    rows, empty = [], 0
    for k, iv in enumerate(intervals):
        caption = captions[k].strip()
        if not caption:
            empty += 1
            continue
        start, end = round(iv.start, 3), round(iv.end, 3)
        sims = img_unit[list(iv.clip_ids)] @ cap_unit[k]  # (len(clip_ids),)
        annotation = {
            "qid": f"{vid}_{fmt_seconds(start)}_{fmt_seconds(end)}",
            "query": caption,
            "vid": vid,
            "duration": duration,
            "split": split,
            "relevant_windows": [[start, end]],
            "relevant_clip_ids": list(iv.clip_ids),
            "saliency_scores": [[round(float(s), 6)] for s in sims],
        }
        rows.append(
            ShardRow(
                qid=annotation["qid"],
                vid=vid,
                query=caption,
                duration=duration,
                annotation=annotation,
                video=video,
                text={FEATURE_SET: l2_normalize(token_features[k].astype(np.float32)).astype(
                    np.float16
                )},
            )
        )
    return rows, empty


class CorpusAnnotator:
    """A captioning model (BLIP or any `AutoModelForImageTextToText`) and a CLIP model, loaded
    once per worker from a local directory or a hub id, annotating videos in batches.

    Why both models in one object: on a GPU worker they fit together (BLIP-large + ViT-B/32 are
    ~1.9 GB in fp16), and one stage avoids shipping every frame between two actor pools.
    """

    def __init__(
        self,
        settings: CorpusSettings,
        *,
        device: str | None = None,
        caption_batch: int = 32,
        clip_batch: int = 128,
        threads: int | None = None,
    ) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        settings.validate()
        self.settings = settings
        # CLIP through the shared extractors (vl.extractors): the corpus' features are made by
        # the same code as jobs.extract's and jobs.predict's
        self.clip = ClipModel(settings.clip, device=device, threads=threads)
        self.device, self.dtype = self.clip.device, self.clip.dtype
        self.image_extractor = ClipImageExtractor(self.clip, clip_len=settings.clip_len,
                                                  batch_size=clip_batch)
        self.text_extractor = ClipTextExtractor(self.clip, max_tokens=settings.max_q_l,
                                                batch_size=clip_batch)
        self.caption_batch = max(1, caption_batch)
        self.caption_processor = AutoProcessor.from_pretrained(settings.captioner)
        self.captioner = AutoModelForImageTextToText.from_pretrained(
            settings.captioner, dtype=self.dtype
        ).to(self.device).eval()

    # -- model calls (batched) ----------------------------------------------------------------

    def caption(self, frames: np.ndarray) -> list[str]:
        """(N, H, W, 3) uint8 -> N captions."""
        import torch

        s = self.settings
        out: list[str] = []
        with torch.inference_mode():
            for i in range(0, len(frames), self.caption_batch):
                chunk = list(frames[i : i + self.caption_batch])
                inputs = self.caption_processor(images=chunk, return_tensors="pt")
                pixel_values = inputs["pixel_values"].to(self.device, self.dtype)
                ids = self.captioner.generate(
                    pixel_values=pixel_values,
                    max_new_tokens=s.caption_max_tokens,
                    min_new_tokens=min(s.caption_min_tokens, s.caption_max_tokens),
                    num_beams=s.caption_beams,
                    do_sample=False,
                )
                texts = self.caption_processor.batch_decode(ids, skip_special_tokens=True)
                out.extend(t.strip() for t in texts)
        return out

    def image_embeddings(self, frames: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 -> (N, projection_dim) float32 CLIP image embeddings."""
        return self.image_extractor(frames)

    def text_features(self, captions: Sequence[str]) -> tuple[list[np.ndarray], np.ndarray]:
        """Per caption its token features (n_tokens, hidden) SOT..EOT, and (N, proj) embeds."""
        return self.text_extractor.encode(captions)

    # -- one batch of videos --------------------------------------------------------------------

    def annotate(self, videos: Sequence[VideoInput]) -> list[VideoResult]:
        """Rows for every video of the batch; all frames of the batch go through each model
        together (one caption pass, one CLIP image pass, one CLIP text pass)."""
        t0 = time.perf_counter()
        s = self.settings
        plans = [plan_intervals(v.duration, s.interval, s.clip_len) for v in videos]
        caption_frames = np.concatenate(
            [v.frames[[iv.caption_clip for iv in plan]] for v, plan in zip(videos, plans,
                                                                            strict=True)]
        )
        captions = self.caption(caption_frames)
        image_embeds = self.image_embeddings(np.concatenate([v.frames for v in videos]))
        tokens, caption_embeds = self.text_features([c or "." for c in captions])
        elapsed = time.perf_counter() - t0
        total_frames = len(caption_frames) + len(image_embeds)
        results = []
        k = c = 0
        for v, plan in zip(videos, plans, strict=True):
            n_iv, n_clip = len(plan), len(v.frames)
            rows, empty = interval_rows(
                v.vid,
                v.duration,
                v.split,
                plan,
                captions[k : k + n_iv],
                tokens[k : k + n_iv],
                caption_embeds[k : k + n_iv],
                image_embeds[c : c + n_clip],
            )
            share = (n_iv + n_clip) / max(1, total_frames)
            results.append(
                VideoResult(
                    vid=v.vid,
                    split=v.split,
                    rows=rows,
                    n_clips=n_clip,
                    duration=v.duration,
                    empty_captions=empty,
                    caption_frames=n_iv,
                    clip_frames=n_clip,
                    seconds=elapsed * share,
                )
            )
            k += n_iv
            c += n_clip
        return results

