"""The local stack on a shared host: only the S3 gateway (keys), MLflow (basic auth) and Ray
(token) answer anyone, and what the stack keeps on disk is private.

SeaweedFS: every other port it opens (master, volume, filer, admin; HTTP and gRPC, also the
gRPC Unix sockets at its fixed /tmp paths) refuses an anonymous request, WebDAV is not running.
MLflow: an anonymous write gets 401 and changes nothing; the stack's credentials work.
Disk: private dirs (0700) and secret files (0600, created atomically); a symlink or a directory
of another user planted where the stack, the Ray head or the shard cache would write is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import boto3
import grpc
import pytest
import requests

from cluster.local.common import quiet_env
from cluster.local.mlflow_server import AUTH_CONFIG, AUTH_DB, _write_auth_config, admin_credentials
from cluster.local.ray_head import _prepare_temp_dir
from cluster.local.s3 import GRPC_PORT_OFFSET, start_s3
from cluster.local.stack import ray_temp_dir
from vl.data.shards import ShardInfo, default_cache_dir, fetch_shard
from vl.private import UnsafePathError, private_dir, write_private

REPO = Path(__file__).resolve().parents[1]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


# ---- SeaweedFS ------------------------------------------------------------------------------
def _listening_tcp_ports(pid: int) -> set[int]:
    """TCP ports the process `pid` listens on, from /proc (its socket inodes in /proc/net/tcp)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _anonymous(method: str, url: str, body: bytes | None = None) -> tuple[int | str, bytes]:
    try:
        request = urllib.request.Request(url, data=body, method=method)
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        try:  # a refusing server may reset the connection while the error body is read
            return err.code, err.read()
        except (ConnectionError, TimeoutError):
            return err.code, b""
    except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
        return type(err).__name__, b""


def _s3(server):
    return boto3.client("s3", endpoint_url=server.endpoint, aws_access_key_id=server.access_key,
                        aws_secret_access_key=server.secret_key, region_name=server.region)


@pytest.mark.integration
def test_seaweedfs_opens_no_port_but_s3_to_anonymous_clients(s3_server):
    """Each port of `weed mini` other than S3 refuses anonymous GET/PUT (no 2xx, the object
    never appears, a stored object's bytes never come back); WebDAV listens nowhere."""
    s3 = _s3(s3_server)
    key = f"security/{uuid.uuid4().hex}"
    secret = b"checkpoint-bytes-" + uuid.uuid4().hex.encode()
    s3.put_object(Bucket="vl-runs", Key=f"{key}/state.pt", Body=secret)

    s3_port = int(s3_server.endpoint.rsplit(":", 1)[1])
    known = {p + offset for p in s3_server.ports.values() for offset in (0, GRPC_PORT_OFFSET)}
    listening = _listening_tcp_ports(s3_server.pid)
    assert s3_port in listening and listening <= known, f"unexpected ports {listening - known}"
    others = sorted(listening - {s3_port})
    assert len(others) >= 8  # master, volume, filer, admin: HTTP + gRPC each

    for port in others:
        base = f"http://127.0.0.1:{port}"
        for path in (f"/buckets/vl-runs/{key}/state.pt", f"/vl-runs/{key}/state.pt", "/"):
            code, body = _anonymous("GET", base + path)
            assert not (isinstance(code, int) and code < 300), (port, path, code, body[:200])
            assert secret not in body
        code, body = _anonymous("PUT", f"{base}/buckets/vl-runs/{key}/planted", b"evil")
        assert not (isinstance(code, int) and code < 300), (port, code, body[:200])
        code, body = _anonymous("POST", f"{base}/col/delete?collection=vl-runs")
        assert not (isinstance(code, int) and code < 300), (port, code, body[:200])

    # gRPC (the filer's takes writes without any JWT): TLS with our CA's client cert only,
    # on the TCP ports and on the Unix sockets SeaweedFS puts in /tmp.
    for name, port in s3_server.ports.items():
        grpc_port = port + GRPC_PORT_OFFSET
        socket = f"/tmp/seaweedfs-{name}-grpc-{grpc_port}.sock"
        for target in (f"127.0.0.1:{grpc_port}", f"unix:{socket}"):
            with grpc.insecure_channel(target) as channel:
                call = channel.unary_unary("/filer_pb.SeaweedFiler/GetFilerConfiguration")
                with pytest.raises(grpc.RpcError) as err:
                    call(b"", timeout=5)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE, (target, err.value)

    # ... while S3 with the keys works, and nothing anonymous got in.
    assert s3.get_object(Bucket="vl-runs", Key=f"{key}/state.pt")["Body"].read() == secret
    listed = s3.list_objects_v2(Bucket="vl-runs", Prefix=key).get("Contents", [])
    assert [o["Key"] for o in listed] == [f"{key}/state.pt"]
    anonymous_s3 = _anonymous("GET", f"{s3_server.endpoint}/vl-runs/{key}/state.pt")
    assert anonymous_s3[0] == 403


