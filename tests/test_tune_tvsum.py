"""tune.tvsum: the search space, the paper-table layouts, and a smoke search against the real
S3 + MLflow servers with an in-process Ray: parent/child runs, ASHA stopping, summary artifacts,
registered models that load and predict, and resumption after an interruption (Ctrl-C)."""

from __future__ import annotations

import csv
import io
import math
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mlflow
import mlflow.pyfunc
import pytest
from mlflow.tracking import MlflowClient

from cluster.local.common import NO_TELEMETRY_ENV
from jobs.preflight import GCS_ADDRESS_ENV, PreflightError, init_ray
from jobs.shard import run as shard
from tests.train_runs import job_client
from tune import report, space
from tune.report import TrialOutcome
from tune.trial import load_domain
from tune.tvsum import build_config, main, parse_domains
from vl.config import ConfigError
from vl.data.synthetic import TINY_DIMS, SyntheticConfig, generate

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "tvsum_search_smoke.yaml"
PAPER = REPO / "configs" / "tvsum_search.yaml"


# ---- pure parts -----------------------------------------------------------------------------
def test_grid_is_exactly_the_paper_grid():
    cells = space.grid_cells()
    expected = {(h, s, a) for h in (1, 5, 10) for s in (1, 5, 10) for a in (0.1, 0.8)}
    assert len(cells) == 18
    assert {(c["loss.hl_coef"], c["loss.scsl_coef"], c["loss.al_coef"]) for c in cells} == expected
    ps = space.param_space("grid", seed=7)
    assert ps["train.seed"] == 7
    assert ps["loss.hl_coef"] == {"grid_search": [1.0, 5.0, 10.0]}
    assert ps["loss.al_coef"] == {"grid_search": [0.1, 0.8]}
    sampled = space.param_space("optuna", seed=7)
    assert (sampled["loss.hl_coef"].lower, sampled["loss.hl_coef"].upper) == (1.0, 10.0)
    assert (sampled["loss.al_coef"].lower, sampled["loss.al_coef"].upper) == (0.1, 0.8)
    with pytest.raises(ValueError, match="--search"):
        space.param_space("random", seed=0)


def test_asha_rungs_follow_epochs_and_eval_cadence():
    asha = space.make_scheduler("asha", 2000, 5, space.SchedulerSettings(0.1, 3.0))
    assert asha._max_t == 2000 and asha._time_attr == "epoch"
    assert asha._brackets[0]._rungs[-1][0] == 200  # first rung: 10 % of the epochs
    tiny = space.make_scheduler("asha", 12, 4, space.SchedulerSettings(0.1, 3.0))
    assert tiny._brackets[0]._rungs[-1][0] == 4  # never before the first evaluation
    assert space.make_scheduler("none", 12, 2, space.SchedulerSettings()) is None


def test_domains_parse_in_paper_order():
    assert parse_domains("all") == ["VT", "VU", "GA", "MS", "PK", "PR", "FM", "BK", "BT", "DS"]
    assert parse_domains("vu, VT") == ["VT", "VU"]
    with pytest.raises(ConfigError, match="XX"):
        parse_domains("VT,XX")


def test_configs_carry_the_paper_settings_and_feature_dims():
    cfg = build_config(PAPER, "i3d", [], None)
    assert (cfg.data.batch_size, cfg.train.lr, cfg.train.epochs) == (4, 1e-3, 2000)
    assert cfg.loss.tcl_coef == 0 and cfg.train.lr_drop >= cfg.train.epochs
    assert cfg.data.video_features == ["i3d"] and cfg.data.text_features == ["clip"]
    assert (cfg.model.video_dim, cfg.model.text_dim) == (2048, 512)
    full = build_config(PAPER, "sf_clip_blip", ["train.eval_every=10"], 300)
    assert (full.model.video_dim, full.model.text_dim) == (2304 + 512 + 768, 512 + 768)
    assert (full.train.epochs, full.train.eval_every) == (300, 10)
    smoke = build_config(SMOKE, "i3d", [], None)
    assert smoke.train.epochs < 50 and smoke.model.hidden_dim < 64


def _outcome(domain, hl, scsl, al, value, trial="t"):
    return TrialOutcome(domain, trial, hl, scsl, al, value, 10, "finished")


