"""Where bytes live: local paths and s3:// URIs behind one small API (fsspec underneath).

Every module that reads or writes a file by URI (shards, checkpoints, fault markers) goes
through here, so the S3 settings are read in one place and a local path and an object-store
prefix are interchangeable everywhere.

Outages: an object store goes away for seconds or minutes (a restart, a network blip, a paused
server). Every S3 request is retried by botocore (`S3Retry`: retry mode, attempts, connect and
read timeouts), and the whole-object calls here (`read_bytes`, `write_bytes`, `remove`, `exists`,
`wait_for_storage`) retry on top of that with exponential backoff until a bounded total time,
then fail with one `StorageUnavailableError` naming the URI and the bound.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import math
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import fsspec
import pyarrow.fs
from botocore.exceptions import ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError
from fsspec.exceptions import FSTimeoutError

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_MODES = ("standard", "adaptive", "legacy")
# s3fs maps S3's "try again" answers (5xx, SlowDown) to these errnos
_TRANSIENT_ERRNOS = {errno.EBUSY, errno.EREMOTEIO, errno.ETIMEDOUT, errno.ECONNRESET,
                     errno.ECONNREFUSED}


class StorageUnavailableError(OSError):
    """The object store did not answer within the retry bound (`S3Retry.total_s`)."""


class StorageConfigError(ValueError):
    """An S3 retry setting in the environment is not usable (names the variable)."""


@dataclass(frozen=True)
class S3Retry:
    """How s3:// access rides out an outage, from the environment.

    Per request (botocore): `mode` and `max_attempts` (all tries of one request, the first
    included) from the standard AWS_RETRY_MODE / AWS_MAX_ATTEMPTS, and the socket timeouts
    (VL_S3_CONNECT_TIMEOUT_S, VL_S3_READ_TIMEOUT_S): a server that accepts connections but
    never answers costs one read timeout per try. Per call of this module: tries go on with
    exponential backoff (`first_backoff_s` doubling up to `max_backoff_s`, jittered) until
    `total_s` (VL_S3_RETRY_TOTAL_S) has passed; a try already running when the bound passes
    finishes first, so a call gives up after at most `total_s` plus one request's tries.
    """

    mode: str = "standard"
    max_attempts: int = 3
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 20.0
    total_s: float = 180.0
    first_backoff_s: float = 0.5
    max_backoff_s: float = 15.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> S3Retry:
        env = os.environ if env is None else env
        default = cls()
        mode = env.get("AWS_RETRY_MODE", "").strip() or default.mode
        if mode not in RETRY_MODES:
            raise StorageConfigError(
                f"AWS_RETRY_MODE={mode!r}: expected one of {', '.join(RETRY_MODES)}")
        return cls(mode=mode,
                   max_attempts=int(_positive(env, "AWS_MAX_ATTEMPTS", default.max_attempts)),
                   connect_timeout_s=_positive(env, "VL_S3_CONNECT_TIMEOUT_S",
                                               default.connect_timeout_s),
                   read_timeout_s=_positive(env, "VL_S3_READ_TIMEOUT_S", default.read_timeout_s),
                   total_s=_positive(env, "VL_S3_RETRY_TOTAL_S", default.total_s))  # fmt: skip

    def botocore_config(self) -> dict:
        """botocore `Config` arguments (s3fs `config_kwargs`)."""
        return {"retries": {"mode": self.mode, "total_max_attempts": self.max_attempts},
                "connect_timeout": self.connect_timeout_s, "read_timeout": self.read_timeout_s}

    def backoff_s(self, failures: int) -> float:
        """The wait after the `failures`-th failed try: doubling, capped, jittered (50-100 %)
        so that the workers of a job do not retry in lockstep. The jitter comes from the OS,
        not `random`'s seeded generator: the workers seed that one alike, and drawing from it
        during an outage would shift the training's random stream."""
        base = min(self.max_backoff_s, self.first_backoff_s * 2 ** (failures - 1))
        return base * random.SystemRandom().uniform(0.5, 1.0)


def _positive(env: Mapping[str, str], name: str, default: float) -> float:
    text = env.get(name, "").strip()
    if not text:
        return default
    integer = name == "AWS_MAX_ATTEMPTS"
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0) or (integer and value != int(value)):
        raise StorageConfigError(
            f"{name}={text!r}: expected a positive {'integer' if integer else 'number'}")
    return value


