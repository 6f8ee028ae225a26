"""Feature extractors: the one path from frames and query text to the features a model reads.

An extractor turns a batch of inputs into one feature set: video extractors take clip-centre
frames ((N, H, W, 3) uint8, one per clip, from vl.data.video) and return (N, dim) features; text
extractors take N strings and return one (n_tokens, dim) array per string. jobs.extract,
jobs.predict and jobs.pretrain_corpus all call these classes, so the features a model is trained
on and the ones it is given at prediction time are computed by the same code.

The CLIP pair reproduces the official QVHighlights / Charades CLIP features (the authors'
extraction scripts: ViT-B/32, one frame per 2 s, 224 px centre crop):
- video set "clip": the image embedding after the visual projection (dim = projection_dim, 512
  for ViT-B/32) of each clip's centre frame;
- text set "clip": the text transformer's last hidden state, one row per token SOT..EOT (dim =
  the text hidden size, 512 for ViT-B/32), as `clip_text_features/qid*.npz:last_hidden_state`.
Models come from a local directory (`save_pretrained` layout) or a hub id, through
`transformers`; on a CUDA device they run in float16.

A `FeatureRecipe` names, per feature set, the extractor and model that make it; the registered
model carries one (vl.tracking), so jobs.predict knows what to extract for it and refuses a model
whose sets have no extractor here (SlowFast, BLIP: README "Your own videos").

Framework-free: numpy, torch and transformers (imported when a model is loaded); never ray.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from vl.config import FEATURE_DIMS, TEXT_FEATURE_DIMS

VIDEO, TEXT = "video", "text"
CLIP_IMAGE, CLIP_TEXT = "clip-image", "clip-text"
# feature set -> the extractor that makes it (None: no extractor in this package)
VIDEO_EXTRACTORS: dict[str, str | None] = {"clip": CLIP_IMAGE, "slowfast": None, "blip": None,
                                           "i3d": None}
TEXT_EXTRACTORS: dict[str, str | None] = {"clip": CLIP_TEXT, "blip": None}
# the model behind the official features of each set (what a model trained on them needs)
OFFICIAL_MODELS = {"clip": "openai/clip-vit-base-patch32"}
DEFAULT_CLIP_LEN = 2.0
DEFAULT_MAX_TOKENS = 32


class Extractor(Protocol):
    """What every extractor offers. `clip_len` is the seconds per clip a video extractor expects
    one frame for (0 for text); `__call__` is the batch call."""

    name: str  # the feature set it produces ("clip")
    modality: str  # VIDEO | TEXT
    dim: int
    clip_len: float

    def __call__(self, batch: Any) -> Any: ...


# ---- recipes ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureSource:
    """How one feature set is made: extractor kind ("" = none available), model, width."""

    extractor: str
    model: str = ""
    dim: int = 0  # 0 = unknown


@dataclass(frozen=True)
class FeatureRecipe:
    """Per modality, in the model's input order, the sets and how each is made."""

    video: dict[str, FeatureSource] = field(default_factory=dict)
    text: dict[str, FeatureSource] = field(default_factory=dict)
    clip_len: float = DEFAULT_CLIP_LEN
    max_tokens: int = DEFAULT_MAX_TOKENS

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(raw: Mapping[str, Any]) -> FeatureRecipe:
        def sets(key: str) -> dict[str, FeatureSource]:
            return {k: FeatureSource(**v) for k, v in (raw.get(key) or {}).items()}

        return FeatureRecipe(video=sets(VIDEO), text=sets(TEXT),
                             clip_len=float(raw.get("clip_len", DEFAULT_CLIP_LEN)),
                             max_tokens=int(raw.get("max_tokens", DEFAULT_MAX_TOKENS)))

    def missing(self) -> list[str]:
        """'video set slowfast'-style names of the sets no extractor here can make."""
        return [f"{m} set {n!r}" for m, sets in ((VIDEO, self.video), (TEXT, self.text))
                for n, s in sets.items() if not s.extractor]

    def describe(self) -> str:
        return (f"video {list(self.video)} + text {list(self.text)} "
                f"({self.clip_len:g}-s clips)")


