"""MLflow runs, params, metrics, dataset inputs, system metrics, figures as artifacts, and
the model registry.

Everything goes through an explicit `run_id` and `MlflowClient` rather than MLflow's fluent
"active run": the job resumes runs after failures and must never end (or start) a run as a side
effect of logging. Imports mlflow only: the served model (which runs the network) is
`vl.serving`, the plots are `vl.figures`.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_log = logging.getLogger(__name__)

RUN_NAME_TAG = "vl.run_name"
CHAMPION_ALIAS = "champion"
SELECTION_METRIC_TAG = "vl.selection_metric"
SELECTION_VALUE_TAG = "vl.selection_value"

# A config key that names a secret is never logged, whatever its value looks like.
_CREDENTIAL_KEY = re.compile(r"secret|password|passwd|token|access_key|key_id|credential")
_MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
_BATCH_LIMIT = 100  # params per log_batch call (MLflow's limit)
_METRIC_BATCH_LIMIT = 1000  # metrics per log_batch call (MLflow's limit)


class TrackingServerUnavailableError(RuntimeError):
    """The MLflow tracking server does not answer; raised before any expensive work starts."""


# ---- params ---------------------------------------------------------------------------------
def _is_credential(key: str) -> bool:
    return bool(_CREDENTIAL_KEY.search(key.lower().replace("-", "_")))


def flatten_params(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"model.hidden_dim": "256", ...} with credential-like keys dropped.

    A key is dropped (with its whole subtree) when any dotted component looks like a secret,
    so `storage.credentials.anything` never reaches the tracking server. Lists are logged as
    JSON; long values are truncated to MLflow's limit.
    """
    flat: dict[str, str] = {}
    for key, value in cfg.items():
        if _is_credential(str(key)):
            continue
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=f"{name}."))
            continue
        text = json.dumps(value) if isinstance(value, list | tuple) else str(value)
        flat[name] = text[:_MAX_PARAM_CHARS]
    return flat


def log_params(run_id: str, cfg: Mapping[str, Any]) -> None:
    """Log `flatten_params(cfg)`, skipping keys a resumed run already has with the same value.

    MLflow params are immutable: re-logging an equal value is harmless, a different one is an
    error, which is what we want (a resumed run must not silently change its config).
    """
    existing = MlflowClient().get_run(run_id).data.params
    todo = [
        Param(k, v) for k, v in flatten_params(cfg).items() if existing.get(k) != v
    ]
    client = MlflowClient()
    for start in range(0, len(todo), _BATCH_LIMIT):
        client.log_batch(run_id, params=todo[start : start + _BATCH_LIMIT])


# ---- server and runs ------------------------------------------------------------------------
def check_tracking_server(uri: str | None = None, timeout_s: float = 5.0) -> None:
    """Fail fast, with a message that says what to do, when the tracking server is down.

    Called by the job driver before any Ray worker starts, so a typo in MLFLOW_TRACKING_URI
    costs seconds rather than a worker group start-up and a crash at the first report.
    Non-HTTP URIs (a local sqlite file) need no server and pass.
    """
    uri = uri or mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as response:
            if response.status == 200:
                return _check_credentials(uri, timeout_s)
            problem = f"HTTP {response.status}"
    except urllib.error.HTTPError as err:
        problem = f"HTTP {err.code}"
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as err:
        problem = str(getattr(err, "reason", err))
    raise TrackingServerUnavailableError(
        f"MLflow tracking server at {uri} is unreachable: {problem}. Set MLFLOW_TRACKING_URI "
        "to a running server (`python -m cluster.local.stack up` starts one locally)."
    )