def is_remote(uri: str) -> bool:
    """True for an object-store URI (s3://...), false for a local path or file:// URI."""
    return "://" in uri and not uri.startswith("file://")


def join_uri(base: str, *names: str) -> str:
    return "/".join([base.rstrip("/"), *names])


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec filesystem, path) for a local path or s3:// URI.

    S3 settings come from the standard variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION), retries and timeouts from `S3Retry.from_env`.
    They are passed explicitly so fsspec's instance cache can never hand back a client built
    for another endpoint, key pair or retry setting.
    """
    if uri.startswith("s3://"):
        # Imported here: s3fs (with aiobotocore) costs ~0.3 s at import and only s3:// needs it.
        import s3fs

        fs = s3fs.S3FileSystem(
            endpoint_url=os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL"),
            key=os.environ.get("AWS_ACCESS_KEY_ID"),
            secret=os.environ.get("AWS_SECRET_ACCESS_KEY"),
            client_kwargs={"region_name": os.environ.get("AWS_DEFAULT_REGION", "us-east-1")},
            config_kwargs=S3Retry.from_env().botocore_config(),
        )
        # botocore retries each request and `retrying` each call; s3fs's own loop on top would
        # multiply every request's tries by five and make the total time unbounded in practice.
        fs.retries = 1
        _answer_or_time_out(fs)
        return fs, uri[len("s3://") :]
    if is_remote(uri):
        return fsspec.core.url_to_fs(uri)
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    return fsspec.filesystem("file"), os.path.abspath(path)


def _arrow_tries(policy: S3Retry) -> int:
    """Tries for pyarrow's S3 client (the AWS C++ SDK) to keep trying a silent server for
    `policy.total_s`: each try costs its request timeout, and the SDK waits 0.5 s x 2^k
    (capped at 20 s) before the next (measured against a paused SeaweedFS: 3 tries of 3 s gave
    up after 10.2 s, 4 of 1 s after 7.9 s, 10 of 2 s after 113 s)."""
    tries, spent = 1, policy.read_timeout_s
    while spent < policy.total_s:
        spent += min(0.5 * 2 ** (tries - 1), 20.0) + policy.read_timeout_s
        tries += 1
    return max(tries, policy.max_attempts)


class RetryingS3FileSystem(pyarrow.fs.S3FileSystem):
    """pyarrow's S3 client that keeps its retry strategy when pickled.

    `pyarrow.fs.S3FileSystem.__reduce__` drops `retry_strategy`: the copy Ray Train ships to
    its controller and workers falls back to 3 tries, and a long outage then fails the
    controller's snapshot write (`CreateMultipartUpload ... curlCode: 28`) whatever the client
    was built with. This one is rebuilt from its own arguments."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.options = options

    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any]]]:
        return _rebuild_s3, (self.options,)


def _rebuild_s3(options: dict[str, Any]) -> RetryingS3FileSystem:
    return RetryingS3FileSystem(**options)


def arrow_filesystem(uri: str) -> tuple[pyarrow.fs.FileSystem | None, str]:
    """(pyarrow filesystem, path) for clients that take a pyarrow filesystem (Ray Train's
    checkpoint storage): for s3:// an S3 client with the same endpoint and keys as
    `filesystem` and tries enough to last `S3Retry.total_s` against a silent server (pyarrow's
    default of 3 tries gives up after ~10 s, failing a checkpoint upload in a short outage),
    kept in every pickled copy (`RetryingS3FileSystem`); for another URI (None, the URI) and
    for a local path (None, its absolute path), which leave the client to pick its own
    filesystem.
    """
    if not uri.startswith("s3://"):
        return None, uri if is_remote(uri) else filesystem(uri)[1]
    policy = S3Retry.from_env()
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    scheme, _, host = (endpoint or "").rpartition("://")
    strategy = (pyarrow.fs.AwsDefaultS3RetryStrategy if policy.mode == "legacy"
                else pyarrow.fs.AwsStandardS3RetryStrategy)(max_attempts=_arrow_tries(policy))
    fs = RetryingS3FileSystem(
        access_key=os.environ.get("AWS_ACCESS_KEY_ID"),
        secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
        region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        endpoint_override=host or None, scheme=scheme or "https",
        connect_timeout=policy.connect_timeout_s, request_timeout=policy.read_timeout_s,
        retry_strategy=strategy)  # fmt: skip
    return fs, uri[len("s3://") :]