def _set_dims(names: Sequence[str], total: int, official: Mapping[str, int]) -> list[int]:
    """Per-set widths from the model's summed width: exact for one set, the official widths
    when they add up, else unknown (0)."""
    if len(names) == 1:
        return [total]
    dims = [official.get(n, 0) for n in names]
    return dims if sum(dims) == total and all(dims) else [0] * len(names)


def recipe_from_config(cfg: Mapping[str, Any], models: Mapping[str, str] | None = None
                       ) -> FeatureRecipe:
    """The recipe a model trained with `cfg` (ExperimentConfig.to_dict()) needs.

    `models` maps a set name to the model its training features came from; by default the
    official one (a model trained on the released CLIP features needs ViT-B/32).
    """
    data, model = cfg["data"], cfg["model"]
    models = {**OFFICIAL_MODELS, **(models or {})}
    out: dict[str, dict[str, FeatureSource]] = {}
    for modality, table, official, total in (
        (VIDEO, VIDEO_EXTRACTORS, FEATURE_DIMS, int(model["video_dim"])),
        (TEXT, TEXT_EXTRACTORS, TEXT_FEATURE_DIMS, int(model["text_dim"])),
    ):
        names = list(data[f"{modality}_features"])
        dims = _set_dims(names, total, official)
        out[modality] = {
            n: FeatureSource(table.get(n) or "", models.get(n, "") if table.get(n) else "", d)
            for n, d in zip(names, dims, strict=True)
        }
    return FeatureRecipe(video=out[VIDEO], text=out[TEXT], clip_len=float(data["clip_len"]),
                         max_tokens=int(data["max_q_l"]))


def recipe_json(recipe: FeatureRecipe) -> str:
    return json.dumps(recipe.to_dict(), sort_keys=True)


# ---- CLIP ---------------------------------------------------------------------------------------


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class ClipModel:
    """One CLIP checkpoint (model + processor) on a device; both CLIP extractors share it, so a
    worker holds one copy whatever the number of sets it makes."""

    def __init__(self, ref: str, *, device: str | None = None, threads: int | None = None
                 ) -> None:
        import torch
        from transformers import AutoProcessor, CLIPModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if threads is not None:
            torch.set_num_threads(max(1, threads))
        self.ref = ref
        self.device = torch.device(device or default_device())
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.processor = AutoProcessor.from_pretrained(ref)
        self.model = CLIPModel.from_pretrained(ref, dtype=self.dtype).to(self.device).eval()
        self.image_dim = int(self.model.config.projection_dim)
        self.text_dim = int(self.model.config.text_config.hidden_size)


