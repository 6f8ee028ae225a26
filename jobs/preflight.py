"""Driver-side preflight: every input a job needs is checked before a Ray worker starts.

Why on the driver: a typo in a shard prefix or a stopped MLflow server would otherwise surface
after a worker group start-up (~15 s here, minutes on a cloud cluster) as a traceback in some
worker's log. Each check raises `PreflightError` whose message says what is wrong and what to
do; the job's `main` turns it into one stderr line and exit code 2.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import ray

from vl.config import ConfigError, ExperimentConfig
from vl.data.dataset import ShardDataset
from vl.data.shards import ShardManifest, read_manifest
from vl.storage import S3Retry, StorageConfigError, filesystem, is_remote
from vl.tracking import TrackingServerUnavailableError, check_tracking_server

EXIT_BAD_INPUT = 2


class PreflightError(RuntimeError):
    """Bad input found before any work started; the message is the one line the user sees."""


@dataclass(frozen=True)
class DataShape:
    """What the shard sets say about the data: the model's input widths follow from it."""

    video_dim: int  # chosen video sets, without the 2 TEF dims
    text_dim: int
    clip_len: float
    num_train: int
    num_val: int


def require_manifest(uri: str, role: str) -> ShardManifest:
    """The manifest at `uri`, or a PreflightError that names the prefix and the fix."""
    if not uri:
        raise PreflightError(
            f"no {role} shard set given: pass --data s3://BUCKET/PREFIX (holding train/ and "
            f"val/) or set data.{role} in the config"
        )
    try:
        return read_manifest(uri)
    except FileNotFoundError:
        raise PreflightError(
            f"no shard manifest at {uri.rstrip('/')}/manifest.json ({role} split): check "
            "--data / data." + role + ", or write the shards first with python -m jobs.shard"
        ) from None
    except PermissionError as err:
        raise PreflightError(f"cannot read {role} shards at {uri}: {err}; check AWS_* "
                             "credentials") from None
    except (OSError, ValueError) as err:
        raise PreflightError(f"cannot read the {role} shard manifest at {uri}: {err}") from None


def check_storage_settings() -> None:
    """The S3 retry variables (AWS_RETRY_MODE, AWS_MAX_ATTEMPTS, VL_S3_*) are usable: a bad
    one is named here, not in a traceback of the first S3 call."""
    try:
        S3Retry.from_env()
    except StorageConfigError as err:
        raise PreflightError(str(err)) from None


def check_data(cfg: ExperimentConfig) -> DataShape:
    """Both shard sets exist, hold the configured dataset and feature sets, and agree."""
    check_storage_settings()
    d = cfg.data
    train = require_manifest(d.train, "train")
    val = require_manifest(d.val, "val")
    for uri, m in ((d.train, train), (d.val, val)):
        if m.dataset != d.dataset:
            raise PreflightError(
                f"{uri} holds {m.dataset!r} shards but data.dataset is {d.dataset!r}; "
                "fix the config or --data"
            )
    dims = []
    for uri, m in ((d.train, train), (d.val, val)):
        try:
            dims.append(m.input_widths(d.video_features, d.text_features))
        except ValueError as err:
            raise PreflightError(f"{uri}: {err}") from None
    if dims[0] != dims[1]:
        raise PreflightError(
            f"train and val shards differ in feature dims ({dims[0]} vs {dims[1]}); "
            "shard both splits from the same feature sets"
        )
    return DataShape(
        video_dim=dims[0][0],
        text_dim=dims[0][1],
        clip_len=float(train.clip_len or d.clip_len),
        num_train=train.num_rows,
        num_val=val.num_rows,
    )


def check_split(cfg: ExperimentConfig) -> None:
    """Every one of the scale.num_workers ranks gets training samples. The ranks split the
    train shards (by file, or by row group when there are fewer files than ranks) exactly as the
    workers will: a rank left empty would fail inside the job, after the run was opened, and
    again on every restart."""
    workers = cfg.scale.num_workers
    if workers <= 1:
        return
    d = cfg.data
    with tempfile.TemporaryDirectory(prefix="vl-split-") as cache:  # a TVSum domain reads files
        try:
            ShardDataset(d.train, rank=0, world_size=workers, seed=cfg.train.seed,
                         video_features=d.video_features, text_features=d.text_features,
                         domain=d.tvsum_domain or None, equal_per_rank=True, cache_dir=cache)
        except ValueError as err:
            raise PreflightError(f"{err} (scale.num_workers={workers})") from None


def check_storage(storage: str) -> None:
    """The checkpoint storage is usable: for s3:// the bucket exists and answers."""
    if not is_remote(storage):
        try:
            os.makedirs(storage, exist_ok=True)
        except OSError as err:
            raise PreflightError(f"cannot create storage directory {storage}: {err}") from None
        return
    if not storage.startswith("s3://"):
        raise PreflightError(f"--storage {storage}: only s3:// URIs or local paths are supported")
    bucket = storage[len("s3://"):].split("/", 1)[0]
    if not bucket:
        raise PreflightError(f"--storage {storage}: no bucket name (expected s3://BUCKET/PREFIX)")
    fs, _ = filesystem(storage)
    try:
        found = fs.exists(bucket)
    except PermissionError as err:
        raise PreflightError(f"storage bucket {bucket!r}: access denied ({err}); check "
                             "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY") from None
    except OSError as err:
        endpoint = os.environ.get("AWS_ENDPOINT_URL", "the default AWS endpoint")
        raise PreflightError(f"storage {storage}: S3 at {endpoint} does not answer ({err}); "
                             "check AWS_ENDPOINT_URL") from None
    if not found:
        raise PreflightError(
            f"storage bucket {bucket!r} does not exist (from --storage {storage}); create it "
            "or point --storage at an existing bucket"
        )


