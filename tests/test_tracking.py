"""vl.tracking: params, run resumption, metrics, figures and the registry champion rule.

The pure helpers are unit tests; everything that talks to MLflow runs against the real session
server (SQLite + artifacts in SeaweedFS), because the run-resume and alias logic is only as
good as the server's search and registry semantics.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import mlflow.artifacts
import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cluster.local.common import free_port, quiet_env, wait_for
from vl import figures, serving, tracking
from vl.config import ExperimentConfig
from vl.data.batch import Batch
from vl.engine import predict_rows
from vl.model import build_model
from vl.serving import make_batch


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# ---- pure helpers ---------------------------------------------------------------------------
def test_flatten_params_dots_keys_and_drops_credentials():
    cfg = {
        "model": {"hidden_dim": 256, "dims": [1, 2]},
        "lr": 1e-4,
        "storage": {
            "path": "s3://vl-runs/x",
            "aws_secret_access_key": "SHH",
            "AWS_ACCESS_KEY_ID": "AKIA",
            "credentials": {"user": "u", "pw": "p"},
            "api-token": "t",
            "db_password": "p",
            "key_id": "k",
        },
    }
    assert tracking.flatten_params(cfg) == {
        "model.hidden_dim": "256",
        "model.dims": "[1, 2]",
        "lr": "0.0001",
        "storage.path": "s3://vl-runs/x",
    }
    assert tracking.flatten_params({"a": 1}, prefix="cfg.") == {"cfg.a": "1"}


def test_gt_saliency_sums_three_annotators_on_relevant_clips():
    gt = {"relevant_clip_ids": [1, 3], "saliency_scores": [[4, 3, 2], [0, 1, 1]]}
    assert figures.gt_saliency(gt, 5).tolist() == [0, 9, 0, 2, 0]


def test_check_tracking_server_fails_fast_when_nothing_listens():
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(tracking.TrackingServerUnavailableError) as err:
        tracking.check_tracking_server(uri, timeout_s=2)
    assert time.monotonic() - start < 3
    assert uri in str(err.value) and "MLFLOW_TRACKING_URI" in str(err.value)


def test_curves_group_loss_terms_in_panels_with_legends_beside_them():
    """One panel per group of terms (the aux decoder layers' copies left out), colour per term
    and style per split, log scale only where the values span far, every legend to the right
    of its panel and inside the figure."""
    history = {}
    for split in ("train", "val"):
        history[f"{split}_loss"] = [(0, 9.0), (1, 4.0)]
        for term in ("span", "giou", "span_0", "saliency", "margin", "sym", "tc", "new_term"):
            history[f"{split}_loss_{term}"] = [(0, 0.5), (1, 0.4)]
    history["train_loss_hard_pos"] = [(0, 1.0), (1, 0.001)]  # spans 1000x: its panel goes log
    history["MR-full-R1_at_0.5"] = [(0, 10.0), (1, float("nan")), (2, 20.0)]
    fig = figures.plot_curves(history)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    panels = {ax.get_title(loc="left"): ax for ax in fig.axes if ax.get_title(loc="left")}

    def legend(title: str) -> list[str]:
        return [text.get_text() for text in panels[title].get_legend().get_texts()]

    assert legend("total loss") == ["train", "val"]
    assert legend("moment retrieval (MR) losses") == ["span", "giou"]
    assert legend("highlight detection (HD) losses") == ["saliency", "margin", "hard_pos"]
    assert legend("alignment / coupling losses") == ["sym", "tc"]
    assert legend("other losses") == ["new_term"]
    assert legend("evaluation metrics") == ["MR-full-R1_at_0.5"]
    assert len(panels) == 6
    mr = panels["moment retrieval (MR) losses"]
    assert len(mr.get_lines()) == 4 and {ln.get_linestyle() for ln in mr.get_lines()} == {"-", "--"}
    assert panels["highlight detection (HD) losses"].get_yscale() == "log"
    assert mr.get_yscale() == "linear"
    assert list(panels["evaluation metrics"].get_lines()[0].get_ydata()) == [10.0, 20.0]
    for ax in panels.values():
        box, axes_box = ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)
        assert box.x0 >= axes_box.x1 and box.x1 <= fig.bbox.x1, ax.get_title(loc="left")


def test_plots_draw_spans_and_saliency():
    rows = [
        {"qid": 1, "pred_relevant_windows": [[0, 4, 0.2], [2, 6, 0.9]],
         "pred_saliency_scores": [0.1, 0.5, 0.9]},
        {"qid": 99, "pred_relevant_windows": [], "pred_saliency_scores": [0.0]},  # no GT row
    ]
    gt = [{"qid": 1, "query": "a dog", "duration": 6, "relevant_windows": [[2, 4]],
           "relevant_clip_ids": [1], "saliency_scores": [[4, 4, 4]]}]
    fig = figures.plot_saliency_examples(rows, gt, n=4)
    ax = fig.axes[0]  # one query -> one main axis (+ its twin)
    assert len(fig.axes) == 2
    gt_line = ax.get_lines()[0]
    assert gt_line.get_ydata().tolist() == [0, 12, 0]
    spans = [p.get_x() for p in ax.patches]  # GT window at 2 s, predicted top-1 at 2 s too
    assert len(ax.patches) == 2 and spans == [2, 2]
    widths = sorted(round(p.get_width(), 6) for p in ax.patches)
    assert widths == [2, 4]  # GT [2, 4] and the top-scoring prediction [2, 6]


# ---- against the real MLflow server ---------------------------------------------------------
def test_check_tracking_server_accepts_running_server(mlflow_env):
    tracking.check_tracking_server(mlflow_env.uri)


@pytest.mark.parametrize("user,password", [("admin", "not-the-password"), (None, None)])
def test_check_tracking_server_refuses_wrong_or_missing_credentials(mlflow_env, monkeypatch,
                                                                    user, password):
    """The stack's server answers /health to anyone: the preflight also proves the credentials,
    so a wrong password fails before any worker starts, naming the variables."""
    for key, value in (("MLFLOW_TRACKING_USERNAME", user), ("MLFLOW_TRACKING_PASSWORD", password)):
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    with pytest.raises(tracking.TrackingServerUnavailableError,
                       match="refused .*HTTP 401.*MLFLOW_TRACKING_PASSWORD"):
        tracking.check_tracking_server(mlflow_env.uri)


def test_start_or_resume_run_continues_the_tagged_run(mlflow_env):
    experiment = _name("exp")
    first = tracking.start_or_resume_run(experiment, "trial-a")
    tracking.finish_run(first, status="FAILED")
    again = tracking.start_or_resume_run(experiment, "trial-a")
    other = tracking.start_or_resume_run(experiment, "trial-b")
    client = MlflowClient()
    assert again == first and other != first
    assert client.get_run(first).info.status == "RUNNING"
    assert client.get_run(first).data.tags[tracking.RUN_NAME_TAG] == "trial-a"
    exp_id = client.get_experiment_by_name(experiment).experiment_id
    assert len(client.search_runs([exp_id])) == 2


def test_log_epoch_and_params(mlflow_env):
    run_id = tracking.start_or_resume_run(_name("exp"), "r")
    tracking.log_epoch(run_id, 0, {"loss": 2.5, "mAP": np.float32(10.0)})
    tracking.log_epoch(run_id, 1, {"loss": 1.5})
    tracking.log_params(run_id, {"model": {"d": 8}, "token": "x"})
    tracking.log_params(run_id, {"model": {"d": 8}})  # resumed run, same value: no error
    client = MlflowClient()
    history = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 2.5), (1, 1.5)]
    assert client.get_run(run_id).data.params == {"model.d": "8"}


def test_run_metrics_log_each_step_once_across_restarts(mlflow_env):
    """A resumed process (a new RunMetrics on the same run) offers epochs 1 and 2 again: the
    run keeps one point per step, and a key the run never held is logged at every step."""
    run_id = tracking.start_or_resume_run(_name("exp"), "resumed")
    first = tracking.RunMetrics(run_id)
    assert first.log(0, {"loss": 3.0}) == ["loss"]
    assert first.log(1, {"loss": 2.0, "mAP": 5.0}) == ["loss", "mAP"]
    assert first.log(2, {"loss": 1.0}) == ["loss"]
    resumed = tracking.RunMetrics(run_id)  # the restarted attempt, from the epoch-0 checkpoint
    assert resumed.log(1, {"loss": 2.0, "mAP": 5.0, "lr": 0.1}) == ["lr"]
    assert resumed.log(2, {"loss": 1.0, "mAP": 6.0}) == ["mAP"]
    assert resumed.log(3, {"loss": 0.5}) == ["loss"]
    client = MlflowClient()
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [
        (0, 3.0), (1, 2.0), (2, 1.0), (3, 0.5)]
    assert sorted(m.step for m in client.get_metric_history(run_id, "mAP")) == [1, 2]
    assert [m.step for m in client.get_metric_history(run_id, "lr")] == [1]


def test_background_log_outlasts_an_mlflow_outage_longer_than_the_client_retries(
        mlflow_env, monkeypatch):
    """The server paused (SIGSTOP) longer than MLflow's client retries (1-s timeout, no retry
    here): logging returns at once, the points wait, and once the server is back (SIGCONT)
    every point is stored exactly once, although requests the client gave up on were
    processed by the server after it resumed."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    run_id = tracking.start_or_resume_run(_name("exp"), "outage")
    log = tracking.BackgroundLog(run_id, retry_s=(0.5, 2.0))
    log.log_metrics(0, {"loss": 3.0})
    assert log.flush(30)
    with pytest.raises(MlflowException):  # what a synchronous logger meets: training dies
        os.killpg(mlflow_env.pid, signal.SIGSTOP)
        try:
            tracking.RunMetrics(run_id).log(9, {"loss": 0.0})
        finally:
            os.killpg(mlflow_env.pid, signal.SIGCONT)
    os.killpg(mlflow_env.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        for step in (1, 2, 3):
            log.log_metrics(step, {"loss": 3.0 - step, "mAP": 10.0 * step})
        log.log_figure(figures.plot_curves({"loss": [(0, 3.0), (1, 2.0)]}), "curves")
        assert time.monotonic() - t0 < 1.0  # the training loop is not held up
        wait_for(lambda: log.failures >= 2, 30, "two failed sends while the server is paused")
        assert not log.flush(1.0) and log.pending() >= 3
        assert [s for s, _, _ in log.unsent()] == [1, 2, 3]
    finally:
        os.killpg(mlflow_env.pid, signal.SIGCONT)
    t_back = time.monotonic()
    assert log.close(60)
    delivered_s = time.monotonic() - t_back
    client = MlflowClient()
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [
        (0, 3.0), (1, 2.0), (2, 1.0), (3, 0.0)]
    assert sorted(m.step for m in client.get_metric_history(run_id, "mAP")) == [1, 2, 3]
    assert [f.path for f in client.list_artifacts(run_id, "plots")] == ["plots/curves.png"]
    assert delivered_s < 10  # the longest backoff (2 s) plus the sends


def test_background_log_resends_points_kept_by_a_checkpoint(mlflow_env):
    """`unsent()` taken with a checkpoint and handed to the next attempt as `queued`: stored
    once, even where the first attempt's request did reach the server."""
    run_id = tracking.start_or_resume_run(_name("exp"), "carried")
    first = tracking.BackgroundLog(run_id)
    first.log_metrics(0, {"loss": 1.0})
    assert first.close(30)
    carried = [(0, {"loss": 1.0}, 0), (1, {"loss": 0.5}, int(time.time() * 1000))]
    resumed = tracking.BackgroundLog(run_id, queued=carried)
    assert resumed.close(30)
    history = MlflowClient().get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 1.0), (1, 0.5)]