@pytest.mark.integration
def test_seaweedfs_keeps_its_secrets_private(s3_server):
    data_dir = s3_server.data_dir
    assert _mode(data_dir) == 0o700
    for name in ("s3.json", "security.toml", "tls/tls.key"):
        assert _mode(data_dir / name) == 0o600, name
    toml = (data_dir / "security.toml").read_text()
    assert toml.count("[jwt.") == 4 and "[grpc.filer]" in toml and "[https.master]" in toml


def test_start_s3_refuses_a_symlinked_data_dir(tmp_path):
    target = private_dir(tmp_path / "elsewhere")
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(UnsafePathError, match="symlink"):
        start_s3(tmp_path / "link", ["vl-data"])
    assert list(target.iterdir()) == []  # nothing written through the link


# ---- MLflow ---------------------------------------------------------------------------------
def _api(server, path: str) -> str:
    return f"{server.uri}/api/2.0/mlflow/{path}"


@pytest.mark.integration
def test_mlflow_refuses_anonymous_writes(mlflow_server):
    """An anonymous client can neither create an experiment nor move an alias (401, nothing
    changed); with the stack's credentials both work."""
    auth = (mlflow_server.username, mlflow_server.password)
    name = f"alias-{uuid.uuid4().hex[:8]}"
    assert requests.post(_api(mlflow_server, "registered-models/create"), json={"name": name},
                         auth=auth, timeout=30).status_code == 200
    for _ in range(2):
        r = requests.post(_api(mlflow_server, "model-versions/create"), auth=auth, timeout=30,
                          json={"name": name, "source": f"s3://mlflow/artifacts/{name}"})
        assert r.status_code == 200, r.text
    alias = {"name": name, "alias": "champion", "version": "1"}
    assert requests.post(_api(mlflow_server, "registered-models/alias"), json=alias, auth=auth,
                         timeout=30).status_code == 200

    moved = requests.post(_api(mlflow_server, "registered-models/alias"), timeout=30,
                          json={**alias, "version": "2"})
    assert moved.status_code == 401
    wrong = requests.post(_api(mlflow_server, "registered-models/alias"), timeout=30,
                          json={**alias, "version": "2"}, auth=(mlflow_server.username, "guess"))
    assert wrong.status_code == 401
    created = requests.post(_api(mlflow_server, "experiments/create"), timeout=30,
                            json={"name": f"anon-{uuid.uuid4().hex[:8]}"})
    assert created.status_code == 401

    got = requests.get(_api(mlflow_server, "registered-models/alias"), auth=auth, timeout=30,
                       params={"name": name, "alias": "champion"})
    assert got.status_code == 200 and got.json()["model_version"]["version"] == "1"
    assert requests.get(f"{mlflow_server.uri}/health", timeout=30).status_code == 200
    assert _mode(mlflow_server.data_dir) == 0o700
    assert _mode(mlflow_server.data_dir / AUTH_CONFIG) == 0o600


def test_mlflow_admin_password_survives_a_restart_and_is_never_guessed(tmp_path):
    data_dir = private_dir(tmp_path / "mlflow")
    user, password = admin_credentials(data_dir)
    assert len(password) >= 24 and admin_credentials(tmp_path) != (user, password)
    _write_auth_config(data_dir, user, password)
    assert admin_credentials(data_dir) == (user, password)  # what the users db was created with
    (data_dir / AUTH_DB).write_bytes(b"")
    (data_dir / AUTH_CONFIG).unlink()
    with pytest.raises(RuntimeError, match="admin password"):
        admin_credentials(data_dir)