def _check_credentials(uri: str, timeout_s: float) -> None:
    """One authenticated read (`/health` needs none): a wrong or missing password fails here,
    naming the variables, instead of at the first metric a worker logs."""
    request = urllib.request.Request(
        f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search?max_results=1")
    user = os.environ.get("MLFLOW_TRACKING_USERNAME", "")
    if user:
        token = f"{user}:{os.environ.get('MLFLOW_TRACKING_PASSWORD', '')}".encode()
        request.add_header("Authorization", "Basic " + base64.b64encode(token).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout_s):
            return
    except urllib.error.HTTPError as err:
        code = err.code
    if code not in (401, 403):
        return  # the server answers; anything else surfaces with its own message later
    who = f"user {user!r}" if user else "no credentials (MLFLOW_TRACKING_USERNAME is not set)"
    raise TrackingServerUnavailableError(
        f"MLflow tracking server at {uri} refused {who}: HTTP {code}. Set "
        "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (`eval \"$(python -m "
        "cluster.local.stack up)\"` exports the local stack's)."
    )


def _experiment_id(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:  # another process created it between our two calls
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def start_or_resume_run(experiment: str, run_name: str) -> str:
    """The id of the run tagged `vl.run_name == run_name` in `experiment`, created if missing.

    Why a tag and not MLflow's run name: run names are not unique and MLflow may rewrite them;
    a job restarted after a failure (same `--name`) must continue the same run, not add a
    duplicate next to it. A resumed run is marked RUNNING again.
    """
    if "'" in run_name:
        raise ValueError(f"run name {run_name!r} must not contain a single quote")
    client = MlflowClient()
    experiment_id = _experiment_id(client, experiment)
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if found:
        run = found[0]
        if run.info.status != "RUNNING":
            client.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id
    run = client.create_run(experiment_id, run_name=run_name, tags={RUN_NAME_TAG: run_name})
    return run.info.run_id


def finish_run(run_id: str, status: str = "FINISHED") -> None:
    """End a run started by `start_or_resume_run` (FINISHED, FAILED or KILLED)."""
    MlflowClient().set_terminated(run_id, status=status)


def log_epoch(run_id: str, epoch: int, metrics: Mapping[str, float]) -> None:
    """Log one epoch's metrics in a single request, with step = epoch."""
    now = int(time.time() * 1000)
    entries = [Metric(key, float(value), now, int(epoch)) for key, value in metrics.items()]
    client = MlflowClient()
    for start in range(0, len(entries), _METRIC_BATCH_LIMIT):
        client.log_batch(run_id, metrics=entries[start : start + _METRIC_BATCH_LIMIT])


class RunMetrics:
    """A run's metrics as one process logs them: each (key, step) stored at most once, also
    across restarts of the process.

    Why: a resumed attempt (a restarted Ray worker group, a resubmitted job) rewinds to its
    checkpoint and trains the epochs after it again, offering their metrics a second time.
    MLflow cannot delete a metric point, so a step logged twice would stay in the history for
    good (train_loss at steps 0, 1, 2, 2, 3). The first time a key is logged, its stored steps
    are read once (only for keys the run already holds: a fresh run costs one request), and a
    step the run holds is skipped. That is right because a resumed epoch is the same epoch:
    training from a checkpoint is deterministic, so the stored point is the value it would log.
    """

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self._client = MlflowClient()
        self._held: set[str] | None = None  # keys the run held when first asked
        self._steps: dict[str, set[int]] = {}  # key -> steps the run holds

    def _stored_steps(self, key: str) -> set[int]:
        if self._held is None:
            self._held = set(self._client.get_run(self.run_id).data.metrics)
        if key not in self._steps:
            history = self._client.get_metric_history(self.run_id, key) \
                if key in self._held else []
            self._steps[key] = {m.step for m in history}
        return self._steps[key]

    def log(self, step: int, metrics: Mapping[str, float],
            timestamp_ms: int | None = None) -> list[str]:  # fmt: skip
        """Log `metrics` at `step` in one request; returns the keys logged (the others the run
        already holds at this step). Sending the same call again (same `timestamp_ms`) after
        an error is harmless: the server drops a point equal to one it stored."""
        now = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
        entries = [Metric(key, float(value), now, int(step)) for key, value in metrics.items()
                   if int(step) not in self._stored_steps(key)]
        for start in range(0, len(entries), _METRIC_BATCH_LIMIT):
            self._client.log_batch(self.run_id,
                                   metrics=entries[start : start + _METRIC_BATCH_LIMIT])
        for entry in entries:
            self._steps[entry.key].add(entry.step)
        return [entry.key for entry in entries]


class BackgroundLog:
    """Metrics and figures of one run sent by a background thread, so that a tracking server
    outage never blocks or kills the training that logs them.

    Why: MLflow's client retries a request for a while and then raises; a training loop that
    logs synchronously stalls for every retry and dies with the last one, though nothing is
    wrong with the training. Here `log_metrics` and `log_figure` only queue (a figure as PNG
    bytes, the latest per name); the thread sends in order, and after a failure keeps
    everything and tries again with exponential backoff (`retry_s`: first and longest wait)
    until the server is back. Each point keeps the timestamp it was logged with, so a request
    that reached the server although its client gave up is not stored twice when resent;
    `RunMetrics` underneath skips steps a resumed run already holds. `close` waits (bounded)
    for the queue to drain. Points still queued when the process dies are lost unless the
    caller kept `unsent()` (a checkpoint does) and hands them to the next one as `queued`.
    """

    def __init__(self, run_id: str, retry_s: tuple[float, float] = (1.0, 30.0),
                 queued: Iterable[tuple[int, Mapping[str, float], int]] = ()) -> None:
        self.run_id = run_id
        self.failures = 0  # failed sends since the last success (read by tests and callers)
        self._retry_s = retry_s
        self._metrics = RunMetrics(run_id)
        self._points: deque[tuple[int, dict[str, float], int]] = deque(
            (int(step), dict(values), int(ts)) for step, values, ts in queued)
        self._figures: dict[str, bytes] = {}
        self._busy = False
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._send_forever, daemon=True,
                                        name=f"mlflow-log-{run_id[:8]}")  # fmt: skip
        self._thread.start()

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        point = (int(step), {k: float(v) for k, v in metrics.items()}, int(time.time() * 1000))
        with self._cond:
            self._points.append(point)
            self._cond.notify_all()

    def log_figure(self, fig: Figure, name: str) -> None:
        """Queue `fig` as plots/<name>.png (rendered now: a figure is not for another thread)."""
        if not Path(name).suffix:
            name = f"{name}.png"
        buffer = io.BytesIO()
        fig.savefig(buffer, format=Path(name).suffix[1:])
        with self._cond:
            self._figures[name] = buffer.getvalue()
            self._cond.notify_all()

    def pending(self) -> int:
        """Metric points and figures not yet stored by the server."""
        with self._cond:
            return len(self._points) + len(self._figures)

    def unsent(self) -> list[tuple[int, dict[str, float], int]]:
        """The metric points not yet stored, as (step, metrics, timestamp ms), in order."""
        with self._cond:
            return [(step, dict(values), ts) for step, values, ts in self._points]

    def flush(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for everything queued to be stored; True if it was."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._points or self._figures or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout_s: float = 300.0) -> bool:
        """Flush (up to `timeout_s`), then stop the thread; False (with a warning) if points
        were left undelivered."""
        delivered = self.flush(timeout_s)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if not delivered:
            _log.warning("MLflow run %s: %d metric point(s)/figure(s) not delivered after %.0f s "
                         "(tracking server unavailable)", self.run_id, self.pending(), timeout_s)
        return delivered

    def _send_forever(self) -> None:
        while True:
            with self._cond:
                while not (self._points or self._figures or self._closed):
                    self._cond.wait()
                if self._closed:
                    return
                self._busy = True
            try:
                self._send_queued()
                self.failures = 0
            except Exception as err:  # noqa: BLE001 - an outage: keep everything, retry later
                self.failures += 1
                delay = min(self._retry_s[1], self._retry_s[0] * 2 ** (self.failures - 1))
                _log.warning("MLflow run %s: logging failed (%s: %s); %d queued, retrying in "
                             "%.0f s", self.run_id, type(err).__name__, str(err)[:200],
                             self.pending(), delay)  # fmt: skip
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
                    self._cond.wait_for(lambda: self._closed, timeout=delay)
                continue
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def _send_queued(self) -> None:
        """Send the queue in order; an item leaves it only once the server has stored it."""
        client = MlflowClient()
        while True:
            with self._cond:
                if not self._points:
                    break
                step, values, timestamp = self._points[0]
            self._metrics.log(step, values, timestamp)
            with self._cond:
                self._points.popleft()
        with self._cond:
            figures = dict(self._figures)
        for name, png in figures.items():
            with tempfile.TemporaryDirectory(prefix="vl-fig-") as tmp:
                path = Path(tmp) / name
                path.write_bytes(png)
                client.log_artifact(self.run_id, str(path), "plots")
            with self._cond:
                if self._figures.get(name) is png:  # not replaced by a newer one meanwhile
                    del self._figures[name]


def log_dataset(run_id: str, name: str, digest: str, uri: str, context: str,
                profile: Mapping[str, Any] | None = None) -> None:
    """Record a data set the run reads as an MLflow dataset input (the run page's "Datasets"),
    tagged with its `context` ("training", "validation"). Logging the same (name, digest)
    again, as a resumed run does, adds nothing."""
    dataset = Dataset(name=name, digest=digest,
                      source_type="s3" if uri.startswith("s3://") else "local",
                      source=json.dumps({"uri": uri}),
                      profile=json.dumps(dict(profile)) if profile else None)  # fmt: skip
    MlflowClient().log_inputs(run_id, datasets=[
        DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])])


