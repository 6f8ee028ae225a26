"""jobs.serve: the real CLI serving a registered model with Ray Serve on the session's Ray head,
every route called over loopback with valid and invalid bodies, the page driven in headless
Chromium, the alias moved under load, and a model that cannot load.

One server (module fixture) answers every test but the broken-model one; it follows its alias,
so tests compare against the version each response names rather than assuming one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cluster.local.common import free_port, wait_for
from vl.config import ExperimentConfig
from vl.data.synthetic import SyntheticConfig, generate

REPO = Path(__file__).resolve().parents[1]
DIMS = {"slowfast": 8, "clip": 8}
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--window-size=1280,800"]

pytestmark = pytest.mark.integration


# ---- fixtures -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stack_env(local_stack_env, ray_head) -> Iterator[dict[str, str]]:
    """The client environment with RAY_ADDRESS = the GCS address (a Serve driver's), also put
    into os.environ for the in-process MLflow calls of this module."""
    env = {**local_stack_env, "RAY_ADDRESS": ray_head.gcs_address}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        yield env


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A local shard set: 6 synthetic QVHighlights videos (150 s, 75 clips), 12 queries."""
    from jobs.shard import run as shard_run

    layout = generate(SyntheticConfig("qvhighlights", videos=6, seed=3, dims=DIMS,
                                      video_sets=("slowfast", "clip"), text_sets=("clip",),
                                      val_fraction=0.0), tmp_path_factory.mktemp("raw"))
    out = str(tmp_path_factory.mktemp("shards") / "val")
    shard_run(dataset="qvhighlights", annotations=str(layout.train_jsonl),
              video_features=layout.video_arg(), text_features=layout.text_arg(), out=out,
              rows_per_shard=6, ray_mode="off", log=lambda *_: None)
    return out


def _vids(shards: str) -> list[str]:
    from vl.data.dataset import read_annotations

    return sorted({row["vid"] for row in read_annotations(shards)})


@pytest.fixture(scope="module")
def videos_dir(shards: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A playable 150 s VP8 file (64x48, 1 fps) for the first video only."""
    import av

    folder = tmp_path_factory.mktemp("videos")
    with av.open(str(folder / f"{_vids(shards)[0]}.webm"), "w") as container:
        stream = container.add_stream("libvpx", rate=1)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for t in range(150):
            frame = np.full((48, 64, 3), (t * 7) % 255, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return folder


def _register(name: str, seed: int, tmp: Path, checkpoint: dict | None = None) -> str:
    """Register a randomly initialised smoke model (or `checkpoint`) and make it champion."""
    from vl import serving, tracking
    from vl.model import build_model

    cfg = ExperimentConfig.from_yaml(REPO / "configs/smoke.yaml",
                                     ["model.video_dim=16", "model.text_dim=8"])
    torch.manual_seed(seed)
    path = tmp / f"model-{seed}.pt"
    torch.save(checkpoint or {"model": build_model(cfg.model).state_dict(),
                              "config": cfg.to_dict(), "epoch": 0}, path)
    run_id = tracking.start_or_resume_run("test-serve", f"{name}-{seed}")
    version, _ = serving.log_and_register_model(run_id, path, name, "selection", 1.0 + seed)
    tracking.finish_run(run_id)
    return version


@pytest.fixture(scope="module")
def model_name(stack_env, tmp_path_factory: pytest.TempPathFactory) -> str:
    name = f"vl-serve-{uuid.uuid4().hex[:8]}"
    assert _register(name, 0, tmp_path_factory.mktemp("ckpt")) == "1"
    return name


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path


def _start_cli(env: dict[str, str], args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "jobs.serve", *args], cwd=REPO,
                                env={**os.environ, **env}, stdout=out, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)


@pytest.fixture(scope="module")
def server(stack_env, model_name, shards, videos_dir, tmp_path_factory) -> Iterator[Server]:
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    proc = _start_cli(stack_env, [
        "--model", f"models:/{model_name}@champion", "--port", str(port), "--data", shards,
        "--videos", str(videos_dir), "--follow-alias", "--poll-s", "0.5", "--num-cpus", "0.5",
        "--max-batch-size", "8", "--max-samples", "4", "--max-body-mb", "0.25"], log)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"jobs.serve exited {proc.returncode}: {proc.stderr.read()}\n"
                               + log.read_text())
        return "serving models:/" in log.read_text()

    try:
        wait_for(up, 180, "jobs.serve")
        yield Server(url, proc, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, proc.stderr.read()


# ---- HTTP helpers ---------------------------------------------------------------------------
def call(url: str, body: bytes | dict | None = None, method: str | None = None,
         headers: dict | None = None) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of one request; errors are answers too."""
    data = json.dumps(body).encode() if isinstance(body, dict | list) else body
    request = urllib.request.Request(url, data=data, method=method or ("POST" if data else "GET"),
                                     headers={"Content-Type": "application/json",
                                              **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            raw, status, head = response.read(), response.status, dict(response.headers)
    except urllib.error.HTTPError as err:
        raw, status, head = err.read(), err.code, dict(err.headers)
    try:
        return status, json.loads(raw), head
    except ValueError:  # not JSON (a video file)
        return status, {"raw": raw}, head


def features(n: int, clips: int = 20, seed: int = 0) -> dict:
    """A valid /v1/predict body: n samples of random features with the smoke model's widths
    (16 + 2 TEF video dims, 8 text dims)."""
    rng = np.random.default_rng(seed)
    return {"video_features": [rng.normal(size=(clips + i, 18)).round(4).tolist()
                               for i in range(n)],
            "text_features": [rng.normal(size=(5, 8)).round(4).tolist() for _ in range(n)],
            "qid": [f"q{i}" for i in range(n)]}


def pyfunc_rows(name: str, version: str, body: dict) -> list[dict]:
    """What the registered pyfunc itself answers for `body` (loaded in this process)."""
    from jobs.predict import load_model

    model = load_model(f"models:/{name}/{version}")
    columns = {k: [np.asarray(x, np.float32) for x in body[k]]
               for k in ("video_features", "text_features")}
    return model.predict(columns)


def assert_same_rows(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g["pred_relevant_windows"], w["pred_relevant_windows"],
                                   atol=1e-3)
        assert g["pred_saliency_scores"] == pytest.approx(w["pred_saliency_scores"], abs=2e-4)


# ---- routes ---------------------------------------------------------------------------------
def test_health_model_and_predict(server, model_name):
    status, health, _ = call(f"{server.url}/healthz")
    assert status == 200 and health["status"] == "ok" and health["model"] == model_name
    status, info, _ = call(f"{server.url}/v1/model")
    assert status == 200
    assert (info["name"], info["alias"], info["dataset"]) == (model_name, "champion",
                                                              "qvhighlights")
    assert info["feature_sets"] == {"video": ["slowfast", "clip"], "text": ["clip"]}
    assert info["input_dims"] == {"video_features": 18, "text_features": 8}
    assert info["selection_metric"]["name"] == "selection"
    assert info["follow_alias"] is True and info["max_clips"] == 75

    body = features(3)
    status, answer, _ = call(f"{server.url}/v1/predict", body)
    assert status == 200, answer
    assert answer["model"]["name"] == model_name
    rows = answer["predictions"]
    assert [r["qid"] for r in rows] == ["q0", "q1", "q2"]
    for row, clips in zip(rows, (20, 21, 22), strict=True):
        assert len(row["pred_saliency_scores"]) == clips
        assert len(row["pred_relevant_windows"]) == 10  # smoke model: 10 queries
        for st, ed, score in row["pred_relevant_windows"]:
            assert 0 <= st <= ed <= clips * 2.0 and 0 <= score <= 1
    assert_same_rows(rows, pyfunc_rows(model_name, answer["model"]["version"], body))


def _mutated(change) -> dict:
    body = features(2)
    change(body)
    return body


BAD_FEATURES = {
    "missing key": (_mutated(lambda b: b.pop("text_features")), 422, "text_features"),
    "wrong width": (_mutated(lambda b: b["video_features"].__setitem__(1, [[0.0] * 17] * 4)),
                    422, "video_features[1]"),
    "ragged": (_mutated(lambda b: b["video_features"][0].append([0.0])), 422,
               "video_features[0]"),
    "too many clips": (_mutated(lambda b: b["video_features"].__setitem__(
        0, [[0.0] * 18] * 76)), 422, "video_features[0]"),
    "too many samples": (features(5, clips=4), 422, "video_features"),
    "count mismatch": (_mutated(lambda b: b["text_features"].pop()), 422, "text_features"),
    "not a number": (_mutated(lambda b: b["text_features"][0][0].__setitem__(0, "x")), 422,
                     "text_features[0]"),
    "bad duration": (_mutated(lambda b: b.__setitem__("duration", [10, -1])), 422,
                     "duration[1]"),
    "not an object": ([1, 2], 422, None),
}


@pytest.mark.parametrize("case", sorted(BAD_FEATURES))
def test_bad_predict_bodies_get_a_4xx_naming_the_field(server, case):
    body, want_status, want_field = BAD_FEATURES[case]
    status, answer, head = call(f"{server.url}/v1/predict", body)
    assert status == want_status, answer
    assert head["content-type"] == "application/json"
    assert answer["error"]["field"] == want_field and answer["error"]["status"] == status
    assert "Traceback" not in answer["error"]["message"]


def test_malformed_oversized_and_unknown_requests(server, shards):
    url = server.url
    checks = [
        (call(f"{url}/v1/predict", b"{not json"), 400, None),
        (call(f"{url}/v1/predict", b"[" + b"0," * 200_000 + b"0]"), 413, None),  # > 0.25 MB
        (call(f"{url}/v1/predict", json.dumps({"video_features": [[[float("nan")] * 18]],
                                               "text_features": [[[0.0] * 8]]}).encode()),
         422, "video_features[0]"),
        (call(f"{url}/v1/videos/no-such-video/predict", {"query": "x"}), 404, "vid"),
        (call(f"{url}/v1/videos/{_vids(shards)[0]}/predict", {"query": "never asked"}), 422,
         "query"),
        (call(f"{url}/v1/videos/{_vids(shards)[0]}/predict", {"top": 3}), 422, "query"),
        (call(f"{url}/v1/videos/{_vids(shards)[1]}/file"), 404, "vid"),  # no file for it
        (call(f"{url}/v1/nothing"), 404, None),
        (call(f"{url}/v1/predict"), 405, None),  # GET on a POST route
    ]
    for (status, answer, _), want_status, want_field in checks:
        assert (status, answer["error"]["field"]) == (want_status, want_field), answer
        assert answer["error"]["message"] and "Traceback" not in json.dumps(answer)


def test_videos_and_by_video_predict_match_the_shard_rows(server, model_name, shards):
    from jobs.predict import predict as predict_shards

    status, listing, _ = call(f"{server.url}/v1/videos")
    assert status == 200
    videos = {v["vid"]: v for v in listing["videos"]}
    assert sorted(videos) == _vids(shards)
    first = videos[_vids(shards)[0]]
    assert first["video_url"] and first["clips"] == 75 and first["queries"]
    assert all(v["video_url"] is None for v in list(videos.values())[1:])

    vid = _vids(shards)[2]
    query = videos[vid]["queries"][0]
    status, answer, _ = call(f"{server.url}/v1/videos/{vid}/predict",
                             {"query": f"  {query.upper()} "})
    assert status == 200, answer
    assert (answer["vid"], answer["query"], answer["clip_len_s"]) == (vid, query, 2.0)
    version = answer["model"]["version"]
    want = [r for r in predict_shards(f"models:/{model_name}/{version}", shards)
            if r["vid"] == vid and r["query"] == query]
    assert_same_rows([answer], want)

    status, _, head = call(f"{server.url}{first['video_url']}", headers={"Range": "bytes=0-99"})
    assert status == 206 and head["content-type"] == "video/webm"


# ---- the page, in a real browser ------------------------------------------------------------
def _chromium():
    """A Selenium-driven headless Debian Chromium, or a skip naming what is missing."""
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("Debian's chromium + chromium-driver are not installed (make test installs "
                    "them with apt-get; this machine could not)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    # An explicit driver path keeps Selenium Manager (which would download one) out of it.
    return webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))


def test_page_shows_the_answer_in_chromium(server, shards, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    vid = _vids(shards)[0]  # the one with a video file
    _, listing, _ = call(f"{server.url}/v1/videos")
    query = next(v for v in listing["videos"] if v["vid"] == vid)["queries"][-1]
    _, want, _ = call(f"{server.url}/v1/videos/{vid}/predict", {"query": query})
    k = 3

    browser = _chromium()
    try:
        browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False})
        browser.get(f"{server.url}/")
        wait = WebDriverWait(browser, 30)
        wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
        assert "version" in browser.find_element(By.ID, "model-info").text
        Select(browser.find_element(By.ID, "video")).select_by_value(vid)
        box = browser.find_element(By.ID, "query")
        box.clear()
        box.send_keys(query)
        top_k = browser.find_element(By.ID, "top-k")
        top_k.clear()
        top_k.send_keys(str(k))
        browser.find_element(By.ID, "run").click()
        wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-answered"))

        bars = browser.find_elements(By.CSS_SELECTOR, "#chart rect.moment-bar")
        assert len(bars) == k
        assert browser.find_elements(By.CSS_SELECTOR, "#chart polyline.curve")
        labels = {t.text for t in browser.find_elements(By.CSS_SELECTOR, "#chart text")}
        assert {"time (s)", "saliency score"} <= labels
        rows = browser.find_elements(By.CSS_SELECTOR, "#moments tbody tr")
        shown = [[float(r.get_attribute(f"data-{a}")) for a in ("start", "end", "score")]
                 for r in rows]
        assert shown == want["pred_relevant_windows"][:k]
        cells = rows[0].find_elements(By.TAG_NAME, "td")
        st, ed, score = want["pred_relevant_windows"][0]
        assert [c.text for c in cells[:5]] == ["1", f"{st:.1f}", f"{ed:.1f}", f"{ed - st:.1f}",
                                               f"{score:.3f}"]
        assert "answered by" in browser.find_element(By.ID, "status").text

        # clicking the second moment seeks the player to its start
        wait.until(lambda b: b.execute_script("return document.getElementById('player')"
                                              ".readyState >= 1"))
        rows[1].click()
        seek_to = want["pred_relevant_windows"][1][0]
        wait.until(lambda b: abs(b.execute_script(
            "return document.getElementById('player').currentTime") - seek_to) < 1.5)
        shot = tmp_path / "page.png"
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        print(f"screenshot: {shot}")
    finally:
        browser.quit()


# ---- the alias moves under load; a model that cannot load -----------------------------------
def test_follow_alias_swaps_versions_without_dropping_requests(server, model_name, tmp_path):
    body = features(1, seed=7)
    answers: list[tuple[int, str]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            status, answer, _ = call(f"{server.url}/v1/predict", body)
            answers.append((status, answer.get("model", {}).get("version", "")))

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(answers) > 10, 30, "first answers")
        before = answers[-1][1]
        new_version = _register(model_name, int(before) + 10, tmp_path)
        wait_for(lambda: answers[-1][1] == new_version, 60, f"version {new_version} answers")
        time.sleep(0.5)  # a few more answers from the new version
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert all(status == 200 for status, _ in answers), {s for s, _ in answers}
    versions = [v for _, v in answers]
    assert versions[0] == before and versions[-1] == new_version
    switched = versions.index(new_version)
    assert set(versions[switched:]) == {new_version}  # no flapping back
    _, answer, _ = call(f"{server.url}/v1/predict", body)
    assert_same_rows(answer["predictions"], pyfunc_rows(model_name, new_version, body))
    _, info, _ = call(f"{server.url}/v1/model")
    assert info["version"] == new_version


def test_a_model_that_cannot_load_stops_with_one_line(server, stack_env, tmp_path):
    name = f"vl-broken-{uuid.uuid4().hex[:8]}"
    cfg = ExperimentConfig.from_yaml(REPO / "configs/smoke.yaml",
                                     ["model.video_dim=16", "model.text_dim=8"])
    _register(name, 0, tmp_path, {"model": {"not.a.weight": torch.zeros(1)},
                                  "config": cfg.to_dict(), "epoch": 0})
    proc = _start_cli(stack_env, ["--model", f"models:/{name}@champion", "--port",
                                  str(free_port()), "--name", "broken", "--route-prefix",
                                  "/broken", "--num-cpus", "0.25"], tmp_path / "broken.log")
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 1, err
    # Ray's own warnings may precede it (e.g. that Serve already listens on another port)
    (line,) = [x for x in err.splitlines() if x.startswith("jobs.serve:")]
    assert line.startswith(f"jobs.serve: videolights-serve cannot start: models:/{name}@champion")
    assert "loading state_dict" in line and "Missing key(s)" in line
    status, _, _ = call(f"{server.url}/broken/healthz")
    assert status == 404  # the failed application is gone; the other one still answers
    assert call(f"{server.url}/healthz")[0] == 200


def test_preflight_errors_are_one_line(stack_env, capsys):
    from jobs.serve.__main__ import main

    for argv, expected in (
        (["--model", "models:/nothing-here@champion"], "names no model version"),
        (["--model", "runs:/abc/model"], "expected models:/NAME@ALIAS"),
        (["--model", "models:/x@champion", "--max-batch-size", "0"], "max_batch_size=0"),
        (["--model", "models:/x@champion", "--data", "/nonexistent/shards"],
         "no shard manifest"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err, err


# ---- configs for `serve deploy` and KubeRay -------------------------------------------------
def test_serve_config_and_rayservice_build_the_same_application():
    from ray.serve.schema import ServeDeploySchema

    from jobs.serve.app import ServeOptions, build

    config = yaml.safe_load((REPO / "cluster/serve.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert app["import_path"] == "jobs.serve.app:build" and app["route_prefix"] == "/"
    assert ServeOptions.from_dict(app["args"]).follow_alias
    assert build(app["args"]) is not None

    service = yaml.safe_load((REPO / "cluster/kuberay/rayservice.yaml").read_text())
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(embedded)
    (kube_app,) = embedded["applications"]
    assert kube_app["import_path"] == app["import_path"]
    assert set(kube_app["args"]) <= {f for f in ServeOptions.__dataclass_fields__}
    ServeOptions.from_dict(kube_app["args"])
    cluster = service["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.60.0" and cluster["authOptions"]["mode"] == "token"
