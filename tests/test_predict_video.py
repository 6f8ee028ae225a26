"""From a user's own videos to moments: jobs.predict --video end to end with a registered model
(randomly initialised; registered from a checkpoint file like tests/test_predict.py) and a tiny
CLIP, and jobs.extract -> jobs.predict --features / --videos through Ray Data on the session's
S3. Nothing is downloaded (HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import torch

from cluster.local.common import free_port
from tests.tiny_models import CLIP_PROJ, CLIP_TEXT_HIDDEN, build_tiny_clip
from tests.videos import write_pattern_video
from vl.config import ExperimentConfig

REPO = Path(__file__).resolve().parents[1]
MAX_V_L = 10  # clips the model sees at once: 20 s at 2-s clips
QUERIES = ["a dog on the floor", "a man in the kitchen"]

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("models") / "clip")


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """long.mp4: 3 x MAX_V_L clips (60 s); short.mp4: 13 s; broken.mp4: not decodable."""
    root = tmp_path_factory.mktemp("videos")
    write_pattern_video(root / "long.mp4", 3 * MAX_V_L * 2.0, fps=4, size=48, segment_s=5)
    write_pattern_video(root / "short.mp4", 13.0, fps=4, size=48, seed=1)
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + bytes(range(256)) * 8)
    return root


def _register(cfg: ExperimentConfig, tmp_path: Path, features: dict | None) -> str:
    from vl import serving, tracking
    from vl.model import build_model

    torch.manual_seed(0)
    path = tmp_path / "model.pt"
    torch.save({"model": build_model(cfg.model).state_dict(), "config": cfg.to_dict(),
                "epoch": 0}, path)
    name = f"vl-video-{uuid.uuid4().hex[:8]}"
    run_id = tracking.start_or_resume_run("test-predict-video", name)
    serving.log_and_register_model(run_id, path, name, "selection", 1.0, features=features)
    tracking.finish_run(run_id)
    return f"models:/{name}@champion"


@pytest.fixture
def clip_model(mlflow_env, tiny_clip, tmp_path, monkeypatch) -> str:
    """A CLIP-only smoke model at the tiny CLIP's widths, recording the tiny CLIP as its
    extractor model."""
    from vl.extractors import recipe_from_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = ExperimentConfig.from_yaml(REPO / "configs/smoke.yaml", [
        "data.video_features=[clip]", "data.text_features=[clip]", f"data.max_v_l={MAX_V_L}",
        f"model.video_dim={CLIP_PROJ}", f"model.text_dim={CLIP_TEXT_HIDDEN}"])
    recipe = recipe_from_config(cfg.to_dict(), models={"clip": str(tiny_clip)})
    return _register(cfg, tmp_path, recipe.to_dict())


def test_predict_video_answers_every_query_over_the_whole_long_video(clip_model, videos,
                                                                     tmp_path, capsys):
    from jobs.predict import main

    out = tmp_path / "rows.jsonl"
    args = ["--model", clip_model, "--video", str(videos / "long.mp4"), "--out", str(out),
            "--top-k", "3"]
    assert main([*args, "--query", QUERIES[0], "--query", QUERIES[1]]) == 0
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["query"] for r in rows] == QUERIES and [r["qid"] for r in rows] == [0, 1]
    for row in rows:
        assert row["vid"] == "long" and row["duration"] == pytest.approx(60.0)
        moments = row["pred_relevant_windows"]
        scores = [m[2] for m in moments]
        assert scores == sorted(scores, reverse=True)
        assert all(0 <= st < ed <= 60.0 for st, ed, _ in moments)
        # 5 windows of 10 clips (stride 5): moments come from all of them, not only the first
        assert any(st >= MAX_V_L * 2.0 for st, _, _ in moments)
        assert len(row["pred_saliency_scores"]) == 3 * MAX_V_L
        assert printed.count(f"{row['query']!r}") == 1
    assert printed.count("  moment ") == 2 * 3 and printed.count("highlights:") == 2
    first = rows[0]["pred_relevant_windows"][0]
    assert f"{first[0]:8.1f} s - {first[1]:8.1f} s   score {first[2]:.4f}" in printed


def test_predict_video_bad_input_is_one_line_and_writes_nothing(clip_model, videos, tmp_path,
                                                                capsys):
    from jobs.predict import main
    from vl.extractors import FeatureRecipe, FeatureSource

    out = tmp_path / "rows.jsonl"
    base = ["--model", clip_model, "--out", str(out)]
    cases = [
        (["--video", str(videos / "broken.mp4"), "--query", "a dog"], "broken.mp4: cannot "
         "decode video"),
        (["--video", str(videos / "short.mp4"), "--query", "a dog", "--query", "  "],
         "--query 2 is empty"),
    ]
    # a model whose recorded recipe needs SlowFast video features
    cfg = ExperimentConfig.from_yaml(REPO / "configs/smoke.yaml",
                                     ["model.video_dim=24", "model.text_dim=24"])
    recipe = FeatureRecipe(video={"slowfast": FeatureSource("", "", 8),
                                  "clip": FeatureSource("clip-image", "x", 16)},
                           text={"clip": FeatureSource("clip-text", "x", 24)})
    slowfast = _register(cfg, tmp_path, recipe.to_dict())
    capsys.readouterr()  # MLflow's registration messages
    cases.append((["--model", slowfast, "--video", str(videos / "short.mp4"), "--query", "x"],
                  "no extractor here for video set 'slowfast'"))
    for extra, expected in cases:
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err, err
        assert not out.exists() and list(tmp_path.glob(".rows.jsonl*")) == []


def _upload(local_dir: Path, prefix: str) -> None:
    from vl.data.shards import filesystem

    fs, root = filesystem(prefix)
    for path in sorted(local_dir.glob("*.mp4")):
        fs.put_file(str(path), f"{root}/{path.name}")


def test_extract_on_s3_then_predict_the_library(clip_model, tiny_clip, videos, s3_env,
                                                local_ray, tmp_path, capsys, monkeypatch):
    """jobs.extract writes official clip_features on S3, names the broken video, skips finished
    videos on a re-run; jobs.predict answers from those files and from the videos themselves
    (Ray Data) with the same rows; an unreachable S3 endpoint is one line, exit 2."""
    from jobs.extract import main as extract
    from jobs.extract import read_npz
    from jobs.predict import main as predict
    from vl.data.shards import read_bytes

    prefix = f"s3://vl-data/user-videos-{uuid.uuid4().hex[:6]}"
    _upload(videos, f"{prefix}/raw")
    args = ["--videos", f"{prefix}/raw", "--out", f"{prefix}/features", "--clip-model",
            str(tiny_clip), "--device", "cpu", "--videos-per-batch", "2"]
    assert extract(args) == 0
    lines = capsys.readouterr().out.splitlines()
    summary = json.loads(lines[-1])
    assert (summary["videos_processed"], summary["failed"]) == (2, ["broken"])
    assert any("broken" in ln and "FAILED" in ln and "videos/s" in ln and "ETA" in ln
               for ln in lines)
    long = read_npz(f"{prefix}/features/clip_features/long.npz")
    assert long["features"].shape == (3 * MAX_V_L, CLIP_PROJ) and float(long["duration"]) == 60
    failures = json.loads(read_bytes(f"{prefix}/features/failures.json"))
    assert [f["vid"] for f in failures] == ["broken"] and "broken.mp4" in failures[0]["error"]
    assert extract(args) == 0
    again = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (again["videos_already_done"], again["videos_processed"]) == (2, 0)

    queries = tmp_path / "q.jsonl"
    queries.write_text(json.dumps({"qid": "all", "query": QUERIES[0]}) + "\n"
                       + json.dumps({"qid": 7, "query": QUERIES[1], "vid": "long"}) + "\n")
    rows = {}
    for source in (["--features", f"{prefix}/features"], ["--videos", f"{prefix}/raw"]):
        out = tmp_path / f"{source[0][2:]}.jsonl"
        assert predict(["--model", clip_model, *source, "--queries", str(queries),
                        "--out", str(out), "--device", "cpu"]) == 0
        rows[source[0]] = sorted((json.loads(x) for x in out.read_text().splitlines()),
                                 key=lambda r: (r["vid"], str(r["qid"])))
    printed = capsys.readouterr().out
    assert "broken: FAILED" in printed  # --videos decodes the library again and names it
    assert [(r["vid"], r["qid"]) for r in rows["--features"]] == [
        ("long", 7), ("long", "all"), ("short", "all")]
    for a, b in zip(rows["--features"], rows["--videos"], strict=True):
        assert a["pred_relevant_windows"] == b["pred_relevant_windows"]
        assert a["pred_saliency_scores"] == pytest.approx(b["pred_saliency_scores"], abs=1e-4)

    nowhere = f"http://127.0.0.1:{free_port()}"
    for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.setenv(key, nowhere)
    assert extract(["--videos", f"{prefix}/raw", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and nowhere in err and "does not answer" in err
    assert not (tmp_path / "x").exists()
