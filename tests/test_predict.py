"""jobs.predict: a registered pyfunc model -> official rows for a shard set (no Ray needed).

The model is registered straight from a checkpoint file (what jobs.train registers), so these
tests exercise the registry + pyfunc path in seconds; test_train_job covers a trained one.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pytest
import torch

from jobs.predict import main
from jobs.shard import run as shard_run
from vl import serving, tracking
from vl.config import ExperimentConfig
from vl.data.dataset import make_loader, read_annotations
from vl.data.shards import read_manifest
from vl.data.synthetic import SyntheticConfig, generate
from vl.engine import predict_rows
from vl.metrics.retrieval import LENGTH_BUCKETS
from vl.model import build_model

REPO = Path(__file__).resolve().parents[1]
DIMS = {"slowfast": 8, "clip": 8}

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def val_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A local val shard set: 8 synthetic videos, 16 queries."""
    layout = generate(SyntheticConfig("qvhighlights", videos=8, seed=5, dims=DIMS,
                                      video_sets=("slowfast", "clip"), text_sets=("clip",),
                                      val_fraction=0.0), tmp_path_factory.mktemp("raw"))
    out = str(tmp_path_factory.mktemp("shards") / "val")
    shard_run(dataset="qvhighlights", annotations=str(layout.train_jsonl),
              video_features=layout.video_arg(), text_features=layout.text_arg(), out=out,
              rows_per_shard=6, ray_mode="off", log=lambda *_: None)
    return out


def strict_json(text: str) -> object:
    """`text` parsed as JSON proper: NaN / Infinity (which json.loads accepts) fail the test."""
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))


@pytest.fixture
def registered(mlflow_env, tmp_path: Path) -> tuple[str, ExperimentConfig, dict]:
    """A (randomly initialised) smoke model registered as NAME with alias champion."""
    cfg = ExperimentConfig.from_yaml(REPO / "configs/smoke.yaml",
                                     ["model.video_dim=16", "model.text_dim=8"])
    torch.manual_seed(0)
    weights = build_model(cfg.model).state_dict()
    path = tmp_path / "model.pt"
    torch.save({"model": weights, "config": cfg.to_dict(), "epoch": 0}, path)
    name = f"vl-predict-{uuid.uuid4().hex[:8]}"
    run_id = tracking.start_or_resume_run("test-predict", name)
    version, champion = serving.log_and_register_model(run_id, path, name, "selection", 1.0)
    tracking.finish_run(run_id)
    assert champion and version == "1"
    return name, cfg, weights


def test_predict_writes_official_rows_that_match_the_engine(registered, val_shards, tmp_path,
                                                            capsys):
    """The pyfunc path (per-sample inputs, its own padding) gives the rows vl.engine gives on
    the training loader's batches for the same weights. The rows and the --gt metrics are JSON
    proper: the synthetic windows (at most 16 s) leave the long bucket empty, a NaN metric that
    must print as null."""
    name, cfg, weights = registered
    out = tmp_path / "pred.jsonl"
    assert main(["--model", f"models:/{name}@champion", "--data", val_shards, "--out", str(out),
                 "--gt", "--batch-size", "5"]) == 0
    rows = [strict_json(line) for line in out.read_text().splitlines()]
    gt = {g["qid"]: g for g in read_annotations(val_shards)}
    assert sorted(r["qid"] for r in rows) == sorted(gt)
    for row in rows:
        assert row["vid"] == gt[row["qid"]]["vid"] and row["query"] == gt[row["qid"]]["query"]
        assert len(row["pred_saliency_scores"]) == 75  # synthetic QVH videos: 75 clips of 2 s
        assert len(row["pred_relevant_windows"]) == cfg.model.num_queries
        for st, ed, score in row["pred_relevant_windows"]:
            assert 0 <= st <= ed <= 150 and 0 <= score <= 1
    brief = strict_json(capsys.readouterr().out.split("\n", 1)[1])
    assert "MR-full-R1@0.5" in brief and "HL-min-VeryGood-mAP" in brief
    lengths = [ed - st for g in gt.values() for st, ed in g["relevant_windows"]]
    empty = [b for b in ("short", "middle", "long")
             if not any(LENGTH_BUCKETS[b][0] < n <= LENGTH_BUCKETS[b][1] for n in lengths)]
    assert empty, "no empty length bucket: this data no longer exercises a NaN metric"
    for bucket in empty:
        assert brief[f"MR-{bucket}-mAP"] is None
    assert isinstance(brief["MR-full-mAP"], float)

    model = build_model(cfg.model)
    model.load_state_dict(weights)
    loader = make_loader(val_shards, 4, shuffle=False, max_v_l=cfg.data.max_v_l,
                         max_q_l=cfg.data.max_q_l, video_features=cfg.data.video_features,
                         text_features=cfg.data.text_features)
    expected = {r["qid"]: r for batch in loader for r in predict_rows(model, batch)}
    for row in rows:
        want = expected[row["qid"]]
        assert row["pred_relevant_windows"] == want["pred_relevant_windows"]
        assert row["pred_saliency_scores"] == pytest.approx(want["pred_saliency_scores"],
                                                            abs=2e-4)


def test_predict_corrupt_shard_is_one_line_naming_it_and_exit_2(registered, val_shards,
                                                                 tmp_path, capsys):
    """A shard whose bytes no longer match the manifest's sha256 (a flipped byte mid-file, as
    bit rot or a torn copy leaves it) stops the job with exit 2 and one line naming the file,
    not a traceback or rows predicted from garbage; no rows file is written."""
    name, _, _ = registered
    data = tmp_path / "val"
    shutil.copytree(val_shards, data)
    shard = read_manifest(str(data)).shards[1].path
    path = data / shard
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    out = tmp_path / "pred.jsonl"
    code = main(["--model", f"models:/{name}@champion", "--data", str(data), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert captured.err.count("\n") == 1 and captured.err.startswith("jobs.predict: ")
    assert str(path) in captured.err and "Traceback" not in captured.err
    assert not out.exists() and "wrote" not in captured.out


def test_predict_missing_shards_fails_fast(mlflow_env, tmp_path, capsys):
    code = main(["--model", "models:/nothing@champion", "--data", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "p.jsonl")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"no shard manifest at {tmp_path / 'nope'}" in err
    assert not (tmp_path / "p.jsonl").exists()


@pytest.mark.parametrize("flag,value", [("--batch-size", "-1"), ("--batch-size", "0"),
                                        ("--top-k", "0"), ("--iou", "nan")])
def test_predict_impossible_numbers_exit_2(tmp_path, capsys, flag, value):
    code = main(["--model", "models:/nothing@champion", "--data", str(tmp_path / "x"),
                 "--out", str(tmp_path / "p.jsonl"), flag, value])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and flag in err
    assert not (tmp_path / "p.jsonl").exists()