def test_log_figure_stores_png(mlflow_env):
    run_id = tracking.start_or_resume_run(_name("exp"), "fig")
    tracking.log_figure(run_id, figures.plot_curves({"loss": [(0, 1.0)]}), "curves")
    files = [f.path for f in MlflowClient().list_artifacts(run_id, "plots")]
    assert files == ["plots/curves.png"]


def _fake_checkpoint(tmp_path):
    """Registration never loads the checkpoint, so any torch file serves here."""
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": {}, "config": {}}, path)
    return path


def test_champion_alias_moves_only_to_a_better_model(mlflow_env, tmp_path):
    name = _name("vl-model")
    run_id = tracking.start_or_resume_run(_name("exp"), "reg")
    ckpt = _fake_checkpoint(tmp_path)
    v1, champ1 = serving.log_and_register_model(run_id, ckpt, name, "MR-full-mAP", 30.0)
    v2, champ2 = serving.log_and_register_model(run_id, ckpt, name, "MR-full-mAP", 25.0)
    v3, champ3 = serving.log_and_register_model(run_id, ckpt, name, "MR-full-mAP", 30.5)
    assert (champ1, champ2, champ3) == (True, False, True)
    client = MlflowClient()
    assert client.get_model_version_by_alias(name, "champion").version == v3
    tags = client.get_model_version(name, v2).tags
    assert tags[tracking.SELECTION_METRIC_TAG] == "MR-full-mAP"
    assert float(tags[tracking.SELECTION_VALUE_TAG]) == 25.0
    assert client.get_run(run_id).info.status == "RUNNING"  # logging did not end the run

    low = _name("vl-loss")
    _, first = serving.log_and_register_model(run_id, ckpt, low, "loss", 1.0, False)
    worse_v, worse = serving.log_and_register_model(run_id, ckpt, low, "loss", 2.0, False)
    assert first and not worse
    assert client.get_model_version_by_alias(low, "champion").version != worse_v