# ---- private files and dirs -----------------------------------------------------------------
def test_private_dir_creates_tightens_and_refuses(tmp_path):
    fresh = private_dir(tmp_path / "a" / "b")
    assert _mode(fresh) == 0o700
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    os.chmod(loose, 0o755)
    assert _mode(private_dir(loose)) == 0o700
    link = tmp_path / "link"
    link.symlink_to(fresh)
    with pytest.raises(UnsafePathError, match="symlink"):
        private_dir(link)
    plain = tmp_path / "plain"
    plain.write_text("x")
    with pytest.raises(UnsafePathError, match="not a usable directory"):
        private_dir(plain)


@pytest.mark.skipif(os.geteuid() != 0, reason="planting another user's directory needs root")
def test_private_dir_refuses_another_users_directory(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 4242, 4242)
    with pytest.raises(UnsafePathError, match="uid 4242"):
        private_dir(theirs)


def test_write_private_is_0600_and_never_follows_a_planted_link(tmp_path):
    old_umask = os.umask(0)  # a permissive umask must not matter
    try:
        victim = tmp_path / "victim.txt"
        victim.write_text("theirs")
        planted = tmp_path / "state.json"
        planted.symlink_to(victim)
        write_private(planted, '{"secret": 1}')
    finally:
        os.umask(old_umask)
    assert victim.read_text() == "theirs"  # the link was replaced, not written through
    assert not planted.is_symlink() and _mode(planted) == 0o600
    assert json.loads(planted.read_text()) == {"secret": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "victim.txt"]


def test_ray_temp_dir_fallback_is_per_user_and_owner_checked(tmp_path):
    root = tmp_path / ("long-" * 12) / "stack"
    fallback = ray_temp_dir(root)
    assert fallback.parent == Path("/tmp") and f"-{os.geteuid()}-" in fallback.name
    decoy = private_dir(tmp_path / "decoy")
    fallback.symlink_to(decoy)
    try:
        with pytest.raises(UnsafePathError, match="symlink"):
            _prepare_temp_dir(fallback)
        assert list(decoy.iterdir()) == []  # no token written through the link
    finally:
        fallback.unlink()
    short = Path(tempfile.mkdtemp(prefix="vls", dir="/tmp"))
    try:
        os.chmod(short, 0o755)
        temp_dir, home, token = _prepare_temp_dir(short)
        assert _mode(temp_dir) == _mode(home) == 0o700 and _mode(token) == 0o600
    finally:
        shutil.rmtree(short)


def test_shard_cache_is_per_user_and_refuses_a_planted_link(tmp_path, monkeypatch):
    monkeypatch.delenv("VL_SHARD_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_cache_dir() == tmp_path / "cache" / "videolights" / "shards"
    monkeypatch.setenv("XDG_CACHE_HOME", "/nonexistent-dir/cache")
    assert default_cache_dir().name == f"vl-shard-cache-{os.geteuid()}"

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "cache" / "videolights").mkdir(parents=True)
    default_cache_dir().symlink_to(private_dir(tmp_path / "shared"))
    info = ShardInfo(path="shard-00000.parquet", num_rows=1, num_row_groups=1, bytes=1,
                     sha256="0" * 64, qids_sha256="0" * 64)
    with pytest.raises(UnsafePathError, match="symlink"):
        fetch_shard("s3://vl-data/nowhere", info, None)


def test_stack_cli_refuses_a_planted_state_dir(tmp_path):
    """`stack up --dir` on a symlink exits 2 with one line and starts nothing."""
    (tmp_path / "link").symlink_to(private_dir(tmp_path / "real"))
    up = subprocess.run([sys.executable, "-m", "cluster.local.stack", "up", "--dir",
                         str(tmp_path / "link")], env=quiet_env(), capture_output=True,
                        text=True, timeout=60, cwd=REPO)
    assert up.returncode == 2 and up.stdout == ""
    assert up.stderr.count("\n") == 1 and "symlink" in up.stderr, up.stderr
    assert list((tmp_path / "real").iterdir()) == []
