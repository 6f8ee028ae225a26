"""The synthetic pretraining corpus: interval planning, PyAV decoding, and the Ray Data job end to
end on synthetic videos with tiny randomly initialised BLIP and CLIP models (nothing downloaded).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.tiny_models import CLIP_PROJ, CLIP_TEXT_HIDDEN, TINY_VISION, WORDS, build_tiny_clip
from tests.videos import write_pattern_video
from vl.data.video import (
    VideoDecodeError,
    decode_clip_frames,
    num_clips,
    plan_intervals,
)

DURATIONS = {"cooking": 25.0, "street/walk": 31.0, "beach": 35.0}
COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]


def build_tiny_models(root: Path) -> tuple[Path, Path]:
    """A random tiny BLIP captioner and CLIP model with local tokenizers/processors, saved to
    `root`/blip and `root`/clip, loadable with from_pretrained (no hub access)."""
    import torch
    from transformers import (
        BertTokenizerFast,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    torch.manual_seed(0)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    tokenizer = BertTokenizerFast(vocab=vocab)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    vision = TINY_VISION
    blip_cfg = BlipConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 4,
                     "max_position_embeddings": 64, "bos_token_id": vocab["[DEC]"],
                     "pad_token_id": 0, "sep_token_id": 3, "eos_token_id": 3},
        vision_config=vision, projection_dim=16,
    )
    blip_dir = root / "blip"
    BlipForConditionalGeneration(blip_cfg).save_pretrained(blip_dir)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(blip_dir)

    clip_dir = build_tiny_clip(root / "clip")
    return blip_dir, clip_dir


# ---- intervals and decoding (no models) -------------------------------------------------------


def test_intervals_follow_the_reference_rows():
    # pre_train_blip.jsonl: a 29-s video -> [0, 9.67], [9.67, 19.33], [19.33, 29]; the first two
    # list clips 0..4 and 4..9 (2-s clips overlapping the window)
    plan = plan_intervals(29.0, 10.0, 2.0)
    assert [(round(p.start, 2), round(p.end, 2)) for p in plan] == [
        (0.0, 9.67), (9.67, 19.33), (19.33, 29.0)]
    assert plan[0].clip_ids == (0, 1, 2, 3, 4)
    assert plan[1].clip_ids == (4, 5, 6, 7, 8, 9)
    assert plan[2].clip_ids == (9, 10, 11, 12, 13, 14)  # 15 clips: ceil(29 / 2)
    # 25 s -> 3 moments (25/10 + 1/2 = 3), 24 s -> 2 (as in the reference rows)
    assert len(plan_intervals(25.0, 10.0, 2.0)) == 3
    assert len(plan_intervals(24.0, 10.0, 2.0)) == 2


def test_intervals_exact_multiples_and_short_videos():
    plan = plan_intervals(30.0, 10.0, 2.0)
    assert [(p.start, p.end) for p in plan] == [(0.0, 10.0), (10.0, 20.0), (20.0, 30.0)]
    assert [p.clip_ids for p in plan] == [tuple(range(0, 5)), tuple(range(5, 10)),
                                          tuple(range(10, 15))]
    assert [p.caption_clip for p in plan] == [2, 7, 12]  # clip holding the midpoint 5, 15, 25 s
    short = plan_intervals(3.0, 10.0, 2.0)  # shorter than one interval: one moment, 2 clips
    assert [(p.start, p.end, p.clip_ids) for p in short] == [(0.0, 3.0, (0, 1))]
    assert num_clips(3.0, 2.0) == 2 and num_clips(4.0, 2.0) == 2 and num_clips(4.1, 2.0) == 3
    one_s = plan_intervals(20.0, 10.0, 1.0)
    assert [p.clip_ids for p in one_s] == [tuple(range(0, 10)), tuple(range(10, 20))]


def test_decode_keeps_the_frame_at_each_clip_centre(tmp_path):
    path = tmp_path / "v.mp4"
    write_pattern_video(path, 23.0, fps=8, size=64, colors=COLORS)
    video = decode_clip_frames(path, 2.0, frame_size=32)
    assert video.duration == pytest.approx(23.0)
    assert video.frames.shape == (12, 32, 32, 3)  # ceil(23 / 2) clips, downscaled
    # clip j's frame is shown at (j + 0.5) * 2 s; the background colour changes every 10 s
    for j, frame in enumerate(video.frames):
        expected = COLORS[int((j + 0.5) * 2 // 10)]
        corner = frame[-4:, :4].reshape(-1, 3).mean(axis=0)  # away from the moving square
        assert np.abs(corner - expected).max() < 25, (j, corner, expected)


def test_corrupt_and_empty_files_raise_decode_errors(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
    with pytest.raises(VideoDecodeError, match="bad.mp4"):
        decode_clip_frames(bad, 2.0)
    empty = tmp_path / "empty.mkv"
    empty.write_bytes(b"")
    with pytest.raises(VideoDecodeError, match="empty.mkv"):
        decode_clip_frames(empty, 2.0)


def test_splits_are_stable_and_never_leave_val_empty():
    from jobs.pretrain_corpus import VideoSource, _unit_hash, assign_splits

    todo = [VideoSource(f"v{i}", f"/x/v{i}.mp4") for i in range(1, 4)]
    assert min(_unit_hash(v.vid) for v in todo) > 0.05  # the hash alone puts none in val
    first = assign_splits(todo, {}, 0.05)
    assert [v.split for v in first] == ["val", "train", "train"]  # forced: smallest hash (v1)
    assert _unit_hash("v0") < 0.05  # ... and a video whose hash is under the fraction is val
    assert assign_splits([VideoSource("v0", "")], {}, 0.05)[0].split == "val"
    assert assign_splits(todo, {}, 0.05) == first  # deterministic
    # a video already finished in val satisfies the rule; a lone video stays in train
    assert all(v.split == "train" for v in assign_splits(todo[:1], {"old": "val"}, 0.05))
    assert assign_splits(todo[:1], {}, 0.05)[0].split == "train"
    assert all(v.split == "train" for v in assign_splits(todo, {}, 0.0))
    many = [VideoSource(f"video{i}", "") for i in range(2000)]
    share = [v.split for v in assign_splits(many, {}, 0.1)].count("val") / 2000
    assert 0.07 < share < 0.13


# ---- the job end to end ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_models() -> Iterator[tuple[Path, Path]]:
    root = Path(tempfile.mkdtemp(prefix="vl-tiny-models-"))
    try:
        yield build_tiny_models(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _upload_videos(local_dir: Path, prefix: str) -> None:
    from vl.storage import filesystem

    fs, root = filesystem(prefix)
    for path in sorted(local_dir.rglob("*")):
        if path.is_file():
            fs.put_file(str(path), f"{root}/{path.relative_to(local_dir).as_posix()}")


@pytest.fixture
def sqlite_mlflow(tmp_path, monkeypatch) -> Iterator[str]:
    """MLflow tracking on a local SQLite store (the registry and runs API without a server),
    with the test experiment's artifacts under tmp_path."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    mlflow.set_tracking_uri(uri)
    MlflowClient().create_experiment("corpus-test",
                                     artifact_location=(tmp_path / "artifacts").as_uri())
    try:
        yield uri
    finally:
        mlflow.set_tracking_uri(None)