def _lineage_run(experiment: str, dataset: str, video_features: tuple[str, ...] = ("clip",),
                 text_features: tuple[str, ...] = ("clip",)) -> str:
    """A run with the config params jobs.train logs that decide a version's lineage."""
    run_id = tracking.start_or_resume_run(experiment, _name("run"))
    tracking.log_params(run_id, {"data": {"dataset": dataset,
                                          "video_features": list(video_features),
                                          "text_features": list(text_features)}})
    return run_id


def test_registering_the_same_checkpoint_again_is_a_no_op(mlflow_env, tmp_path):
    """A resubmitted finished run registers its best checkpoint again: same version back, no
    second version."""
    name = _name("vl-again")
    run_id = _lineage_run(_name("exp"), "qvhighlights")
    ckpt = _fake_checkpoint(tmp_path)
    source = serving.log_model(run_id, ckpt)
    first = tracking.register_version(run_id, source, name, "MR-full-mAP", 30.0)
    again = tracking.register_version(run_id, source, name, "MR-full-mAP", 30.0)
    assert first == again == ("1", True)
    assert len(MlflowClient().search_model_versions(f"name = '{name}'")) == 1


def test_champion_stays_within_its_dataset_and_metric(mlflow_env, tmp_path):
    name = _name("vl-lineage")
    experiment = _name("exp")
    ckpt = _fake_checkpoint(tmp_path)
    qv = _lineage_run(experiment, "qvhighlights")
    v1, champ1 = serving.log_and_register_model(qv, ckpt, name, "MR-full-mAP", 30.0)
    charades = _lineage_run(experiment, "charades")
    v2, champ2 = serving.log_and_register_model(charades, ckpt, name, "MR-full-mAP", 90.0)
    v3, champ3 = serving.log_and_register_model(qv, ckpt, name, "HL-min-VeryGood-mAP", 95.0)
    assert (champ1, champ2, champ3) == (True, False, False)
    client = MlflowClient()
    assert client.get_model_version_by_alias(name, "champion").version == v1
    assert client.get_model_version(name, v2).tags["vl.lineage.data.dataset"] == "charades"