@contextmanager
def system_metrics(run_id: str, sampling_interval_s: float = 5.0) -> Iterator[None]:
    """Log this node's CPU, memory, disk and network (and GPU, where present) as `system/*`
    metrics of the run while the block runs.

    MLflow starts this monitor by itself only for runs it starts fluently
    (`log_system_metrics=True`); these runs are opened by id, so the monitor runs here. A
    resumed run continues its step count; MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides
    the interval.
    """
    monitor = SystemMetricsMonitor(run_id, sampling_interval=sampling_interval_s,
                                   resume_logging=True)  # fmt: skip
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


# ---- figures and the registry ---------------------------------------------------------------
def log_figure(run_id: str, fig: Figure, name: str) -> None:
    """Store `fig` as plots/<name>.png in the run's artifacts."""
    if not Path(name).suffix:
        name = f"{name}.png"
    MlflowClient().log_figure(run_id, fig, f"plots/{name}")


LINEAGE_PARAMS = ("data.dataset", "data.video_features", "data.text_features")
LINEAGE_TAG_PREFIX = "vl.lineage."


def _lineage_of_run(client: MlflowClient, run_id: str) -> dict[str, str]:
    """The run's dataset and feature sets (from its logged config params) as version tags."""
    params = client.get_run(run_id).data.params
    return {LINEAGE_TAG_PREFIX + k: params.get(k, "") for k in LINEAGE_PARAMS}