def _answer_or_time_out(fs: fsspec.AbstractFileSystem) -> None:
    """Make every request of `fs`'s client end within its read timeout.

    botocore asks for `Expect: 100-continue` on every upload, and aiohttp (under s3fs) waits
    for the server's "100 Continue" with no timeout at all: a PUT to a server that accepts the
    connection but never answers (hung, overloaded, paused) would block forever, beyond every
    retry setting. Without the header the body goes out at once and the read timeout applies.
    The client is built here (no request is sent) so the handler can be removed from it.
    """
    from botocore.handlers import add_expect_header  # with s3fs: only s3:// needs it

    client = fs.connect()
    client.meta.events.unregister("before-call.s3", add_expect_header)


def is_transient(err: BaseException) -> bool:
    """True for an error that a later try may not meet: a timeout, a refused or reset
    connection, S3's 5xx / SlowDown answers. A missing object, a denied key, a bad request
    are answers, not outages."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, HTTPClientError | BotoConnectionError | FSTimeoutError
                      | TimeoutError | ConnectionError):
            return True
        if isinstance(err, ClientError):
            meta = err.response.get("ResponseMetadata", {})
            code = err.response.get("Error", {}).get("Code", "")
            return int(meta.get("HTTPStatusCode") or 0) >= 500 or code in (
                "SlowDown", "Throttling", "RequestTimeout", "ServiceUnavailable")
        if isinstance(err, FileNotFoundError | PermissionError):
            return False
        if isinstance(err, OSError) and err.errno in _TRANSIENT_ERRNOS:
            return True
        err = err.__cause__ or err.__context__
    return False


def retrying(what: str, uri: str, call: Callable[[], T], policy: S3Retry | None = None) -> T:
    """`call()`, tried again after transient errors (`is_transient`) with exponential backoff
    until `policy.total_s` has passed; then a StorageUnavailableError naming `what`, `uri`,
    the time waited and the bound. Local paths are called once."""
    if not uri.startswith("s3://"):
        return call()
    policy = policy or S3Retry.from_env()
    start = time.monotonic()
    failures = 0
    while True:
        try:
            return call()
        except Exception as err:
            if not is_transient(err):
                raise
            failures += 1
            waited = time.monotonic() - start
            delay = policy.backoff_s(failures)
            if waited + delay > policy.total_s:
                raise StorageUnavailableError(
                    f"{what} {uri}: storage did not answer for {waited:.0f} s ({failures} "
                    f"tries; bound VL_S3_RETRY_TOTAL_S={policy.total_s:g}): "
                    f"{type(err).__name__}: {err}") from err
            log.warning("%s %s: storage unavailable (%s), try %d failed after %.1f s; "
                        "retrying in %.1f s", what, uri, type(err).__name__, failures, waited,
                        delay)
            time.sleep(delay)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    return retrying("read", uri, lambda: fs.cat_file(path))


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object; a local file appears only complete (temp name + rename). An S3
    PUT is atomic and the same bytes are sent on every try, so a try the server completes after
    its client gave up (a hung server catching up) does no harm; after a
    StorageUnavailableError the object holds the old bytes or, later, the new ones."""
    fs, path = filesystem(uri)
    if not is_remote(uri):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # readers never see a half-written file
        return
    retrying("write", uri, lambda: fs.pipe_file(path, data))


def remove(uri: str) -> None:
    """Delete one object or file; one that is not there is fine (a retried delete the server
    had already done finds nothing)."""
    fs, path = filesystem(uri)

    def delete() -> None:
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(path)

    retrying("delete", uri, delete)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return retrying("check", uri, lambda: fs.exists(path))


def wait_for_storage(uri: str, policy: S3Retry | None = None) -> float:
    """Block until the bucket of `uri` answers (a HEAD request, never served from a cache),
    backing off as `retrying` does; returns the seconds waited. Called before work that must
    read or write storage (a restarted worker group restoring its checkpoint), so an outage
    is waited out rather than counted as a failure. Raises StorageUnavailableError past the
    bound; a missing bucket or a denied key is raised at once."""
    if not uri.startswith("s3://"):
        return 0.0
    fs, path = filesystem(uri)
    bucket = path.split("/", 1)[0]
    start = time.monotonic()
    retrying("reach", uri, lambda: fs.call_s3("head_bucket", Bucket=bucket), policy)
    return time.monotonic() - start


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