def test_champion_stays_within_its_feature_sets(mlflow_env, tmp_path):
    """Same dataset and metric, other video or text feature sets: a model that reads other
    inputs is not a drop-in replacement for the one serving, so even a far better score must
    not take the alias; a later version of the champion's own feature sets still does."""
    name = _name("vl-features")
    experiment = _name("exp")
    ckpt = _fake_checkpoint(tmp_path)
    clip = _lineage_run(experiment, "qvhighlights")
    v1, champ1 = serving.log_and_register_model(clip, ckpt, name, "MR-full-mAP", 30.0)
    slowfast = _lineage_run(experiment, "qvhighlights", video_features=("slowfast", "clip"))
    v2, champ2 = serving.log_and_register_model(slowfast, ckpt, name, "MR-full-mAP", 90.0)
    blip = _lineage_run(experiment, "qvhighlights", text_features=("clip", "blip"))
    v3, champ3 = serving.log_and_register_model(blip, ckpt, name, "MR-full-mAP", 95.0)
    assert (champ1, champ2, champ3) == (True, False, False)
    client = MlflowClient()
    assert client.get_model_version_by_alias(name, "champion").version == v1
    v2_tags, v3_tags = (client.get_model_version(name, v).tags for v in (v2, v3))
    assert json.loads(v2_tags["vl.lineage.data.video_features"]) == ["slowfast", "clip"]
    assert json.loads(v3_tags["vl.lineage.data.text_features"]) == ["clip", "blip"]
    again = _lineage_run(experiment, "qvhighlights")  # another run, the champion's inputs
    v4, champ4 = serving.log_and_register_model(again, ckpt, name, "MR-full-mAP", 31.0)
    assert champ4 and client.get_model_version_by_alias(name, "champion").version == v4