def check_tracking() -> None:
    """MLFLOW_TRACKING_URI is set and its server answers."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        raise PreflightError(
            "MLFLOW_TRACKING_URI is not set: point it at an MLflow server (python -m "
            "cluster.local.stack up prints one) or a sqlite:///ABS/PATH/mlflow.db store"
        )
    try:
        check_tracking_server(uri)
    except TrackingServerUnavailableError as err:
        raise PreflightError(str(err)) from None


GCS_ADDRESS_ENV = "VL_RAY_GCS_ADDRESS"  # exported by `python -m cluster.local.stack up`


def driver_address() -> str | None:
    """The address a driver passes to `ray.init`: RAY_ADDRESS as given, except that the job
    API's dashboard URL (what `ray job submit` needs, and what `cluster.local.stack up`
    exports) is swapped for the GCS address the stack exports beside it. None: start or find a
    local cluster."""
    address = os.environ.get("RAY_ADDRESS", "")
    if not address.startswith(("http://", "https://")):
        return address or None
    gcs = os.environ.get(GCS_ADDRESS_ENV, "")
    if not gcs:
        raise PreflightError(
            f"RAY_ADDRESS={address} is the job API URL, which a driver cannot join: set "
            f"{GCS_ADDRESS_ENV} (or RAY_ADDRESS) to the GCS host:port (`gcs_address` in the "
            "stack's state.json), or submit the command with `ray job submit`")
    return gcs


def use_driver_address(address: str | None) -> None:
    """Point this process's RAY_ADDRESS at `address`, so Ray's own lookups (which read the
    variable) agree with the address given to `ray.init`."""
    if address:
        os.environ["RAY_ADDRESS"] = address
    else:
        os.environ.pop("RAY_ADDRESS", None)


def init_ray(explicit: str | None = None, **init_kwargs) -> None:
    """`ray.init` for a driver that may run in the caller's process (a search, the seeds run):
    at `explicit`, else at `driver_address()`, else on a new local cluster (without a
    dashboard: it lives as long as this driver). RAY_ADDRESS is pointed at that address only
    while Ray starts (Ray reads it even when given an address, and rejects the job API URL),
    then put back. PreflightError: the job API URL without the GCS address beside it."""
    address = explicit or driver_address()
    if address is None:
        init_kwargs.setdefault("include_dashboard", False)
    saved = os.environ.get("RAY_ADDRESS")
    use_driver_address(address)
    try:
        ray.init(address=address, **init_kwargs)
    finally:
        use_driver_address(saved)


def check_capacity(num_workers: int, cpus_per_worker: float, node_cpus: list[float], *,
                   gpus_per_worker: float = 0.0, node_gpus: list[float] | None = None,
                   knobs: dict[str, float] | None = None) -> None:
    """The cluster can place `num_workers` workers of `cpus_per_worker` CPUs (and
    `gpus_per_worker` GPUs) each, each on one node: otherwise Ray would wait for resources
    forever, so the job fails now. `knobs` names the settings the message blames and tells the
    user to lower (default: jobs.train's scale.* keys)."""
    fits_per_node = [int(cpus // cpus_per_worker) for cpus in node_cpus]
    if gpus_per_worker > 0:
        gpus = node_gpus or [0.0] * len(node_cpus)
        fits_per_node = [min(n, int(g // gpus_per_worker))
                         for n, g in zip(fits_per_node, gpus, strict=True)]
    fits = sum(fits_per_node)
    if fits >= num_workers:
        return
    if knobs is None:
        knobs = {"scale.num_workers": num_workers, "scale.cpus_per_worker": cpus_per_worker}
    have = f"{', '.join(f'{c:g}' for c in node_cpus) or 'no'} CPUs"
    if gpus_per_worker > 0:
        have += f" and {', '.join(f'{g:g}' for g in node_gpus or []) or 'no'} GPUs"
    raise PreflightError(
        f"the Ray cluster is too small for {' x '.join(f'{k}={v:g}' for k, v in knobs.items())}: "
        f"its {len(node_cpus)} node(s) have {have} ({fits} of {num_workers} fit); lower "
        f"{' / '.join(knobs)} or add nodes")


def check_cluster_capacity(num_workers: int, cpus_per_worker: float,
                           gpus_per_worker: float = 0.0,
                           knobs: dict[str, float] | None = None) -> None:
    """`check_capacity` against the alive nodes of the Ray cluster this process joined."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    check_capacity(num_workers, cpus_per_worker, [float(r.get("CPU", 0)) for r in nodes],
                   gpus_per_worker=gpus_per_worker,
                   node_gpus=[float(r.get("GPU", 0)) for r in nodes], knobs=knobs)


def config_error(err: ConfigError) -> PreflightError:
    return PreflightError(f"config error: {err}")