def test_tables_use_the_paper_layouts():
    outcomes = [
        _outcome("VU", 1, 5, 0.8, 80.0), _outcome("VT", 10, 1, 0.1, 90.0),
        _outcome("VT", 1, 1, 0.1, 95.5), _outcome("VU", 5, 10, 0.1, 70.0),
        _outcome("GA", 2.5, 3.25, 0.4, math.nan),  # never evaluated: not a candidate
    ]  # fmt: skip
    best = report.best_per_domain(outcomes)
    assert sorted(best) == ["VT", "VU"]
    md, csv_text = report.table7(best, "i3d")
    assert md.splitlines()[0] == "| features | coef | VT | VU |"
    assert md.splitlines()[2:] == ["| i3d | hl | 1 | 1 |", "| i3d | scsl | 1 | 5 |",
                                   "| i3d | al | 0.10 | 0.80 |"]  # fmt: skip
    assert csv_text.splitlines()[1] == "i3d,hl,1,1"
    md2, csv2 = report.table2(best, "ours")
    # (95.5 + 80.0) / 2 = 87.75 -> "87.8"
    assert md2.splitlines()[2] == "| ours | 95.5 | 80.0 | 87.8 |"
    assert csv2.splitlines() == ["method,VT,VU,Avg.", "ours,95.5,80.0,87.8"]


def test_heatmap_bins_samples_to_the_nearest_grid_cell():
    outcomes = [
        _outcome("VT", 1.0, 1.0, 0.1, 50.0), _outcome("VT", 1.2, 0.9, 0.8, 60.0),
        _outcome("VT", 4.0, 9.0, 0.3, 70.0), _outcome("VT", 10.0, 5.0, 0.8, math.nan),
    ]  # fmt: skip
    hls, scsls, values, counts = report.heatmap_cells(outcomes)
    assert hls == [1.0, 5.0, 10.0] and scsls == [1.0, 5.0, 10.0]
    assert values[0][0] == 60.0 and counts[0][0] == 2  # max over the two samples near (1, 1)
    assert values[1][2] == 70.0  # log-nearest: 4 -> 5, 9 -> 10
    assert math.isnan(values[2][1]) and counts[2][1] == 0
    fig = report.heatmap("VT", outcomes)
    assert fig.axes[0].get_xlabel() == "scsl"


# ---- the smoke search against the local stack -------------------------------------------------
EPOCHS = 12
DOMAINS = ("VT", "VU")


def _run_search(env: dict[str, str], args: list[str], log: Path) -> int:
    """`python -m tune.tvsum ARGS` as a user runs it: its own process and its own local Ray.

    A subprocess, not main() in the test process: Ray keeps per-process state across
    ray.init/ray.shutdown (auth mode, Data and Tune globals), and earlier tests in the session
    start Ray in-process; a trial's actor then dies before it starts. Output goes to `log`.
    """
    with log.open("a") as out:
        return subprocess.run([sys.executable, "-m", "tune.tvsum", *args], cwd=REPO, env=env,
                              stdout=out, stderr=subprocess.STDOUT, timeout=900).returncode


