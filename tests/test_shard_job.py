"""jobs.shard: official layout -> shards on the real S3 server; resume, missing features, Ray."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from cluster.local.common import NO_TELEMETRY_ENV
from jobs.shard import main, run
from tests.jobs import REPO, client_env
from vl.data.annotations import load_annotations
from vl.data.shards import read_annotations, read_manifest
from vl.data.synthetic import SyntheticConfig, generate
from vl.storage import filesystem

DIMS = {"slowfast": 12, "clip": 8, "blip": 8}


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory):
    return generate(SyntheticConfig("qvhighlights", videos=6, seed=4, dims=DIMS),
                    tmp_path_factory.mktemp("raw"))  # fmt: skip


def _args(layout, out: str, *extra: str) -> list[str]:
    return [
        "--dataset", "qvhighlights", "--annotations", str(layout.train_jsonl),
        "--video-features", layout.video_arg(), "--text-features", layout.text_arg(),
        "--out", out, "--rows-per-shard", "3", "--ray", "off", *extra,
    ]  # fmt: skip


def _objects(uri: str) -> list[str]:
    fs, path = filesystem(uri)
    return sorted(fs.find(path)) if fs.exists(path) else []


@pytest.mark.integration
def test_convert_to_s3_and_resume(layout, s3_env, capsys: pytest.CaptureFixture) -> None:
    out = "s3://vl-data/test_shard_job/resume"
    assert main(_args(layout, out)) == 0
    m = read_manifest(out)
    n = len(load_annotations(layout.train_jsonl, "qvhighlights"))
    assert m.num_rows == n and len(m.shards) == -(-n // 3)
    assert [f.name for f in m.video_features] == ["slowfast", "clip", "blip"]
    assert [(f.name, f.dim) for f in m.text_features] == [("clip", 8), ("blip", 8)]
    assert {r["qid"] for r in read_annotations(out)} == {
        a.qid for a in load_annotations(layout.train_jsonl, "qvhighlights")
    }
    first = {o: filesystem(out)[0].info(o)["ETag"] for o in _objects(out) if o.endswith("parquet")}
    capsys.readouterr()
    # A re-run converts nothing; losing one shard re-converts exactly that one.
    assert main(_args(layout, out)) == 0
    assert '"converted": 0' in capsys.readouterr().out
    fs, _ = filesystem(out)
    victim = sorted(first)[1]
    fs.rm(victim)
    assert main(_args(layout, out)) == 0
    assert '"converted": 1' in capsys.readouterr().out
    assert read_manifest(out).shards == m.shards  # byte-identical shard rebuilt
    assert {o: fs.info(o)["ETag"] for o in first} == first


@pytest.mark.integration
def test_missing_features_fail_before_writing(layout, s3_env, capsys) -> None:
    out = "s3://vl-data/test_shard_job/missing"
    victim = load_annotations(layout.train_jsonl, "qvhighlights")[2]
    text_file = layout.root / "blip_aug_text_features_openai" / f"qid{victim.qid}.npz"
    moved = text_file.with_suffix(".moved")
    os.rename(text_file, moved)
    try:
        assert main(_args(layout, out)) == 2
        err = capsys.readouterr().err
        assert f"qid {victim.qid!r}" in err and "'blip'" in err and "--skip-missing" in err
        assert _objects(out) == []  # nothing written
        m = run(
            dataset="qvhighlights", annotations=str(layout.train_jsonl),
            video_features=layout.video_arg(), text_features=layout.text_arg(), out=out,
            skip_missing=True, rows_per_shard=3, ray_mode="off", log=lambda *_: None,
        )  # fmt: skip
    finally:
        os.rename(moved, text_file)
    assert m.skipped == [{"qid": victim.qid, "vid": victim.vid, "modality": "text",
                          "feature_set": "blip", "directory": str(text_file.parent)}]  # fmt: skip
    assert victim.qid not in {r["qid"] for r in read_annotations(out)}


def test_unknown_feature_dir_is_explained(layout, tmp_path: Path, capsys) -> None:
    args = _args(layout, str(tmp_path / "o"))
    args[args.index("--video-features") + 1] = str(tmp_path / "my_features")
    assert main(args) == 2
    assert "NAME=DIR" in capsys.readouterr().err


@pytest.mark.integration
def test_ray_tasks_write_the_same_shards(
    layout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ray = pytest.importorskip("ray")

    for k, v in NO_TELEMETRY_ENV.items():
        monkeypatch.setenv(k, v)
    # An in-process throwaway cluster: no token file in ~/.ray, no RAY_ADDRESS to latch onto.
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray_tmp = tempfile.mkdtemp(prefix="vlray-", dir="/tmp")  # AF_UNIX paths must stay short
    repo = str(Path(__file__).resolve().parents[1])
    common = dict(
        dataset="qvhighlights", annotations=str(layout.train_jsonl),
        video_features=layout.video_arg(), text_features=layout.text_arg(),
        rows_per_shard=3, log=lambda *_: None,
    )  # fmt: skip
    local = run(out=str(tmp_path / "local"), ray_mode="off", **common)
    ray.init(
        num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20,
        runtime_env={"env_vars": {"PYTHONPATH": repo, **NO_TELEMETRY_ENV}},
        _temp_dir=ray_tmp, log_to_driver=False,
    )  # fmt: skip
    try:
        remote = run(out=str(tmp_path / "ray_out"), ray_mode="auto", **common)
    finally:
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert [s.sha256 for s in remote.shards] == [s.sha256 for s in local.shards]


def _summary(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def _fix_first_label(raw, scores: list[int]) -> tuple[dict, list[str]]:
    """Give the first query of the raw layout other saliency scores (a fixed label): (that row,
    every annotation line as it was)."""
    lines = raw.train_jsonl.read_text().splitlines()
    first = json.loads(lines[0])
    first["saliency_scores"] = [list(scores) for _ in first["saliency_scores"]]
    raw.train_jsonl.write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    return first, lines


def test_a_fixed_label_or_new_features_reshard_under_new_names(tmp_path: Path, capsys) -> None:
    """The "already done" digest covers the annotation rows and the feature bytes: a fixed label
    or a re-extracted feature file rewrites its shard under a new name, the manifest moves to
    it, and the old file goes only after that."""
    raw = generate(SyntheticConfig("qvhighlights", videos=4, seed=6, dims=DIMS), tmp_path / "raw")
    out = str(tmp_path / "shards")
    assert main(_args(raw, out)) == 0
    before = read_manifest(out)
    capsys.readouterr()

    first, lines = _fix_first_label(raw, [4, 4, 4])
    assert main(_args(raw, out)) == 0
    assert _summary(capsys.readouterr().out)["converted"] == 1
    after = read_manifest(out)
    assert after.shards[0].path != before.shards[0].path
    assert after.shards[1:] == before.shards[1:]
    assert read_annotations(out)[0]["saliency_scores"] == first["saliency_scores"]
    assert not (Path(out) / before.shards[0].path).exists()  # removed after the swap

    last = json.loads(lines[-1])  # re-extract the features of the last query's video
    feature = next((raw.root / "slowfast_features").glob(f"{last['vid']}.npz"))
    with np.load(feature) as z:
        arrays = {k: z[k] for k in z.files}
    np.savez(feature, **{k: v * 2 + 1 for k, v in arrays.items()})
    assert main(_args(raw, out)) == 0
    assert _summary(capsys.readouterr().out)["converted"] >= 1
    assert read_manifest(out).shards[-1].path != after.shards[-1].path


def test_a_run_that_fails_midway_leaves_the_live_set_as_it_was(tmp_path: Path, capsys) -> None:
    """A re-run that writes a new first shard and then fails on a later one (a feature file
    that no longer decodes) leaves the old manifest in place, every shard it lists intact, and
    the old labels readable; once the file is fixed the next run finishes the swap."""
    raw = generate(SyntheticConfig("qvhighlights", videos=4, seed=8, dims=DIMS), tmp_path / "raw")
    out = str(tmp_path / "shards")
    assert main(_args(raw, out)) == 0
    before = read_manifest(out)
    old_labels = read_annotations(out)
    capsys.readouterr()

    first, lines = _fix_first_label(raw, [0, 1, 2])
    last = json.loads(lines[-1])
    feature = next((raw.root / "slowfast_features").glob(f"{last['vid']}.npz"))
    good = feature.read_bytes()
    feature.write_bytes(good[: len(good) // 2])  # cut short, as a killed extractor leaves it
    assert main(_args(raw, out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"feature file {feature} does not load" in err
    assert read_manifest(out) == before
    for shard in before.shards:
        assert (Path(out) / shard.path).stat().st_size == shard.bytes
    assert read_annotations(out) == old_labels

    feature.write_bytes(good)
    assert main(_args(raw, out)) == 0
    assert read_annotations(out)[0]["saliency_scores"] == first["saliency_scores"]


@pytest.mark.parametrize("flag", ["--rows-per-shard", "--row-group-rows", "--max-v-l",
                                  "--max-q-l"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_non_positive_shard_sizes_are_refused(layout, tmp_path: Path, capsys, flag, value):
    out = tmp_path / "o"
    args = _args(layout, str(out))
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{flag} must be >= 1, got {value}" in err
    assert not out.exists()


def test_non_positive_clip_len_is_refused(layout, tmp_path: Path, capsys):
    assert main(_args(layout, str(tmp_path / "o"), "--clip-len", "nan")) == 2
    assert "--clip-len must be > 0, got nan" in capsys.readouterr().err


@pytest.mark.integration
def test_readme_sequence_shard_with_the_stacks_ray_address(layout, local_stack_env, tmp_path):
    """After `eval "$(python -m cluster.local.stack up)"` RAY_ADDRESS is the dashboard URL
    (right for `ray job submit`); `python -m jobs.shard` run directly still joins the head
    (through the GCS address the stack exports beside it) and shards with Ray tasks."""
    env = client_env(local_stack_env)
    assert env["RAY_ADDRESS"].startswith("http://")
    out = tmp_path / "shards"
    args = _args(layout, str(out))
    args[args.index("--ray") + 1] = "auto"
    proc = subprocess.run([sys.executable, "-m", "jobs.shard", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "with Ray tasks" in proc.stdout
    assert read_manifest(str(out)).num_rows == len(load_annotations(layout.train_jsonl,
                                                                    "qvhighlights"))

    env.pop("VL_RAY_GCS_ADDRESS")  # a dashboard URL and nothing else: one clear line
    args[args.index("--out") + 1] = str(tmp_path / "other")
    proc = subprocess.run([sys.executable, "-m", "jobs.shard", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2 and "is the job API URL" in proc.stderr
    assert proc.stderr.count("\n") == 1 and not (tmp_path / "other").exists()