def test_corpus_job_on_s3_rows_shards_failures_rerun_and_mlflow(
    tiny_models, s3_env, sqlite_mlflow, local_ray, tmp_path
):
    import torch
    from mlflow.tracking import MlflowClient
    from transformers import AutoProcessor, CLIPModel

    from jobs.pretrain_corpus import JobOptions, run
    from vl.data.annotations import build_targets, parse_annotation
    from vl.data.batch import Batch
    from vl.data.corpus import CorpusSettings
    from vl.data.dataset import make_loader
    from vl.data.shards import read_annotations, read_manifest

    blip_dir, clip_dir = tiny_models
    videos = tmp_path / "videos"
    for i, (name, seconds) in enumerate(DURATIONS.items()):
        (videos / name).parent.mkdir(parents=True, exist_ok=True)
        write_pattern_video(videos / f"{name}.mp4", seconds, fps=8, size=64, seed=i)
    (videos / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + os.urandom(4000))
    (videos / "notes.txt").write_text("not a video")
    _upload_videos(videos, "s3://vl-data/raw-videos")
    out = "s3://vl-data/pretrain/tiny-corpus"
    settings = CorpusSettings(captioner=str(blip_dir), clip=str(clip_dir), interval=10.0,
                              clip_len=2.0, frame_size=32, caption_max_tokens=8)
    opts = JobOptions(videos="s3://vl-data/raw-videos", out=out, workers=1, val_fraction=0.05,
                      videos_per_batch=2, videos_per_shard=2, experiment="corpus-test")
    lines: list[str] = []
    summary = run(settings, opts, log=lines.append)

    # the corrupt file is reported (progress line, summary, manifest) and skipped
    assert summary["videos_listed"] == 4 and summary["videos_processed"] == 3
    assert summary["videos_failed"] == 1
    assert any("broken" in ln and "FAILED" in ln for ln in lines)
    train, val = read_manifest(f"{out}/train"), read_manifest(f"{out}/val")
    assert train.dataset == val.dataset == "pretrain" and train.clip_len == 2.0
    assert [(f.name, f.dim) for f in train.video_features] == [("clip", CLIP_PROJ)]
    assert [(f.name, f.dim) for f in train.text_features] == [("clip", CLIP_TEXT_HIDDEN)]
    skipped = train.skipped + val.skipped
    assert [s["vid"] for s in skipped] == ["broken"]
    assert "broken.mp4" in skipped[0]["error"]

    # rows: windows, clip ids and saliency lengths consistent with each video's duration
    rows = read_annotations(f"{out}/train") + read_annotations(f"{out}/val")
    by_vid: dict[str, list[dict]] = {}
    for r in rows:
        by_vid.setdefault(r["vid"], []).append(r)
    assert sorted(by_vid) == ["beach", "cooking", "street__walk"]
    assert len(val.shards) >= 1 and len(train.shards) >= 1
    for name, seconds in DURATIONS.items():
        vid_rows = sorted(by_vid[name.replace("/", "__")],
                          key=lambda r: r["relevant_windows"][0][0])
        n_moments = math.floor(seconds / 10 + 0.5)  # 25 s -> 3, 31 s -> 3, 35 s -> 4
        n_clip = math.ceil(seconds / 2)
        assert len(vid_rows) == n_moments
        assert all(r["duration"] == pytest.approx(seconds) for r in vid_rows)
        windows = [r["relevant_windows"][0] for r in vid_rows]
        assert windows[0][0] == 0 and windows[-1][1] == pytest.approx(seconds)
        for (_, e), (s2, _) in zip(windows, windows[1:], strict=False):
            assert e == pytest.approx(s2)  # contiguous, no gap, no overlap
        for r, (s, e) in zip(vid_rows, windows, strict=True):
            assert e - s == pytest.approx(seconds / n_moments, abs=2e-3)
            ids = r["relevant_clip_ids"]
            assert ids == list(range(int(s // 2), min(math.ceil(e / 2 - 1e-6), n_clip)))
            assert len(r["saliency_scores"]) == len(ids)
            assert all(len(x) == 1 and -1.0 <= x[0] <= 1.0 for x in r["saliency_scores"])
            assert r["qid"].startswith(f"{r['vid']}_") and r["query"]
            ann = parse_annotation(r, "pretrain", clip_len=2.0)  # validates every field
            t = build_targets(ann, n_clip, np.random.default_rng(0), clip_len=2.0)
            assert t.saliency_labels.sum() > 0

    # stored features: one CLIP vector per clip; saliency = cos(caption, clip frame) under CLIP
    clip = CLIPModel.from_pretrained(clip_dir).eval()
    proc = AutoProcessor.from_pretrained(clip_dir)
    loader = make_loader(f"{out}/train", batch_size=2, shuffle=False, max_v_l=None, max_q_l=32)
    batches = list(loader)
    assert batches and all(isinstance(b, Batch) for b in batches)
    assert sum(len(b) for b in batches) == train.num_rows
    annotations = {r["qid"]: r for r in rows}
    for b in batches:
        assert b.video.shape[-1] == CLIP_PROJ + 2 and b.text.shape[-1] == CLIP_TEXT_HIDDEN
        for i, qid in enumerate(b.qids):
            r = annotations[qid]
            n_v = int(b.video_mask[i].sum())
            assert n_v == math.ceil(DURATIONS[r["vid"].replace("__", "/")] / 2)
            with torch.no_grad():
                # the job keeps max_q_l = 32 tokens (char-level toy vocab: captions are long)
                enc = proc(text=[r["query"]], return_tensors="pt", truncation=True, max_length=32)
                text = clip.text_model(**enc)
                emb = clip.text_projection(text.pooler_output)[0]
            emb = emb / emb.norm()
            clips = b.video[i, r["relevant_clip_ids"], :CLIP_PROJ]  # unit-norm float16 values
            expected = (clips @ emb).numpy()
            got = np.array([x[0] for x in r["saliency_scores"]])
            np.testing.assert_allclose(got, expected, atol=5e-3)
            n_t = int(b.text_mask[i].sum())
            assert n_t == enc["input_ids"].shape[1]  # SOT..EOT, one row per token
            np.testing.assert_allclose(
                b.text[i, :n_t].numpy(),
                (text.last_hidden_state[0] / text.last_hidden_state[0].norm(dim=-1,
                                                                            keepdim=True)).numpy(),
                atol=5e-3)

    # what jobs.train does with it: preflight (dims from the manifests), model, loss
    from jobs.preflight import check_data
    from vl.config import ExperimentConfig
    from vl.engine import evaluate, forward
    from vl.losses import build_criterion
    from vl.model import build_model

    cfg = ExperimentConfig.from_preset("tiny", [
        "data.dataset=pretrain", "data.video_features=[clip]", "data.text_features=[clip]",
        "model.max_q_l=32", "data.max_q_l=32", f"data.train={out}/train", f"data.val={out}/val"])
    shape = check_data(cfg)
    assert (shape.video_dim, shape.text_dim) == (CLIP_PROJ, CLIP_TEXT_HIDDEN)  # without TEF
    assert (shape.num_train, shape.num_val) == (train.num_rows, val.num_rows)
    cfg.model.video_dim, cfg.model.text_dim = CLIP_PROJ, CLIP_TEXT_HIDDEN
    torch.manual_seed(0)
    model, criterion = build_model(cfg.model), build_criterion(cfg.loss)
    with torch.no_grad():
        losses = criterion(forward(model, batches[0]), batches[0], 0)
    assert torch.isfinite(losses["loss"]) and "loss_span" in losses  # moment losses active
    # evaluation on the corpus' val split scores its moments (saliency there is not a grade)
    val_loader = make_loader(f"{out}/val", batch_size=4, shuffle=False, max_v_l=None, max_q_l=32)
    result, pred_rows = evaluate(model, criterion, val_loader, dataset="pretrain",
                                 ground_truth=read_annotations(f"{out}/val"))
    assert len(pred_rows) == val.num_rows
    assert 0.0 <= result["metrics"]["brief"]["MR-full-R1@0.5"] <= 100.0
    assert math.isfinite(result["selection"])

    # MLflow: the corpus run holds counts, caption examples and the failure
    client = MlflowClient()
    exp = client.get_experiment_by_name("corpus-test")
    (mlrun,) = client.search_runs([exp.experiment_id])
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.metrics["rows_train"] + mlrun.data.metrics["rows_val"] == len(rows)
    assert mlrun.data.metrics["videos_failed"] == 1
    assert mlrun.data.params["corpus.interval"] == "10.0"
    art = Path(client.download_artifacts(mlrun.info.run_id, "failures.json", str(tmp_path)))
    assert [f["vid"] for f in json.loads(art.read_text())] == ["broken"]
    art = Path(client.download_artifacts(mlrun.info.run_id, "caption_examples.json",
                                         str(tmp_path)))
    assert len(json.loads(art.read_text())) == 3

    # a re-run skips the finished videos, retries only the broken one, keeps the manifests
    lines.clear()
    again = run(settings, opts, log=lines.append)
    assert again["videos_already_done"] == 3 and again["videos_processed"] == 0
    assert again["videos_failed"] == 1
    assert again["rows_train"] == summary["rows_train"]
    assert again["rows_val"] == summary["rows_val"]
    assert read_manifest(f"{out}/train").shards == train.shards
    # other settings on the same corpus are refused
    from jobs.pretrain_corpus import CorpusInputError

    other = CorpusSettings(captioner=str(blip_dir), clip=str(clip_dir), interval=5.0,
                           clip_len=2.0, frame_size=32, caption_max_tokens=8)
    with pytest.raises(CorpusInputError, match="interval"):
        run(other, opts, log=lines.append)


def test_cli_rejects_missing_models_and_empty_folders(tmp_path, capsys):
    from jobs.pretrain_corpus import main

    (tmp_path / "videos").mkdir()
    code = main(["--videos", str(tmp_path / "videos"), "--out", str(tmp_path / "out"),
                 "--captioner", str(tmp_path / "nope"), "--clip", "openai/clip-vit-base-patch32",
                 "--no-mlflow"])
    assert code == 2 and "--captioner" in capsys.readouterr().err
    (tmp_path / "m").mkdir()
    code = main(["--videos", str(tmp_path / "videos"), "--out", str(tmp_path / "out"),
                 "--captioner", str(tmp_path / "m"), "--clip", str(tmp_path / "m"),
                 "--no-mlflow"])
    assert code == 2 and "no video files" in capsys.readouterr().err