def test_champion_move_is_rechecked_against_a_concurrent_registration(mlflow_env, tmp_path):
    """Another job registered a better version but has not moved the alias yet: our worse
    version, though it beats the current champion, must not be left as champion."""
    name = _name("vl-race")
    run_id = _lineage_run(_name("exp"), "qvhighlights")
    ckpt = _fake_checkpoint(tmp_path)
    v1, _ = serving.log_and_register_model(run_id, ckpt, name, "MR-full-mAP", 30.0)
    client = MlflowClient()
    tags = dict(client.get_model_version(name, v1).tags)
    source = client.get_model_version(name, v1).source
    other = client.create_model_version(
        name, source=source, run_id=run_id, model_id=source.removeprefix("models:/"),
        tags={**tags, tracking.SELECTION_VALUE_TAG: "40.0"}).version
    mine, champion = serving.log_and_register_model(run_id, ckpt, name, "MR-full-mAP", 35.0)
    assert not champion
    assert client.get_model_version_by_alias(name, "champion").version == str(other) != mine


def test_pyfunc_roundtrip(mlflow_env, tmp_path):
    """The registered champion, loaded by URI, predicts the same rows as the bare model on
    each sample alone (so padding two samples of different length changes nothing)."""
    pytest.importorskip("vl.engine")


    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = ExperimentConfig.from_preset("tiny")
    model = build_model(cfg.model).eval()
    ckpt = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "config": cfg.to_dict()}, ckpt)
    run_id = tracking.start_or_resume_run(_name("exp"), "pyfunc")
    name = _name("vl-tiny")
    serving.log_and_register_model(run_id, ckpt, name, "MR-full-mAP", 1.0)

    rng = np.random.default_rng(0)
    dv, dt = cfg.model.video_input_dim, cfg.model.text_dim
    videos = [rng.standard_normal((n, dv)).astype(np.float32) for n in (7, 4)]
    texts = [rng.standard_normal((n, dt)).astype(np.float32) for n in (3, 5)]
    served = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    rows = served.predict({"video_features": videos, "text_features": texts, "qid": [11, 12]})
    frame = pd.DataFrame({"video_features": videos, "text_features": texts, "qid": [11, 12]})
    assert served.predict(frame) == rows

    for video, text, row, qid in zip(videos, texts, rows, (11, 12), strict=True):
        alone = Batch(
            video=torch.from_numpy(video)[None], video_mask=torch.ones(1, len(video)),
            text=torch.from_numpy(text)[None], text_mask=torch.ones(1, len(text)),
            span_targets=torch.zeros(1, 1, 2), span_mask=torch.zeros(1, 1, dtype=torch.bool),
            saliency_labels=torch.zeros(1, len(video)),
            saliency_pos_idx=torch.zeros(1, 2, dtype=torch.long),
            saliency_neg_idx=torch.zeros(1, 2, dtype=torch.long),
            qids=[qid], clip_len=cfg.data.clip_len,
        )
        (expected,) = predict_rows(model, alone, dataset=cfg.data.dataset)
        assert row["qid"] == qid
        assert len(row["pred_relevant_windows"]) == cfg.model.num_queries
        assert len(row["pred_saliency_scores"]) == len(video)
        np.testing.assert_allclose(
            row["pred_saliency_scores"], expected["pred_saliency_scores"], atol=2e-3
        )
        np.testing.assert_allclose(
            np.asarray(row["pred_relevant_windows"]),
            np.asarray(expected["pred_relevant_windows"]), atol=2e-3,
        )

    with pytest.raises(ValueError, match="sample 0: video_features"):
        served.predict({"video_features": [np.zeros((3, dv + 1))], "text_features": texts[:1]})


# ---- the registered model: models from code, a LoggedModel of its run -----------------------
def _register_tiny(tmp_path, tag: str) -> tuple[str, str, ExperimentConfig]:
    """(registered name, run id, config) of a tiny random model registered as champion."""
    torch.manual_seed(0)
    cfg = ExperimentConfig.from_preset("tiny")
    ckpt = tmp_path / "checkpoint.pt"
    torch.save({"model": build_model(cfg.model).state_dict(), "config": cfg.to_dict()}, ckpt)
    run_id = tracking.start_or_resume_run(_name("exp"), tag)
    name = _name(f"vl-{tag}")
    serving.log_and_register_model(run_id, ckpt, name, "MR-full-mAP", 1.0)
    return name, run_id, cfg


