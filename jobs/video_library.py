"""Ray Data stages shared by the jobs that read a library of videos (jobs.extract,
jobs.predict --videos, jobs.pretrain_corpus): decoding as CPU tasks, where the model actors run,
and the driver's progress line.

Decoding is one Ray task per video (CPU-bound, scales with the cluster's cores); models live in
an actor pool (one copy per actor, on a GPU when the cluster has them). A decode task never
raises: a video that cannot be read comes out as a row with `error` set, and the job reports it
by name and carries on.
"""

from __future__ import annotations

import os
import pickle
import socket
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

from vl.data.video import VideoDecodeError, decode_clip_frames, local_video

# A decode task holds one video's clip-centre frames (~150 kB per clip at 224 px) plus the
# decoder: it reserves that much memory. The reservation also keeps Ray Data from fusing the
# decode map into the model actors' operator (it fuses stages whose remote args match), which
# would decode inside the few model actors, one video at a time.
DECODE_REMOTE_ARGS: dict[str, Any] = {"memory": 256 * 2**20}


def decode_stage(row: dict[str, Any], clip_len: float, frame_size: int) -> dict[str, Any]:
    """One video row (vid, uri, ...) -> the same row plus its pickled DecodedVideo in `payload`,
    or the reason in `error`; `decode_s` is the decode time (download included)."""
    out = {**row, "error": "", "payload": b"", "decode_s": 0.0}
    t0 = time.perf_counter()
    try:
        with local_video(row["uri"]) as local:
            video = decode_clip_frames(local, clip_len, frame_size=frame_size,
                                       source=row["uri"])
        out["payload"] = pickle.dumps(video, protocol=pickle.HIGHEST_PROTOCOL)
    except VideoDecodeError as err:
        out["error"] = str(err)
    except Exception as err:  # noqa: BLE001 - a bad video must never stop the library
        out["error"] = f"{row['uri']}: {type(err).__name__}: {err}"
    out["decode_s"] = time.perf_counter() - t0
    return out


class StorageUnreachableError(OSError):
    """The S3 endpoint a prefix lives on does not accept connections."""


def check_s3_endpoint(uri: str, timeout_s: float = 3.0) -> None:
    """For s3:// URIs with an explicit endpoint (AWS_ENDPOINT_URL[_S3]): fail in seconds, with
    the endpoint named, when nothing listens there (the S3 client would retry for ~12 s and
    then report a botocore error)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not uri.startswith("s3://") or not endpoint:
        return
    url = urllib.parse.urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "localhost", port), timeout=timeout_s).close()
    except OSError as err:
        raise StorageUnreachableError(
            f"{uri}: the S3 endpoint {endpoint} does not answer ({err.strerror or err}); check "
            "AWS_ENDPOINT_URL"
        ) from None


def ensure_ray() -> None:
    """Join the cluster in RAY_ADDRESS (a job submitted to it), else start a local one."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=True)


class ResourceError(ValueError):
    """The requested device is not in the cluster."""


def actor_resources(device: str, workers: int, gpus_per_worker: float, cpus_per_worker: float
                    ) -> tuple[str, int, dict[str, float]]:
    """(device, actor count, per-actor Ray resources). device "auto": CUDA when the cluster has
    a GPU per actor, else CPU; workers 0: one actor per GPU, else 1."""
    import ray

    gpus = float(ray.cluster_resources().get("GPU", 0.0))
    if device == "auto":
        device = "cuda" if gpus >= gpus_per_worker > 0 else "cpu"
    if device == "cuda":
        if gpus < gpus_per_worker:
            raise ResourceError(f"--device cuda but the Ray cluster has {gpus:g} GPUs")
        count = workers or max(1, int(gpus // gpus_per_worker))
        return device, count, {"num_gpus": gpus_per_worker, "num_cpus": 1}
    return device, workers or 1, {"num_cpus": cpus_per_worker}


@dataclass
class Progress:
    """`[done/total] ... | 1.23 videos/s, ETA 45 s` lines for the driver."""

    total: int
    done: int = 0
    start: float = 0.0

    def __post_init__(self) -> None:
        self.start = self.start or time.monotonic()

    def step(self, what: str) -> str:
        self.done += 1
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        return (f"[{self.done}/{self.total}] {what} | {rate:.2f} videos/s, "
                f"ETA {eta:.0f} s")
