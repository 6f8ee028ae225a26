"""vl.storage under S3 outages, against a real SeaweedFS server paused with SIGSTOP.

A paused server is what a hung or overloaded object store looks like to a client: connections
are accepted (by the kernel) and never answered, so every try costs a read timeout. The server
here is private to this module, so pausing it cannot stall another test's stack; every pause
is undone in a `finally`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from cluster.local.s3 import S3Server, start_s3
from vl.storage import (
    S3Retry,
    StorageConfigError,
    StorageUnavailableError,
    arrow_filesystem,
    exists,
    filesystem,
    read_bytes,
    wait_for_storage,
    write_bytes,
)

BUCKET = "vl-outage"
SHORT_OUTAGE_S = 4.0
# pyarrow's default of 3 tries, with the 1-s timeouts here, gives up on a silent server after
# 5.0 s (measured: 1 s per try, 0.5 s and 1 s between them).
ARROW_OUTAGE_S = 6.0
# One try costs one read timeout of 1 s while the server is paused (one attempt per request).
FAST_TRIES = {"VL_S3_READ_TIMEOUT_S": "1", "VL_S3_CONNECT_TIMEOUT_S": "1",
              "AWS_MAX_ATTEMPTS": "1", "AWS_RETRY_MODE": "standard"}

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def private_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = start_s3(tmp_path_factory.mktemp("seaweedfs-outage"), [BUCKET])
    try:
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGCONT)
        server.stop()


@pytest.fixture
def s3(private_s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    for key, value in {**private_s3.env(), **FAST_TRIES, "VL_S3_RETRY_TOTAL_S": "30"}.items():
        monkeypatch.setenv(key, value)
    return private_s3


@contextlib.contextmanager
def paused(server: S3Server, resume_after_s: float | None = None) -> Iterator[None]:
    """SIGSTOP the server's process group; SIGCONT after `resume_after_s` (from a timer) or
    when the block ends, whichever comes first, and always by the end of the block."""
    timer = None
    os.killpg(server.pid, signal.SIGSTOP)
    try:
        if resume_after_s is not None:
            timer = threading.Timer(resume_after_s, os.killpg, (server.pid, signal.SIGCONT))
            timer.start()
        yield
    finally:
        if timer is not None:
            timer.cancel()
        os.killpg(server.pid, signal.SIGCONT)


def _uri(name: str) -> str:
    return f"s3://{BUCKET}/outage/{uuid.uuid4().hex[:8]}/{name}"


def test_writes_and_reads_ride_out_a_short_outage(s3, caplog):
    uri = _uri("state.bin")
    write_bytes(uri, b"before")  # the client is connected before the outage
    payload = os.urandom(4096)
    caplog.set_level(logging.WARNING, logger="vl.storage")
    with paused(s3, resume_after_s=SHORT_OUTAGE_S):
        t0 = time.monotonic()
        write_bytes(uri, payload)
        took_write = time.monotonic() - t0
    assert SHORT_OUTAGE_S - 0.5 <= took_write < SHORT_OUTAGE_S + 10  # it met the outage
    assert any("storage unavailable" in r.getMessage() and "try 1 failed" in r.getMessage()
               for r in caplog.records)  # timed-out tries were retried, not waited out once

    caplog.clear()
    with paused(s3, resume_after_s=SHORT_OUTAGE_S):
        t0 = time.monotonic()
        assert read_bytes(uri) == payload
        took_read = time.monotonic() - t0
    assert SHORT_OUTAGE_S - 0.5 <= took_read < SHORT_OUTAGE_S + 10
    assert any("read " + uri in r.getMessage() for r in caplog.records)


def test_an_outage_longer_than_the_bound_fails_with_one_clear_error(s3, monkeypatch):
    uri = _uri("never.bin")
    write_bytes(uri, b"x")
    monkeypatch.setenv("VL_S3_RETRY_TOTAL_S", "3")
    with paused(s3):  # paused until the calls below have given up
        for call in (lambda: read_bytes(uri), lambda: write_bytes(uri, b"y"),
                     lambda: exists(uri), lambda: wait_for_storage(uri)):
            t0 = time.monotonic()
            with pytest.raises(StorageUnavailableError) as info:
                call()
            took = time.monotonic() - t0
            assert 2 <= took < 3 + 3, took  # the bound, plus at most one try (1 s) and slack
            message = str(info.value)
            assert uri in message and "VL_S3_RETRY_TOTAL_S=3" in message
            assert "Timeout" in message  # the cause, named
    # The object is whole: the old bytes, or the new ones if the server, once resumed, still
    # completed a PUT its client had given up on (S3 PUTs are atomic).
    assert read_bytes(uri) in (b"x", b"y")


def test_a_restart_waits_for_storage_to_come_back(s3):
    uri = _uri("run")
    with paused(s3, resume_after_s=SHORT_OUTAGE_S):
        waited = wait_for_storage(uri)
    assert SHORT_OUTAGE_S - 0.5 <= waited < SHORT_OUTAGE_S + 10
    assert wait_for_storage(uri) < 1  # storage up: one HEAD request


def test_ray_checkpoint_client_rides_out_an_outage_longer_than_pyarrow_defaults(s3, monkeypatch):
    """arrow_filesystem (Ray Train's checkpoint storage) gets enough tries for the bound, also
    in the pickled copy Ray ships to its controller and workers (pyarrow's own pickling drops
    the retry strategy)."""
    monkeypatch.setenv("VL_S3_RETRY_TOTAL_S", "40")
    built, path = arrow_filesystem(_uri("checkpoint_000001/state.pt"))
    fs = pickle.loads(pickle.dumps(built))
    with fs.open_output_stream(f"{BUCKET}/outage/warm") as f:  # connected before the outage
        f.write(b"w")
    payload = os.urandom(1 << 16)
    with paused(s3, resume_after_s=ARROW_OUTAGE_S):
        t0 = time.monotonic()
        with fs.open_output_stream(path) as f:
            f.write(payload)
        took = time.monotonic() - t0
    assert ARROW_OUTAGE_S - 0.5 <= took < ARROW_OUTAGE_S + 25  # backoff: up to 20 s a try
    assert read_bytes(f"s3://{path}") == payload
    assert arrow_filesystem("relative/dir") == (None, os.path.abspath("relative/dir"))


def test_answers_are_not_retried(s3):
    """A missing object or bucket is an answer: raised at once, within the 30 s bound."""
    t0 = time.monotonic()
    with pytest.raises(FileNotFoundError):
        read_bytes(_uri("missing.bin"))
    with pytest.raises(Exception) as info:
        wait_for_storage("s3://no-such-bucket-vl/x")
    assert not isinstance(info.value, StorageUnavailableError)
    assert time.monotonic() - t0 < 5


def test_retry_settings_come_from_the_standard_variables(s3, monkeypatch):
    monkeypatch.setenv("AWS_RETRY_MODE", "adaptive")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "7")
    monkeypatch.setenv("VL_S3_READ_TIMEOUT_S", "12.5")
    fs, _ = filesystem(f"s3://{BUCKET}/x")
    config = fs.connect().meta.config  # the botocore client s3fs built
    assert config.retries == {"mode": "adaptive", "total_max_attempts": 7}
    assert (config.read_timeout, config.connect_timeout) == (12.5, 1.0)
    assert fs.retries == 1  # botocore's tries and vl.storage's bound, not s3fs's own loop too


@pytest.mark.parametrize("name,value", [("AWS_MAX_ATTEMPTS", "0"), ("AWS_MAX_ATTEMPTS", "2.5"),
                                        ("AWS_RETRY_MODE", "forever"),
                                        ("VL_S3_RETRY_TOTAL_S", "nan"),
                                        ("VL_S3_READ_TIMEOUT_S", "-1")])
def test_a_bad_retry_setting_names_the_variable(name, value):
    with pytest.raises(StorageConfigError, match=f"^{name}="):
        S3Retry.from_env({name: value})