@pytest.fixture(scope="module")
def search(s3_server, mlflow_server, tmp_path_factory):
    """Runs the smoke search twice: interrupted (Ctrl-C after 2 trials), then resumed.

    Returns what both phases saw. Everything lives under a fresh name, so reruns of the test
    module never resume an older search.
    """

    tag = uuid.uuid4().hex[:8]
    raw = tmp_path_factory.mktemp("tune-raw")
    log = tmp_path_factory.mktemp("tune-log") / "search.log"
    env = {**os.environ, **NO_TELEMETRY_ENV, **s3_server.env(), **mlflow_server.env(),
           "RAY_AUTH_MODE": "disabled"}
    for key in ("RAY_ADDRESS", "VL_TUNE_FAULT", "PYTEST_CURRENT_TEST"):
        env.pop(key, None)
    layout = generate(SyntheticConfig(
        "tvsum", videos=5, seed=1, dims=dict(TINY_DIMS), video_sets=("i3d",),
        text_sets=("clip",), tvsum_domain_concepts=True), raw)  # fmt: skip
    data = f"s3://vl-data/test_tune_tvsum/{tag}"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {**s3_server.env(), **mlflow_server.env()}.items():
            mp.setenv(key, value)
        mlflow.set_tracking_uri(mlflow_server.env()["MLFLOW_TRACKING_URI"])
        for split, jsonl in (("train", layout.train_jsonl), ("val", layout.val_jsonl)):
            shard(dataset="tvsum", annotations=str(jsonl), video_features=layout.video_arg(),
                  text_features=layout.text_arg(), out=f"{data}/{split}", ray_mode="off",
                  log=lambda *_: None)  # fmt: skip
        experiment = f"test-tune-tvsum-{tag}"
        args = [
            "--config", str(SMOKE), "--data", data, "--domains", ",".join(DOMAINS),
            "--features", "i3d", "--search", "optuna", "--scheduler", "asha",
            "--num-samples", "4", "--epochs", str(EPOCHS), "--cpus-per-trial", "1",
            "--max-concurrent", "1", "--storage", f"s3://vl-runs/test_tune_tvsum/{tag}",
            "--name", "smoke", "--experiment", experiment,
            "--registered-prefix", f"test-tvsum-{tag}",
        ]  # fmt: skip
        first_rc = _run_search(env, [*args, "--interrupt-after-trials", "2"], log)
        client = MlflowClient(mlflow_server.env()["MLFLOW_TRACKING_URI"])
        exp = client.get_experiment_by_name(experiment)
        assert exp is not None, log.read_text()[-5000:]
        exp_id = exp.experiment_id
        before = {r.info.run_id: r for r in client.search_runs([exp_id], max_results=500)}
        history_before = {
            rid: len(client.get_metric_history(rid, "top5_map")) for rid in before
        }
        second_rc = _run_search(env, args, log)
        runs = client.search_runs([exp_id], max_results=500)
        yield {
            "first_rc": first_rc, "second_rc": second_rc, "before": before,
            "history_before": history_before, "runs": runs, "client": client,
            "tag": tag, "data": data, "exp_id": exp_id, "log": log,
        }  # fmt: skip


def _parents(runs):
    return {r.data.tags["vl.domain"]: r for r in runs
            if r.data.tags.get("vl.kind") == "tvsum-domain-search"}  # fmt: skip


def _children(runs, parent_id):
    return [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]


@pytest.mark.integration
def test_parent_and_child_runs_hold_the_trials(search):
    assert (search["first_rc"], search["second_rc"]) == (130, 0), \
        search["log"].read_text()[-5000:]
    runs = search["runs"]
    parents = _parents(runs)
    assert sorted(parents) == sorted(DOMAINS)
    client = search["client"]
    for domain, parent in parents.items():
        assert parent.info.status == "FINISHED"
        children = _children(runs, parent.info.run_id)
        assert len(children) == 4, f"{domain}: {len(children)} child runs"
        for child in children:
            assert child.info.status == "FINISHED", child.info.run_name
            p = child.data.params
            assert 1.0 <= float(p["loss.hl_coef"]) <= 10.0
            assert 1.0 <= float(p["loss.scsl_coef"]) <= 10.0
            assert 0.1 <= float(p["loss.al_coef"]) <= 0.8 and p["train.seed"] == "2018"
            curve = client.get_metric_history(child.info.run_id, "top5_map")
            assert curve and all(0.0 <= m.value <= 100.0 for m in curve)
            assert [m.step for m in curve] == sorted(m.step for m in curve)
        # The parent's best is the best child's best-so-far top-5 mAP.
        best_child = max(c.data.metrics["best_top5_map"] for c in children)
        assert parent.data.metrics["best_top5_map"] == pytest.approx(best_child)


@pytest.mark.integration
def test_asha_stopped_a_trial_early_and_its_run_is_ended(search):
    client = search["client"]
    stopped = [r for r in search["runs"] if r.data.tags.get("vl.stopped_early") == "true"]
    assert stopped, "ASHA stopped no trial"
    for run in stopped:
        assert run.info.status == "FINISHED"
        last_epoch = max(m.step for m in client.get_metric_history(run.info.run_id, "top5_map"))
        assert last_epoch < EPOCHS
    full = [r for r in search["runs"] if r.data.tags.get("vl.stopped_early") == "false"]
    assert full and all(
        max(m.step for m in client.get_metric_history(r.info.run_id, "top5_map")) == EPOCHS
        for r in full
    )