def _lineage_of(version: Any) -> dict[str, str] | None:
    """A version's lineage tags; None for a version registered before lineage was recorded."""
    tags = version.tags or {}
    keys = [LINEAGE_TAG_PREFIX + k for k in LINEAGE_PARAMS]
    if not any(k in tags for k in keys):
        return None
    return {k: tags.get(k, "") for k in keys}


def _same_checkpoint(client: MlflowClient, name: str, run_id: str, source: str,
                     tags: Mapping[str, str]) -> str | None:  # fmt: skip
    """The version already registered from this run's `source` with this selection value: a
    resubmitted finished run registers the same checkpoint again, which must be a no-op."""
    for version in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
        vt = version.tags or {}
        if version.source == source and all(vt.get(k) == v for k, v in tags.items()):
            return str(version.version)
    return None


def _best_comparable(client: MlflowClient, name: str, tags: Mapping[str, str],
                     higher_is_better: bool) -> str | None:  # fmt: skip
    """The best version of `name` with the same lineage and selection metric as `tags`, read
    fresh from the registry (ties: the oldest version keeps it)."""
    keys = [k for k in tags if k.startswith(LINEAGE_TAG_PREFIX)] + [SELECTION_METRIC_TAG]
    best: tuple[float, int] | None = None
    for version in client.search_model_versions(f"name = '{name}'"):
        vt = version.tags or {}
        if SELECTION_VALUE_TAG not in vt or any(vt.get(k) != tags[k] for k in keys):
            continue
        value = float(vt[SELECTION_VALUE_TAG])
        key = (value if higher_is_better else -value, -int(version.version))
        if best is None or key > best:
            best = key
    return None if best is None else str(-best[1])


def _move_champion(client: MlflowClient, name: str, tags: Mapping[str, str],
                   higher_is_better: bool) -> str | None:  # fmt: skip
    """Point `champion` at the best comparable version, decided on a fresh read of the alias
    and the versions right before the move (so of two concurrent jobs, the one that moves last
    sees both versions and leaves the better one). A champion of another dataset, feature sets
    or selection metric is never replaced. Returns the champion version after the move."""
    try:
        current = client.get_model_version_by_alias(name, CHAMPION_ALIAS)
    except MlflowException:  # no champion yet
        current = None
    if current is not None:
        lineage = _lineage_of(current)
        own = {k: v for k, v in tags.items() if k.startswith(LINEAGE_TAG_PREFIX)}
        same_metric = (current.tags or {}).get(SELECTION_METRIC_TAG) == tags[SELECTION_METRIC_TAG]
        if lineage is not None and (lineage != own or not same_metric):
            return str(current.version)
    best = _best_comparable(client, name, tags, higher_is_better)
    if best is None:
        return None if current is None else str(current.version)
    if current is None or str(current.version) != best:
        client.set_registered_model_alias(name, CHAMPION_ALIAS, best)
    return best


def register_version(
    run_id: str,
    source: str,
    registered_name: str,
    metric_name: str,
    metric_value: float,
    higher_is_better: bool = True,
    model_id: str | None = None,
) -> tuple[str, bool]:
    """Register the model at `source` (an artifact URI of `run_id`, or `models:/<model_id>` of
    the run's LoggedModel `model_id`, which the server then requires) as a new version, and move
    the `champion` alias to the best version of the same lineage (the run's data.dataset,
    data.video_features, data.text_features, recorded as version tags) and `metric_name`.

    Registering the same checkpoint again (same run, source and selection value: a resubmitted
    finished run) returns the existing version and registers nothing. A champion of another
    lineage or metric keeps the alias; one registered without lineage tags is replaced.
    Returns (version, champion?).
    """
    client = MlflowClient()
    if model_id is None and source.startswith("models:/m-"):  # a LoggedModel: the server needs it
        model_id = source.removeprefix("models:/")
    try:
        client.create_registered_model(registered_name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    tags = {SELECTION_METRIC_TAG: metric_name, SELECTION_VALUE_TAG: repr(float(metric_value)),
            **_lineage_of_run(client, run_id)}
    version = _same_checkpoint(client, registered_name, run_id, source, tags)
    if version is None:
        version = str(client.create_model_version(registered_name, source=source, run_id=run_id,
                                                  tags=tags, model_id=model_id).version)
    champion = _move_champion(client, registered_name, tags, higher_is_better)
    return version, champion == version