class ClipImageExtractor:
    """Video set "clip": projected CLIP image embedding of each clip's centre frame."""

    name, modality = "clip", VIDEO

    def __init__(self, clip: ClipModel, *, clip_len: float = DEFAULT_CLIP_LEN,
                 batch_size: int = 128) -> None:
        self.clip, self.clip_len, self.batch_size = clip, float(clip_len), max(1, batch_size)
        self.dim = clip.image_dim

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 -> (N, dim) float32, un-normalised (as the official files)."""
        import torch

        c = self.clip
        if len(frames) == 0:
            return np.zeros((0, self.dim), np.float32)
        parts = []
        with torch.inference_mode():
            for i in range(0, len(frames), self.batch_size):
                chunk = list(frames[i : i + self.batch_size])
                pixels = c.processor(images=chunk, return_tensors="pt")["pixel_values"]
                vision = c.model.vision_model(pixel_values=pixels.to(c.device, c.dtype))
                parts.append(c.model.visual_projection(vision.pooler_output).float().cpu())
        return torch.cat(parts).numpy()  # (N, dim)


class ClipTextExtractor:
    """Text set "clip": CLIP text last hidden state per token, SOT..EOT, at most max_tokens."""

    name, modality, clip_len = "clip", TEXT, 0.0

    def __init__(self, clip: ClipModel, *, max_tokens: int = DEFAULT_MAX_TOKENS,
                 batch_size: int = 128) -> None:
        self.clip, self.max_tokens, self.batch_size = clip, max_tokens, max(1, batch_size)
        self.dim = clip.text_dim

    def __call__(self, texts: Sequence[str]) -> list[np.ndarray]:
        """N strings -> N (n_tokens_i, dim) float32 arrays."""
        return self.encode(texts)[0]

    def encode(self, texts: Sequence[str]) -> tuple[list[np.ndarray], np.ndarray]:
        """Token features per text and the (N, projection_dim) projected sentence embeddings
        (the corpus builder's saliency compares those with the image embeddings)."""
        import torch

        c = self.clip
        tokens: list[np.ndarray] = []
        embeds = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                enc = c.processor(text=list(texts[i : i + self.batch_size]), return_tensors="pt",
                                  padding=True, truncation=True, max_length=self.max_tokens)
                mask = enc["attention_mask"].to(c.device)
                out = c.model.text_model(input_ids=enc["input_ids"].to(c.device),
                                         attention_mask=mask)
                hidden = out.last_hidden_state.float().cpu().numpy()  # (b, T, dim)
                tokens.extend(hidden[b, : int(n)] for b, n in enumerate(mask.sum(1).tolist()))
                embeds.append(c.model.text_projection(out.pooler_output).float().cpu())
        if not embeds:
            return [], np.zeros((0, c.image_dim), np.float32)
        return tokens, torch.cat(embeds).numpy()


# ---- building extractors for a recipe -----------------------------------------------------------


class ExtractionError(ValueError):
    """A recipe this package cannot extract, or an extractor whose output does not fit it."""


@dataclass
class ExtractorSet:
    """The extractors of one recipe, in the recipe's set order."""

    video: list[Extractor]
    text: list[Extractor]
    recipe: FeatureRecipe


def build_extractors(recipe: FeatureRecipe, *, models: Mapping[str, str] | None = None,
                     device: str | None = None, threads: int | None = None,
                     batch_size: int = 128) -> ExtractorSet:
    """Load every model the recipe needs once (`models` overrides a set's model, e.g. a local
    copy of the hub weights) and check each extractor's width against the recipe's."""
    missing = recipe.missing()
    if missing:
        raise ExtractionError(f"no extractor for {', '.join(missing)} (this package extracts "
                              "video set 'clip' and text set 'clip')")
    loaded: dict[str, ClipModel] = {}

    def clip_for(name: str, source: FeatureSource) -> ClipModel:
        ref = (models or {}).get(name) or source.model
        if not ref:
            raise ExtractionError(f"set {name!r}: the recipe names no model; pass one")
        if ref not in loaded:
            loaded[ref] = ClipModel(ref, device=device, threads=threads)
        return loaded[ref]

    video: list[Extractor] = []
    text: list[Extractor] = []
    for name, source in recipe.video.items():
        video.append(ClipImageExtractor(clip_for(name, source), clip_len=recipe.clip_len,
                                        batch_size=batch_size))
    for name, source in recipe.text.items():
        text.append(ClipTextExtractor(clip_for(name, source), max_tokens=recipe.max_tokens,
                                      batch_size=batch_size))
    checks = [(VIDEO, e, s) for e, s in zip(video, recipe.video.values(), strict=True)]
    checks += [(TEXT, e, s) for e, s in zip(text, recipe.text.values(), strict=True)]
    for modality, ext, source in checks:
        if source.dim and ext.dim != source.dim:
            ref = (models or {}).get(ext.name) or source.model
            raise ExtractionError(
                f"{modality} set {ext.name!r}: {ref} gives {ext.dim}-d features but the model "
                f"was trained on {source.dim}-d ones; use the model its features came from"
            )
    return ExtractorSet(video=video, text=text, recipe=recipe)