@pytest.mark.integration
def test_summary_run_has_tables_and_heatmaps(search):
    client = search["client"]
    summary = [r for r in search["runs"] if r.data.tags.get("vl.kind") == "tvsum-search-summary"]
    assert len(summary) == 1
    run_id = summary[0].info.run_id
    names = {f.path for f in client.list_artifacts(run_id, "tables")}
    assert names == {f"tables/{n}" for n in ("table7_coefficients.md", "table7_coefficients.csv",
                                              "table2_top5_map.md", "table2_top5_map.csv")}
    plots = {f.path for f in client.list_artifacts(run_id, "plots")}
    assert plots == {f"plots/heatmap_{d}.png" for d in DOMAINS}
    csv_text = Path(mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="tables/table2_top5_map.csv")).read_text()  # fmt: skip
    header, row = csv.reader(io.StringIO(csv_text))
    assert header[1:] == [*DOMAINS, "Avg."]
    # Independent derivation: the best child per domain, straight from the child runs.
    parents = _parents(search["runs"])
    best = [max(c.data.metrics["best_top5_map"]
                for c in _children(search["runs"], parents[d].info.run_id)) for d in DOMAINS]
    values = [float(v) for v in row[1:]]
    assert values[:-1] == pytest.approx([round(b, 1) for b in best], abs=0.051)
    assert values[-1] == pytest.approx(sum(best) / len(best), abs=0.051)
    t7 = Path(mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="tables/table7_coefficients.csv")).read_text()  # fmt: skip
    assert [line.split(",")[1] for line in t7.splitlines()[1:]] == ["hl", "scsl", "al"]


@pytest.mark.integration
def test_registered_domain_models_load_and_predict(search):
    for domain in DOMAINS:
        name = f"test-tvsum-{search['tag']}-{domain}"
        version = search["client"].get_model_version_by_alias(name, "champion")
        parent = _parents(search["runs"])[domain]
        assert version.run_id == parent.data.tags["vl.registered_from_run"]
        model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
        data = load_domain(f"{search['data']}/train", f"{search['data']}/val", domain,
                           video_features=["i3d"], text_features=["clip"], max_v_l=1000,
                           max_q_l=32, batch_size=4)  # fmt: skip
        n_v = int(data.val.video_mask[0].sum())
        n_t = int(data.val.text_mask[0].sum())
        rows = model.predict({
            "video_features": [data.val.video[0, :n_v].numpy()],
            "text_features": [data.val.text[0, :n_t].numpy()], "qid": [data.val.qids[0]],
        })  # fmt: skip
        assert len(rows) == 1 and rows[0]["qid"] == data.val.qids[0]
        scores = rows[0]["pred_saliency_scores"]
        assert len(scores) == n_v and all(math.isfinite(s) for s in scores)


@pytest.mark.integration
def test_resume_did_not_rerun_finished_trials(search):
    client = search["client"]
    finished_before = {
        rid: run for rid, run in search["before"].items()
        if run.data.tags.get("mlflow.parentRunId") and run.info.status == "FINISHED"
    }  # fmt: skip
    assert len(finished_before) == 2  # interrupted after the second completed trial
    after = {r.info.run_id: r for r in search["runs"]}
    for rid, run in finished_before.items():
        assert after[rid].info.end_time == run.info.end_time  # not touched again
        assert len(client.get_metric_history(rid, "top5_map")) == search["history_before"][rid]
    # 4 trials per domain in total: the resumed search added the rest, not duplicates.
    parents = _parents(search["runs"])
    trial_ids = [c.data.tags["vl.trial_id"] for d in DOMAINS
                 for c in _children(search["runs"], parents[d].info.run_id)]
    assert len(trial_ids) == len(set(trial_ids)) == 8


def test_unknown_features_and_missing_data_are_clear_errors(capsys):
    assert main(["--config", str(SMOKE), "--domains", "VT"]) == 2
    assert "--data" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--config", str(SMOKE), "--features", "c3d"])
    assert main(["--config", str(SMOKE), "--data", "/nowhere", "--workers-per-trial", "1"]) == 2
    assert "is now --cpus-per-trial" in capsys.readouterr().err


