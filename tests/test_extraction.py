"""The extraction path without a registered model: the clip-centre reader against a video whose
colour changes at known seconds, the CLIP extractors against transformers' own forward, the
recipe a config implies, and the long-video window plan and merge."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.tiny_models import CLIP_PROJ, CLIP_TEXT_HIDDEN, build_tiny_clip
from tests.videos import segment_colors, write_pattern_video
from vl.data.video import ClipFrameReader, decode_clip_frames
from vl.long_video import Window, merge_windows, nms, plan_windows


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # models load from local dirs; never the hub


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("models") / "clip")


def test_seeking_reader_returns_the_frame_shown_at_each_clip_centre(tmp_path):
    """30 fps, a new colour every second, 1-s clips, a keyframe every 10 frames: clip j's frame
    must have colour j (any off-by-a-second frame shows a neighbour's colour), identical to the
    sequential decode, while decoding fewer frames."""
    colors = segment_colors(13, seed=3)
    path = tmp_path / "v.mp4"
    write_pattern_video(path, 12.5, fps=30, size=64, segment_s=1.0, colors=colors, gop=10)
    with ClipFrameReader(path, 1.0, frame_size=32) as seek:
        frames = np.stack(list(seek.frames()))
        assert seek.duration == pytest.approx(12.5) and seek.n_clips == 13
        seek_cost = seek.frames_decoded
    assert frames.shape == (13, 32, 32, 3)
    for j, frame in enumerate(frames):
        corner = frame[-4:, :4].reshape(-1, 3).mean(axis=0)  # away from the moving square
        distances = [np.abs(corner - np.array(c)).max() for c in colors]
        # the last clip's centre (12.5 s) is past the last frame: it gets the last frame (12 s)
        assert int(np.argmin(distances)) == min(j, 12), (j, corner)
    with ClipFrameReader(path, 1.0, frame_size=32, method="sequential") as seq:
        np.testing.assert_array_equal(np.stack(list(seq.frames())), frames)
        assert seq.frames_decoded > seek_cost
    assert seek_cost < 0.75 * 375  # 12.5 s x 30 fps


def test_clip_extractors_equal_the_transformers_forward(tiny_clip, tmp_path):
    import torch
    from transformers import AutoProcessor, CLIPModel

    from vl.extractors import ClipImageExtractor, ClipModel, ClipTextExtractor

    path = tmp_path / "v.mp4"
    write_pattern_video(path, 9.0, fps=8, size=64, segment_s=2.0)
    frames = decode_clip_frames(path, 2.0, frame_size=32).frames  # (5, 32, 32, 3)
    clip = ClipModel(str(tiny_clip), device="cpu")
    image = ClipImageExtractor(clip, batch_size=2)  # 3 batches: batching must not matter
    text = ClipTextExtractor(clip, max_tokens=12)
    assert (image.dim, text.dim, image.clip_len) == (CLIP_PROJ, CLIP_TEXT_HIDDEN, 2.0)
    got = image(frames)
    queries = ["a dog", "a man sitting in the kitchen with a red car"]
    tokens = text(queries)

    ref = CLIPModel.from_pretrained(tiny_clip).eval()
    proc = AutoProcessor.from_pretrained(tiny_clip)
    with torch.no_grad():
        pixels = proc(images=list(frames), return_tensors="pt")["pixel_values"]
        want = ref.visual_projection(ref.vision_model(pixel_values=pixels).pooler_output)
        np.testing.assert_allclose(got, want.numpy(), atol=1e-5)
        for q, t in zip(queries, tokens, strict=True):
            enc = proc(text=[q], return_tensors="pt", truncation=True, max_length=12)
            hidden = ref.text_model(**enc).last_hidden_state[0]  # SOT..EOT
            assert t.shape == (enc["input_ids"].shape[1], CLIP_TEXT_HIDDEN)
            np.testing.assert_allclose(t, hidden.numpy(), atol=1e-5)
    assert len(tokens[1]) == 12  # truncated at max_tokens


def test_recipe_from_config_names_what_cannot_be_extracted():
    from vl.config import ExperimentConfig
    from vl.extractors import FeatureRecipe, recipe_from_config

    clip_only = ExperimentConfig.from_yaml(Path(__file__).parents[1]
                                           / "configs/qvhighlights_clip.yaml")
    recipe = recipe_from_config(clip_only.to_dict())
    assert recipe.missing() == []
    assert recipe.video["clip"].model == "openai/clip-vit-base-patch32"
    assert (recipe.video["clip"].dim, recipe.text["clip"].dim, recipe.clip_len) == (512, 512, 2)
    assert FeatureRecipe.from_dict(recipe.to_dict()) == recipe
    paper = recipe_from_config(ExperimentConfig.from_preset("paper").to_dict())
    assert paper.missing() == ["video set 'slowfast'", "video set 'blip'", "text set 'blip'"]
    assert [s.dim for s in paper.video.values()] == [2304, 512, 768]


def test_windows_cover_long_videos_with_half_overlap():
    assert plan_windows(60, 75) == [Window(0, 60)]
    windows = plan_windows(300, 75)  # a 10-minute video at 2-s clips
    assert [w.start for w in windows] == [0, 37, 74, 111, 148, 185, 222, 225]
    assert all(w.length == 75 for w in windows) and windows[-1].end == 300
    assert [w.start for w in plan_windows(100, 40, stride=40)] == [0, 40, 60]
    with pytest.raises(ValueError, match="stride"):
        plan_windows(100, 40, stride=41)


def test_merge_maps_windows_to_seconds_suppresses_duplicates_and_averages_saliency():
    windows = [Window(0, 4), Window(2, 6)]  # 2-s clips: [0, 8) s and [4, 12) s
    rows = [
        {"pred_relevant_windows": [[4, 8, 0.9], [0, 2, 0.3]],
         "pred_saliency_scores": [0.0, 0.2, 0.4, 0.6]},
        # [0, 4] here is [4, 8] s again (IoU 1 with the first): suppressed, lower score
        {"pred_relevant_windows": [[0, 4, 0.8], [6, 8, 0.5]],
         "pred_saliency_scores": [1.0, 1.0, 0.2, 0.4]},
    ]
    merged = merge_windows(rows, windows, clip_len=2.0, duration=11.0, n_clips=6, iou=0.7)
    # [6, 8] in window 2 is [10, 14] s, clamped to the 11-s duration
    assert merged["pred_relevant_windows"] == [[4, 8, 0.9], [10, 11, 0.5], [0, 2, 0.3]]
    assert merged["pred_saliency_scores"] == [0.0, 0.2, 0.7, 0.8, 0.2, 0.4]
    assert nms([[0, 10, 0.5], [1, 10, 0.6], [20, 30, 0.1]], iou=0.5) == [[1, 10, 0.6],
                                                                        [20, 30, 0.1]]