class _Planted:
    """Unpickling this creates the file at `marker`: a stand-in for code in a pickle."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_registered_model_is_code_not_a_pickle(mlflow_env, tmp_path, monkeypatch):
    """The model directory holds the code file MLflow runs, no pickled python_model; a pickle
    planted where the cloudpickle format keeps one is never read, and with
    MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false an MLmodel rewritten to name it is refused. The
    model is a READY LoggedModel named in its run's outputs, and its signature declares
    `batch_size` (MLflow drops an undeclared param)."""
    name, run_id, cfg = _register_tiny(tmp_path, "code")
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@champion",
                                                     dst_path=str(tmp_path / "dl")))
    files = {str(p.relative_to(local)) for p in local.rglob("*") if p.is_file()}
    assert "python_model.pkl" not in files and "served_model.py" in files
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    flavor = mlmodel["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert flavor["model_code_path"].endswith("served_model.py")
    assert "python_model" not in flavor

    marker = tmp_path / "pickle-ran"
    (local / "python_model.pkl").write_bytes(pickle.dumps(_Planted(str(marker))))
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    model = mlflow.pyfunc.load_model(str(local))
    assert model.unwrap_python_model().cfg.model.hidden_dim == cfg.model.hidden_dim
    batches = []
    monkeypatch.setattr(serving, "make_batch", lambda *a, **k: batches.append(1) or
                        make_batch(*a, **k))  # fmt: skip
    two = {k: v * 2 for k, v in serving.input_example(cfg).items()}
    rows = model.predict(two, params={"batch_size": 1})
    assert len(batches) == 2  # batch_size reached predict
    assert rows[0]["qid"] == 0 and type(rows[0]["qid"]) is int  # JSON-ready, not a numpy int
    assert not marker.exists()

    # The same folder with its MLmodel pointed at the pickle (the cloudpickle format): refused.
    flavor.pop("model_code_path")
    flavor.update(loader_module="mlflow.pyfunc.model", python_model="python_model.pkl")
    (local / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    with pytest.raises(MlflowException, match="pickle is disallowed"):
        mlflow.pyfunc.load_model(str(local))
    assert not marker.exists()

    client = MlflowClient()
    version = client.get_model_version_by_alias(name, tracking.CHAMPION_ALIAS)
    assert version.source.startswith("models:/m-")  # the LoggedModel, not a run's folder
    logged = client.get_logged_model(version.source.removeprefix("models:/"))
    assert logged.source_run_id == run_id and str(logged.status) == "READY"
    outputs = client.get_run(run_id).outputs.model_outputs
    assert [o.model_id for o in outputs] == [logged.model_id]
    by_run = mlflow.pyfunc.load_model(f"runs:/{run_id}/{serving.MODEL_NAME}")  # jobs.predict's form
    assert by_run.metadata.model_id == logged.model_id
    params = model.metadata.get_params_schema()
    assert [p.name for p in params.params] == ["batch_size"]
    assert model.metadata.metadata[serving.FEATURES_METADATA]["video"]
    assert client.get_run(run_id).info.status == "RUNNING"


def test_mlflow_models_serve_answers_invocations(mlflow_env, tmp_path):
    """`mlflow models serve -m models:/NAME@champion` (a real process on loopback) answers
    /invocations with the official rows the in-process model gives."""
    name, _, cfg = _register_tiny(tmp_path, "mserve")
    port = free_port()
    # the CLI execs `uvicorn`, found on PATH as in an activated venv
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    with open(tmp_path / "serve.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{name}@champion",
             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
            env=quiet_env({"PATH": path}), stdout=subprocess.DEVNULL, stderr=log,
            start_new_session=True,
        )  # fmt: skip
    try:
        def up() -> bool:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as ping:
                    return ping.status == 200
            except OSError:
                return False

        wait_for(up, 120, "mlflow models serve")
        rng = np.random.default_rng(1)
        video = rng.standard_normal((5, cfg.model.video_input_dim)).astype(np.float32)
        text = rng.standard_normal((3, cfg.model.text_dim)).astype(np.float32)
        body = {"dataframe_records": [{"video_features": video.tolist(),
                                       "text_features": text.tolist(), "qid": 7}]}
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            (row,) = json.loads(response.read())["predictions"]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    (expected,) = mlflow.pyfunc.load_model(f"models:/{name}@champion").predict(
        {"video_features": [video], "text_features": [text], "qid": [7]})
    assert row["qid"] == 7
    assert len(row["pred_saliency_scores"]) == len(video)
    assert len(row["pred_relevant_windows"]) == cfg.model.num_queries
    np.testing.assert_allclose(row["pred_saliency_scores"], expected["pred_saliency_scores"],
                               atol=1e-5)
    np.testing.assert_allclose(row["pred_relevant_windows"], expected["pred_relevant_windows"],
                               atol=1e-5)