@pytest.mark.parametrize("argv,named", [
    (["--set", "train.lr=nan"], "train.lr"), (["--set", "train.lr_drop=0"], "train.lr_drop"),
    (["--set", "data.batch_size=-2"], "data.batch_size"),
    (["--cpus-per-trial", "0"], "--cpus-per-trial"), (["--num-samples", "-1"], "--num-samples"),
])
def test_impossible_values_exit_2_naming_the_key(capsys, argv, named):
    assert main(["--config", str(SMOKE), "--data", "/nowhere", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err



def test_a_cluster_too_small_for_one_trial_exits_2_at_once(tmp_path, ray_head):
    """A trial no node can hold (too many CPUs and a GPU on a CPU machine): one line naming
    both flags and what the nodes have, exit 2, before MLflow (a dead server here) or the Tune
    storage is touched. Run as the README's shell after `cluster.local.stack up` runs it:
    RAY_ADDRESS is the job API URL, and the search joins the stack's head through the GCS
    address exported beside it (its driver is listed there) rather than failing on the URL or
    starting a cluster of its own. In its own process: this one keeps Ray state from other
    tests. (Which of the two knobs a node lacks is `check_capacity`'s, tested with the train
    job.)"""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAY_") and k != "PYTEST_CURRENT_TEST"}
    env.update(ray_head.env(), MLFLOW_TRACKING_URI="http://127.0.0.1:9")
    assert env["RAY_ADDRESS"].startswith("http://")
    jobs = job_client(ray_head.env())
    drivers_before = {j.job_id for j in jobs.list_jobs()}
    storage = tmp_path / "tune"
    t0 = time.monotonic()
    with subprocess.Popen(
            [sys.executable, "-m", "tune.tvsum", "--config", str(SMOKE), "--data",
             str(tmp_path / "shards"), "--domains", "VT", "--storage", str(storage),
             "--cpus-per-trial", "999", "--gpus-per-trial", "1"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True) as proc:  # fmt: skip
        _, err = proc.communicate(timeout=180)
    err = err.strip()
    assert proc.returncode == 2 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert "the Ray cluster is too small for --cpus-per-trial=999 x --gpus-per-trial=1: " \
           "its 1 node(s) have" in errors[0] and "and 0 GPUs (0 of 1 fit)" in errors[0], err
    assert time.monotonic() - t0 < 120
    assert not storage.exists()
    joined = [j for j in jobs.list_jobs() if j.job_id not in drivers_before
              and j.driver_info is not None and j.driver_info.pid == str(proc.pid)]
    assert len(joined) == 1, [(j.job_id, j.driver_info) for j in jobs.list_jobs()]


def test_the_job_api_url_without_the_gcs_address_is_refused_before_ray_starts(monkeypatch):
    """RAY_ADDRESS holding the job API URL and no GCS address beside it: one PreflightError
    naming the variable to set (tune.tvsum and tune.seeds exit 2 with it), RAY_ADDRESS as it
    was."""
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:9")
    monkeypatch.delenv(GCS_ADDRESS_ENV, raising=False)
    with pytest.raises(PreflightError, match=GCS_ADDRESS_ENV):
        init_ray(None)
    assert os.environ["RAY_ADDRESS"] == "http://127.0.0.1:9"


def test_sampled_search_starts_at_the_box_corners_then_samples_inside():
    corners = space.corner_start()
    assert {(c["loss.scsl_coef"], c["loss.al_coef"]) for c in corners} == {
        (1.0, 0.1), (1.0, 0.8), (10.0, 0.1), (10.0, 0.8)}  # fmt: skip
    assert {c["loss.hl_coef"] for c in corners} == {5.0}
    searcher = space.make_searcher("optuna", 2018, corners)
    ps = space.param_space("optuna", seed=2018)
    assert searcher.set_search_properties("best_top5_map", "max", ps)
    suggested = [searcher.suggest(f"t{i}") for i in range(6)]
    keys = list(space.COEFFICIENTS.values())
    first = [{k: s[k] for k in keys} for s in suggested[:4]]
    assert first == corners
    for s in suggested[4:]:  # then TPE draws inside the box
        c = space.short_names(s)
        assert 1.0 <= c["hl"] <= 10.0 and 1.0 <= c["scsl"] <= 10.0 and 0.1 <= c["al"] <= 0.8
    random_start = space.make_searcher("optuna", 2018)
    assert random_start.set_search_properties("best_top5_map", "max", ps)
    assert {k: random_start.suggest("r0")[k] for k in keys} not in corners
